"""Batched decoding on the fused graph: several sequences per call give each the tokens it gets alone.

The serving engine (serve/batching.py) over the batched ORT model (runtime/ort_batch.py): mixed
prompt lengths, requests joining and leaving between steps (their rows compacted), more requests
than rows, an arena that grows, cancellation, and a request that cannot be decoded, which must
fail alone.
"""

from __future__ import annotations

import numpy as np
import pytest

from accelc.compiler import fused_decoder
from accelc.loops.autoregressive import generate
from accelc.runtime import ort_batch
from accelc.runtime.ort_backend import OrtStepModel
from accelc.serve import cores
from accelc.serve.batching import ContinuousBatcher, Request

torch = pytest.importorskip("torch")
VOCAB = 258  # tiny-llama's


@pytest.fixture(scope="module")
def graph(tmp_path_factory):
    from accelc.families import tiny
    from accelc.families.causal_lm import load_model

    tmp = tmp_path_factory.mktemp("serve-batch")
    return fused_decoder.build(load_model(tiny.build("tiny-llama", tmp / "tiny-llama")), tmp / "onnx")


def _requests(n: int, seed: int = 0) -> list[Request]:
    rng = np.random.default_rng(seed)
    return [
        Request(i, tuple(rng.integers(0, VOCAB, size=int(rng.integers(1, 30))).tolist()), int(rng.integers(1, 40)))
        for i in range(n)
    ]


def _serve_all(engine, requests, eos=()) -> dict[int, list[int]]:
    """Submit requests in two waves (the second while the first decodes); tokens per request."""
    out: dict[int, list[int]] = {}
    finish: dict[int, str] = {}
    half = len(requests) // 2
    for r in requests[:half]:
        engine.submit(r)
    for step in range(10_000):
        if step == 3:
            for r in requests[half:]:
                engine.submit(r)
        if engine.idle and step > 3:
            break
        for event in engine.step():
            out.setdefault(event.id, []).extend(event.tokens)
            if event.finish:
                finish[event.id] = event.finish
    assert set(finish) == {r.id for r in requests}
    return out


@pytest.mark.parametrize("slots", [1, 3, 8])
def test_batched_greedy_equals_alone(graph, slots):
    alone = OrtStepModel(graph)
    requests = _requests(11)
    eos = (7,)  # some sequences stop early, leaving rows mid-batch
    batcher = ContinuousBatcher(ort_batch.BatchedOrtModel.open(graph, {}, slots), slots, eos)
    got = _serve_all(batcher, requests, eos)
    for r in requests:
        assert got[r.id] == generate(alone, list(r.prompt), r.max_tokens, eos_ids=eos).tokens, r.id
    assert not batcher.model.rows  # every row released
    if slots > 1:  # batching happened: fewer calls than tokens
        assert batcher.calls < sum(len(t) for t in got.values()) - len(requests)


def test_the_arena_grows_with_rows_in_flight(graph, monkeypatch):
    monkeypatch.setattr(ort_batch, "CAPACITY_START", 8)
    model = ort_batch.BatchedOrtModel.open(graph, {}, 3)
    alone = OrtStepModel(graph)
    short, long = Request(0, (5, 6, 7), 20), Request(1, tuple(range(40)), 30)
    got = _serve_all(ContinuousBatcher(model, 3, ()), [short, long])
    assert model.capacity >= 70
    for r in (short, long):
        assert got[r.id] == generate(alone, list(r.prompt), r.max_tokens).tokens


def test_a_request_that_fails_fails_alone(graph):
    alone = OrtStepModel(graph)
    good = _requests(4, seed=1)
    bad = Request(99, (3, VOCAB + 5), 5)  # a token id the embedding does not have
    batcher = ContinuousBatcher(ort_batch.BatchedOrtModel.open(graph, {}, 4), 4, ())
    for r in good[:2] + [bad] + good[2:]:
        batcher.submit(r)
    events = []
    while not batcher.idle:
        events += batcher.step()
    failed = [e for e in events if e.finish == "error"]
    assert [e.id for e in failed] == [99] and "prefill failed" in failed[0].error
    for r in good:
        tokens = [t for e in events if e.id == r.id for t in e.tokens]
        assert tokens == generate(alone, list(r.prompt), r.max_tokens).tokens


def test_cancel_frees_the_row(graph):
    batcher = ContinuousBatcher(ort_batch.BatchedOrtModel.open(graph, {}, 2), 2, ())
    batcher.submit(Request(1, (1, 2, 3), 500))
    batcher.submit(Request(2, (4,), 500))
    batcher.submit(Request(3, (5,), 500))  # waits: both rows busy
    batcher.step()
    batcher.cancel(1)
    batcher.cancel(3)
    events = batcher.step()
    assert {(e.id, e.finish) for e in events if e.finish} == {(1, "cancelled"), (3, "cancelled")}
    assert len(batcher.model.rows) == 1 and not batcher.waiting


def test_a_graph_without_per_sequence_rows_is_not_batched(graph, tmp_path):
    import onnx

    model = onnx.load(str(graph))
    del model.metadata_props[:]  # as a traced graph: no accelc.kv_cache declaration
    plain = tmp_path / "plain.onnx"
    onnx.save(model, str(plain))
    assert ort_batch.BatchedOrtModel.open(plain, {}, 4) is None


def test_cpulists_and_core_sets(monkeypatch):
    assert cores.parse_cpulist("0-3,8,10-11\n") == [0, 1, 2, 3, 8, 10, 11]
    monkeypatch.setattr(cores, "numa_nodes", lambda: [[0, 1, 2, 3], [4, 5, 6, 7]])
    monkeypatch.setattr(cores.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5, 6, 7})
    assert cores.core_sets(2) == [[0, 1, 2, 3], [4, 5, 6, 7]]  # one worker per NUMA node
    assert cores.core_sets(4, threads=1) == [[0], [1], [2], [3]]
    with pytest.raises(cores.UsageError, match="needs 9 cores"):
        cores.core_sets(3, threads=3)
