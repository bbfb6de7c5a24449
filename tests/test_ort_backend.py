"""The ONNX Runtime backend's in-place KV cache keeps the StepModel protocol's value semantics.

Fused graphs declare that GroupQueryAttention may append into the past buffer, so the backend
binds one arena as both past and present. These tests hold it to what the copying backend
guarantees: every state stays usable while referenced (branches from one prefix, as batch
speculative decoding makes), arenas grow past their first capacity, linear decoding (what AR and
speculative decoding do) never copies, and a state rebuilt by hand is refused, not misread.
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest

from accelc.compiler import fused_decoder
from accelc.runtime import ort_backend
from accelc.runtime.base import KVState
from accelc.runtime.ort_backend import OrtStepModel

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from accelc.families import tiny
    from accelc.families.causal_lm import load_model

    tmp = tmp_path_factory.mktemp("ort-kv")
    model = load_model(tiny.build("tiny-llama", tmp / "tiny-llama"))
    graph = fused_decoder.build(model, tmp / "onnx")
    ids = np.random.default_rng(0).integers(0, model.config.vocab_size, size=40)
    with torch.no_grad():
        logits = model(torch.as_tensor(ids[None])).logits[0].numpy()
    return graph, ids, logits


def _close(a, b):
    np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)


def test_fused_graphs_run_in_place(tiny):
    graph, ids, expected = tiny
    step, copying = OrtStepModel(graph), OrtStepModel(graph, {"kv_cache": "copy"})
    assert step.in_place and not copying.in_place
    for model in (step, copying):
        _, state = model.prefill(ids[:10])
        steps = []
        for t in ids[10:20]:  # a decode loop that drops each old state, as generate() does
            logits, state = model.extend(state, np.array([t]))
            steps.append(logits)
        _close(np.concatenate(steps), expected[10:20])  # each step's own logits, kept after the next step
        state = model.truncate(state, 15)  # a rejection
        logits, state = model.extend(state, ids[15:18])
        _close(logits, expected[15:18])
        assert [kv.shape[2] for kv in model.kv_numpy(state)] == [18] * 2 * model.n_layers
    assert step.kv_copies == 0


def test_branches_from_one_prefix_stay_valid(tiny):
    graph, ids, expected = tiny
    step = OrtStepModel(graph)
    _, base = step.prefill(ids[:12])
    other = np.array([5, 6, 7])
    _, a = step.extend(base, ids[12:15])  # branch a: the true continuation
    _, b = step.extend(base, other)  # branch b overwrites a's positions unless it copies
    assert step.kv_copies == 1
    la, _ = step.extend(a, ids[15:17])  # a still continues correctly
    _close(la, expected[15:17])
    _, b2 = step.extend(step.truncate(b, 12), ids[12:16])
    lb, _ = step.extend(b2, ids[16:17])
    _close(lb, expected[16:17])
    kv = step.kv_numpy(a)
    assert kv[0].shape[2] == 15


def test_arena_grows_past_its_first_capacity(tiny, monkeypatch):
    graph, ids, expected = tiny
    monkeypatch.setattr(ort_backend, "ARENA_START", 8)
    step = OrtStepModel(graph)
    first, state = step.prefill(ids[:6])
    rows = [first]
    for start in range(6, 40, 5):
        logits, state = step.extend(state, ids[start : start + 5])
        rows.append(logits)
    _close(np.concatenate(rows), expected)
    assert step.kv_copies >= 2  # 8 -> 22 -> 44 positions


def test_a_rebuilt_state_is_refused(tiny):
    graph, ids, _ = tiny
    step = OrtStepModel(graph)
    _, state = step.prefill(ids[:8])
    forged = KVState(state.length, state.tensors)  # not made by the model: nobody tracks it
    shorter = step.truncate(state, 4)
    del state
    step.extend(shorter, ids[4:6])  # in place (no live state needs positions 4..): the forged one loses them
    assert step.kv_copies == 0
    with pytest.raises(ValueError, match="overwritten"):
        step.extend(forged, ids[8:9])


def test_one_model_as_both_pearl_workers(tiny):
    """PEARL runs its two workers in two threads; with the draft being the target itself, both
    extend the same model's arena at once. The arena's lock and copy-on-write keep each right."""
    from accelc.loops.autoregressive import generate
    from accelc.loops.pearl import pearl_generate

    graph, ids, _ = tiny
    step = OrtStepModel(graph, {"intra_op_threads": 1})
    prompt = ids[:9].tolist()
    expected = generate(step, prompt, 16).tokens
    got = pearl_generate(step, step, prompt, 16, gamma=3, concurrent=True)
    assert got.tokens == expected and got.stats["rejections"] == 0


@pytest.mark.parametrize("kv_cache", ["auto", "copy"])
def test_calls_made_alone_run_on_the_second_session_over_the_same_cache(tiny, kv_cache):
    """A PEARL worker's target: one thread for the rounds both workers run, all cores for the
    calls made alone (prefill, copied rounds), one cache for both sessions."""
    graph, ids, expected = tiny
    step = OrtStepModel(
        graph,
        {"intra_op_threads": 1, "kv_cache": kv_cache},
        alone_options={"intra_op_threads": 2, "kv_cache": kv_cache},
    )
    runs = {"worker": 0, "alone": 0}
    for who, session in (("worker", step.session), ("alone", step.alone_session)):
        # count each session's runs: the calls must land on the session they were made for
        for method in ("run", "run_with_iobinding"):
            original = getattr(session, method)

            def counted(*args, _original=original, _who=who, **kwargs):
                runs[_who] += 1
                return _original(*args, **kwargs)

            setattr(session, method, counted)
    with step.alone():
        first, state = step.prefill(ids[:10])
    rows = [first]
    for start, who in zip(range(10, 40, 6), ("worker", "alone", "worker", "alone", "worker")):
        with step.alone() if who == "alone" else contextlib.nullcontext():
            logits, state = step.extend(state, ids[start : start + 6])
        rows.append(logits)
    _close(np.concatenate(rows), expected)
    assert runs == {"worker": 3, "alone": 3}
    assert not step._alone  # the context restores the worker's session


@pytest.mark.parametrize(
    ("options", "spin", "duration"),
    [
        ({}, "0", None),
        ({"allow_spinning": True}, "1", None),  # ORT's own (long) spin
        ({"allow_spinning": True, "spin_duration_us": 20}, "1", "20"),
    ],
)
def test_session_options_carry_the_spin_policy(options, spin, duration):
    so = ort_backend.session_options(options)
    assert so.get_session_config_entry("session.intra_op.allow_spinning") == spin
    if duration is None:
        with pytest.raises(Exception, match="does not have configuration"):
            so.get_session_config_entry("session.intra_op.spin_duration_us")
    else:
        assert so.get_session_config_entry("session.intra_op.spin_duration_us") == duration
