"""Speculative sampling, plus what every speculative method shares: greedy equality with the
target for any draft (table models, torch, ONNX Runtime), exact output distributions, the
expected rejection count of Yin et al. (arXiv 2411.00841), KV rollback, and bad input.

The table models and statistics helpers here are reused by the other speculative test files.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from accelc.errors import UsageError
from accelc.loops.acceptance import STREAM_DRAFT, position_uniform, sample_index, tv_distance, verify_token
from accelc.loops.autoregressive import Sampler, generate
from accelc.loops.batch_speculative import batch_speculative_generate
from accelc.loops.pearl import pearl_generate
from accelc.loops.speculative import speculative_generate
from accelc.loops.stairs import stairs_generate
from accelc.runtime.base import KVState, KVStepModel

SAMPLES = 10000  # per distribution test, 2-5 s: a 0.05 TV bias toward the draft fails every time
P_VALUE = 1e-3  # reject exactness at p < 0.001: one false alarm in 1000 runs of a test
# chi-square critical values at p = 0.001 for small degrees of freedom (Wilson-Hilferty above)
_CHI2_CRIT = {1: 10.828, 2: 13.816, 3: 16.266, 4: 18.467, 5: 20.515}
_Z_999 = 3.090232  # standard normal quantile at 1 - 0.001


# --------------------------------------------------------------------------- table models
class TableModel(KVStepModel):
    """fp64 logits from a [V+1, V, V] table indexed by (previous token, current token); the
    previous token of position 0 is the row V. The 'KV cache' is the token history itself, so
    extend/truncate behave as with a real cache and a test can read what a state holds."""

    name = "table"

    def __init__(self, table: np.ndarray):
        self.table = np.asarray(table, dtype=np.float64)
        self.vocab_size = self.table.shape[-1]

    def empty_state(self):
        return KVState(0, (np.zeros((1, 1, 0, 1)),))

    def extend(self, state, ids):
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if ids.size == 0:
            raise ValueError("extend needs at least one token")
        hist = np.concatenate([state.tensors[0], ids.reshape(1, 1, -1, 1).astype(np.float64)], axis=2)
        flat = hist[0, 0, :, 0].astype(np.int64)
        pos = np.arange(state.length, state.length + ids.size)
        prev = np.where(pos > 0, flat[np.maximum(pos - 1, 0)], self.vocab_size)
        return self.table[prev, flat[pos]], KVState(state.length + ids.size, (hist,))

    @staticmethod
    def history(state) -> list[int]:
        return [int(t) for t in state.tensors[0][0, 0, :, 0]]


def random_table(vocab: int, seed: int, scale: float = 1.0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(vocab + 1, vocab, vocab)) * scale


def noisy(table: np.ndarray, seed: int, sigma: float) -> np.ndarray:
    """A draft table near the target's: the noise scale tunes TV(p, q)."""
    return table + np.random.default_rng(seed).normal(size=table.shape) * sigma


def unigram(logits) -> TableModel:
    """The same next-token distribution at every position: alpha is one constant."""
    logits = np.asarray(logits, dtype=np.float64)
    v = logits.size
    return TableModel(np.broadcast_to(logits, (v + 1, v, v)).copy())


class RecordingModel(KVStepModel):
    """Wraps a TableModel and records the token history of every state passed to extend."""

    def __init__(self, inner: TableModel):
        self.inner, self.name, self.vocab_size = inner, "recording", inner.vocab_size
        self.seen: list[list[int]] = []

    def empty_state(self):
        return self.inner.empty_state()

    def extend(self, state, ids):
        self.seen.append(TableModel.history(state))
        return self.inner.extend(state, ids)


# --------------------------------------------------------------------------- methods
def run(method: str, target, draft, prompt, max_new, *, gamma=2, sampler=Sampler(), eos_ids=(), seed=0, **kw):
    """Every speculative method behind one call (stairs is greedy only: its n plays gamma)."""
    shared = {"prompt_kv_from_target": kw.get("prompt_kv_from_target", False)}
    if method == "speculative":
        return speculative_generate(
            target,
            draft,
            prompt,
            max_new,
            gamma=gamma,
            sampler=sampler,
            eos_ids=eos_ids,
            seed=seed,
            lookup=kw.get("lookup"),
            **shared,
        )
    if method == "batch_speculative":
        return batch_speculative_generate(
            target,
            draft,
            prompt,
            max_new,
            gamma=gamma,
            sampler=sampler,
            eos_ids=eos_ids,
            seed=seed,
            num_candidates=kw.get("num_candidates", 3),
            **shared,
        )
    if method == "pearl":
        return pearl_generate(
            target,
            draft,
            prompt,
            max_new,
            gamma=gamma,
            sampler=sampler,
            eos_ids=eos_ids,
            seed=seed,
            concurrent=kw.get("concurrent", False),
            lookup=kw.get("lookup"),
            **shared,
        )
    if method == "stairs":
        assert sampler.temperature == 0.0
        return stairs_generate(
            target,
            draft,
            prompt,
            max_new,
            candidates=gamma,
            eos_ids=eos_ids,
            validation=kw.get("validation", "auto"),
            lookup=kw.get("lookup"),
            **shared,
        )
    raise KeyError(method)


METHODS = ["speculative", "batch_speculative", "pearl", "stairs"]
SAMPLING_METHODS = ["speculative", "batch_speculative", "pearl"]


# --------------------------------------------------------------------------- statistics
def chi2_critical(df: int) -> float:
    if df in _CHI2_CRIT:
        return _CHI2_CRIT[df]
    a = 2.0 / (9.0 * df)
    return df * (1.0 - a + _Z_999 * math.sqrt(a)) ** 3


def exact_joint(model, prompt, horizon, sampler) -> dict[tuple[int, ...], float]:
    """P(first `horizon` tokens) under the model, by enumeration."""
    v = model.vocab_size
    out = {}
    for seq in itertools.product(range(v), repeat=horizon):
        logits, _ = model.prefill(np.asarray(list(prompt) + list(seq[:-1])))
        rows = logits[len(prompt) - 1 :]
        out[seq] = float(np.prod([sampler.probs(rows[i])[seq[i]] for i in range(horizon)]))
    return out


def assert_distribution(samples: list[tuple[int, ...]], exact: dict[tuple[int, ...], float]) -> None:
    """Chi-square goodness of fit at p = 0.001, cells with expected count < 5 pooled; no mass
    where the target has none; empirical TV within ~3/sqrt(n)."""
    n = len(samples)
    counts: dict[tuple[int, ...], int] = {}
    for s in samples:
        counts[s] = counts.get(s, 0) + 1
    impossible = [s for s in counts if exact.get(s, 0.0) == 0.0]
    assert not impossible, f"sampled sequences the target never produces: {impossible[:5]}"
    stat, pooled_obs, pooled_exp, cells = 0.0, 0, 0.0, 0
    for seq, prob in exact.items():
        e, o = prob * n, counts.get(seq, 0)
        if e < 5.0:
            pooled_obs, pooled_exp = pooled_obs + o, pooled_exp + e
        else:
            stat += (o - e) ** 2 / e
            cells += 1
    if pooled_exp > 0:
        stat += (pooled_obs - pooled_exp) ** 2 / pooled_exp
        cells += 1
    assert cells >= 2
    assert stat < chi2_critical(cells - 1), f"chi-square {stat:.1f} over {cells} cells"
    tv = 0.5 * sum(abs(counts.get(s, 0) / n - p) for s, p in exact.items())
    assert tv < 3.0 * math.sqrt(len(exact)) / math.sqrt(n) + 0.01


def sample_first_tokens(method, target, draft, prompt, horizon, n, **kw) -> list[tuple[int, ...]]:
    out = []
    for seed in range(n):
        r = run(method, target, draft, prompt, horizon, seed=seed, **kw)
        out.append(tuple(r.tokens))
    return out


# --------------------------------------------------------------------------- primitives
def test_position_uniform_is_reproducible_and_uniform():
    assert position_uniform(3, 10, STREAM_DRAFT) == position_uniform(3, 10, STREAM_DRAFT)
    assert position_uniform(3, 10, STREAM_DRAFT) != position_uniform(3, 11, STREAM_DRAFT)
    assert position_uniform(3, 10, STREAM_DRAFT) != position_uniform(4, 10, STREAM_DRAFT)
    u = np.array([position_uniform(s, 7, 1, 2) for s in range(20000)])
    assert u.min() >= 0.0 and u.max() < 1.0
    counts = np.bincount((u * 20).astype(int), minlength=20)
    stat = float(((counts - 1000.0) ** 2 / 1000.0).sum())
    assert stat < chi2_critical(19)


def test_sample_index_never_picks_a_zero_mass_token():
    p = np.array([0.0, 0.5, 0.0, 0.5, 0.0])
    picks = {sample_index(p, u) for u in [0.0, 0.25, 0.4999999, 0.5, 0.9999999999999999]}
    assert picks == {1, 3}


def test_one_position_rule_outputs_p_and_rejects_with_probability_tv():
    rng = np.random.default_rng(0)
    p, q = rng.dirichlet(np.ones(5)), rng.dirichlet(np.ones(5))
    n, out, rejected = 20000, [], 0
    for s in range(n):
        x = sample_index(q, position_uniform(s, 0, 0))
        ok, t = verify_token(p, q, x, position_uniform(s, 0, 1), position_uniform(s, 0, 2))
        out.append((t,))
        rejected += not ok
    assert_distribution(out, {(i,): float(p[i]) for i in range(5)})
    tv = tv_distance(p, q)
    assert abs(rejected / n - tv) < 4 * math.sqrt(tv * (1 - tv) / n)


# --------------------------------------------------------------------------- greedy equality
@pytest.mark.parametrize("method", METHODS)
def test_greedy_equals_target_greedy_for_a_random_draft(method):
    for case in range(6):
        target = TableModel(random_table(12, seed=case, scale=3.0))
        draft_random = TableModel(random_table(12, seed=100 + case, scale=3.0))
        draft_close = TableModel(noisy(target.table, seed=200 + case, sigma=0.7))
        prompt = [case % 12, (3 * case) % 12]
        eos = (case % 12,) if case % 2 else ()
        expected = generate(target, prompt, 40, eos_ids=eos).tokens
        for draft in (draft_random, draft_close, target):
            for gamma in (1, 3, 6):
                got = run(method, target, draft, prompt, 40, gamma=gamma, eos_ids=eos)
                assert got.tokens == expected, (method, case, gamma)
                assert got.stats["accepted"] <= got.stats["drafted"]
    # a draft equal to the target accepts everything
    got = run(method, target, target, prompt, 40, gamma=3)
    assert got.stats["rejections"] == 0 and got.stats["acceptance_rate"] == 1.0


@pytest.mark.parametrize("method", METHODS)
def test_short_budgets_and_eos_stop_exactly(method):
    target = TableModel(random_table(6, seed=1, scale=3.0))
    draft = TableModel(random_table(6, seed=2, scale=3.0))
    for max_new in (1, 2, 3):
        expected = generate(target, [1], max_new).tokens
        assert run(method, target, draft, [1], max_new, gamma=4).tokens == expected
    full = generate(target, [1], 30).tokens
    eos = full[5]
    assert run(method, target, draft, [1], 30, gamma=4, eos_ids=(eos,)).tokens == full[: full.index(eos) + 1]


# --------------------------------------------------------------------------- exact distributions
DIST_TARGET = random_table(3, seed=11)
DIST_DRAFT = noisy(DIST_TARGET, seed=12, sigma=1.0)


@pytest.mark.parametrize(
    "gamma,sampler",
    [
        (1, Sampler(temperature=1.0)),
        (3, Sampler(temperature=0.7, top_k=2)),
        (2, Sampler(temperature=1.5, top_p=0.8)),
    ],
)
def test_speculative_sampling_is_distributed_as_the_target(gamma, sampler):
    target, draft = TableModel(DIST_TARGET), TableModel(DIST_DRAFT)
    prompt, horizon = [0, 2], 4  # the first token comes from prefill; three from rounds
    exact = exact_joint(target, prompt, horizon, sampler)
    samples = sample_first_tokens("speculative", target, draft, prompt, horizon, SAMPLES, gamma=gamma, sampler=sampler)
    assert_distribution(samples, exact)


def test_a_biased_sampler_fails_the_distribution_check():
    """The check has teeth: the draft's own distribution is rejected against the target's."""
    target, draft = TableModel(DIST_TARGET), TableModel(DIST_DRAFT)
    sampler = Sampler(temperature=1.0)
    exact = exact_joint(target, [0, 2], 3, sampler)
    samples = [tuple(generate(draft, [0, 2], 3, sampler=sampler, seed=s).tokens) for s in range(SAMPLES // 2)]
    with pytest.raises(AssertionError):
        assert_distribution(samples, exact)


# --------------------------------------------------------------------------- rejections (R2)
@pytest.mark.parametrize("method", SAMPLING_METHODS)
def test_rejections_match_the_sum_of_tv_distances(method):
    """Each verified position rejects with probability TV(p_n, q_n) given its context (batch:
    prod TV(r_m, q)), so the total count tracks the recorded sum of those probabilities."""
    target = TableModel(random_table(6, seed=3))
    draft = TableModel(noisy(target.table, seed=4, sigma=0.8))
    rejections, expected = 0, 0.0
    for seed in range(30):
        r = run(method, target, draft, [seed % 6], 60, gamma=3, sampler=Sampler(temperature=1.0), seed=seed)
        rejections += r.stats["rejections"]
        expected += r.stats["expected_rejections"]
    assert expected > 50
    assert abs(rejections - expected) < 4 * math.sqrt(expected)  # variance sum TV(1 - TV) <= sum TV


def test_unigram_pair_matches_the_closed_forms():
    """Position-independent p and q: rejections per verified position -> TV(p, q), tokens per
    round -> (1 - alpha^(gamma+1)) / (1 - alpha) with alpha = 1 - TV (arXiv 2211.17192 eq. 1; arXiv 2411.00841)."""
    from accelc.loops.replay import expected_accepted_length

    p_logits, q_logits = np.log([0.5, 0.3, 0.15, 0.05]), np.log([0.25, 0.25, 0.25, 0.25])
    target, draft = unigram(p_logits), unigram(q_logits)
    sampler = Sampler(temperature=1.0)
    alpha = 1.0 - tv_distance(sampler.probs(p_logits), sampler.probs(q_logits))
    for gamma in (1, 3):
        verified = rejections = rounds = tokens = 0
        for seed in range(8):
            r = speculative_generate(target, draft, [0], 400, gamma=gamma, sampler=sampler, seed=seed)
            verified += r.stats["verified"]
            rejections += r.stats["rejections"]
            rounds += r.stats["rounds"]
            tokens += r.stats["mean_accepted_length"] * r.stats["rounds"]
        rate = rejections / verified
        assert abs(rate - (1 - alpha)) < 4 * math.sqrt(alpha * (1 - alpha) / verified)
        assert tokens / rounds == pytest.approx(expected_accepted_length(alpha, gamma), rel=0.05)


# --------------------------------------------------------------------------- shared randomness
def test_a_draft_equal_to_the_target_gives_one_sample_for_every_method():
    """Per-position streams: with q == p nothing is rejected and every method emits the
    inverse-CDF sample of p with the position's draft uniform."""
    target = TableModel(random_table(5, seed=9))
    sampler = Sampler(temperature=1.0)
    for seed in range(5):
        ref = [2, 4]
        for _ in range(25):
            logits, _ = target.prefill(np.asarray(ref))
            ref.append(sample_index(sampler.probs(logits[-1]), position_uniform(seed, len(ref), STREAM_DRAFT)))
        outs = [
            run("speculative", target, target, [2, 4], 25, gamma=g, sampler=sampler, seed=seed).tokens for g in (1, 4)
        ]
        outs += [
            run(m, target, target, [2, 4], 25, gamma=3, sampler=sampler, seed=seed).tokens
            for m in ("batch_speculative", "pearl")
        ]
        for out in outs:
            assert out == ref[2:]


# --------------------------------------------------------------------------- KV rollback
@pytest.mark.parametrize("method", METHODS)
def test_target_cache_holds_only_committed_tokens_when_extended(method):
    """Rejected drafts are truncated away: every state handed to the target's extend holds a
    prefix of the final committed sequence (drafts beyond it only in the call's new ids)."""
    inner = TableModel(random_table(8, seed=5, scale=2.0))
    draft = TableModel(noisy(inner.table, seed=6, sigma=1.5))
    for sampler in (Sampler(), Sampler(temperature=1.0)):
        if method == "stairs" and sampler.temperature:
            continue
        target = RecordingModel(inner)
        prompt = [1, 2, 3]
        out = run(method, target, draft, prompt, 30, gamma=3, sampler=sampler, seed=1).tokens
        final = prompt + out
        assert target.seen[0] == [] and len(target.seen) > 3  # the prefill, then the rounds
        for hist in target.seen[1:]:
            assert len(hist) >= len(prompt) and hist == final[: len(hist)], (hist, final)


def test_table_truncate_then_extend_equals_a_fresh_prefill():
    model = TableModel(random_table(7, seed=0))
    _, state = model.prefill(np.array([1, 2, 3, 4]))
    logits, again = model.extend(model.truncate(state, 2), np.array([5, 6]))
    fresh, _ = model.prefill(np.array([1, 2, 5, 6]))
    np.testing.assert_array_equal(logits, fresh[2:])
    assert TableModel.history(again) == [1, 2, 5, 6]
    assert TableModel.history(state) == [1, 2, 3, 4]  # states are values


# --------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("method", METHODS)
def test_a_draft_with_another_vocabulary_is_a_usage_error(method):
    target, draft = TableModel(random_table(5, seed=0)), TableModel(random_table(6, seed=1))
    with pytest.raises(UsageError, match="vocabulary of 6 tokens but the target 'table' has 5"):
        run(method, target, draft, [1], 5)
    assert UsageError.exit_code == 2


def test_bad_arguments_are_usage_errors():
    target = TableModel(random_table(4, seed=0))
    with pytest.raises(UsageError, match="gamma"):
        speculative_generate(target, target, [1], 5, gamma=0)
    with pytest.raises(UsageError, match="prompt"):
        speculative_generate(target, target, [], 5)
    with pytest.raises(UsageError, match="max_new_tokens"):
        pearl_generate(target, target, [1], 0)
    with pytest.raises(UsageError, match="num_candidates"):
        batch_speculative_generate(target, target, [1], 5, num_candidates=0)
    with pytest.raises(UsageError, match="validation"):
        stairs_generate(target, target, [1], 5, validation="diagonal")


# --------------------------------------------------------------------------- real backends
@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """The seeded tiny Llama (target) with two drafts of the same architecture: a random one
    (re-initialised with another seed) and a close one (target + small Gaussian noise)."""
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    from accelc.families.tiny import build

    root = tmp_path_factory.mktemp("spec")
    target_dir = build("tiny-llama", root / "target")
    drafts = {}
    for name, sigma in (("random", None), ("close", 0.01)):
        model = AutoModelForCausalLM.from_pretrained(target_dir)
        torch.manual_seed(1)
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() >= 2:
                    p.copy_(torch.randn_like(p) * 0.15) if sigma is None else p.add_(torch.randn_like(p) * sigma)
        model.save_pretrained(root / name, safe_serialization=True)
        drafts[name] = root / name
    return root, target_dir, drafts


def _torch_model(path):
    from transformers import AutoModelForCausalLM

    from accelc.runtime.torch_backend import TorchStepModel

    return TorchStepModel(AutoModelForCausalLM.from_pretrained(path))


@pytest.fixture(scope="module")
def torch_models(llama):
    _, target_dir, drafts = llama
    return _torch_model(target_dir), {k: _torch_model(v) for k, v in drafts.items()}


@pytest.fixture(scope="module")
def ort_models(llama):
    pytest.importorskip("onnxruntime")
    from accelc.compiler.optimum_adapter import export_decoder_with_past
    from accelc.families.causal_lm import load_model
    from accelc.runtime.ort_backend import OrtStepModel

    root, target_dir, drafts = llama
    options = {"intra_op_threads": 1}
    graph = export_decoder_with_past(load_model(target_dir), target_dir, root / "onnx-target", opset=None)
    close = export_decoder_with_past(load_model(drafts["close"]), drafts["close"], root / "onnx-close", opset=None)
    return OrtStepModel(graph, options), OrtStepModel(close, options)


PROMPTS = [[72, 101, 108, 108, 111], [3, 1, 4, 1, 5, 9, 2, 6], [200]]


@pytest.mark.parametrize("backend", ["torch", "ort"])
def test_truncate_then_extend_equals_a_fresh_prefill_on_real_backends(backend, request):
    model = (
        request.getfixturevalue("torch_models")[0] if backend == "torch" else request.getfixturevalue("ort_models")[0]
    )
    ids = np.array([5, 17, 99, 3, 42, 7, 64], dtype=np.int64)
    _, state = model.prefill(ids)
    cut = model.truncate(state, 4)
    assert cut.length == 4
    logits, again = model.extend(cut, np.array([11, 12, 13], dtype=np.int64))
    fresh, fresh_state = model.prefill(np.concatenate([ids[:4], [11, 12, 13]]))
    np.testing.assert_allclose(logits, fresh[4:], atol=1e-4)
    for a, b in zip(model.kv_numpy(again), model.kv_numpy(fresh_state)):
        np.testing.assert_allclose(a, b, atol=1e-4)
    # the untruncated state is still intact (states are values): extend it as if nothing happened
    tail, _ = model.extend(state, np.array([1], dtype=np.int64))
    full, _ = model.prefill(np.concatenate([ids, [1]]))
    np.testing.assert_allclose(tail[-1], full[-1], atol=1e-4)


@pytest.mark.parametrize("method", METHODS)
def test_greedy_equality_on_torch_with_random_and_close_drafts(method, torch_models):
    target, drafts = torch_models
    for prompt in PROMPTS:
        expected = generate(target, prompt, 20).tokens
        for name, draft in drafts.items():
            got = run(method, target, draft, prompt, 20, gamma=4)
            assert got.tokens == expected, (method, name, prompt)
    assert run(method, target, target, PROMPTS[0], 20, gamma=4).stats["rejections"] == 0


def test_greedy_equality_through_onnx_runtime(ort_models, torch_models):
    """Every method on exported graphs (ORT target, ORT draft; PEARL on two threads), and once
    with a torch draft for an ORT target: the protocol hides the backend."""
    target, draft = ort_models
    for prompt in PROMPTS[:2]:
        expected = generate(target, prompt, 20).tokens
        for method in METHODS:
            assert run(method, target, draft, prompt, 20, gamma=3, concurrent=True).tokens == expected, method
        assert run("speculative", target, torch_models[1]["random"], prompt, 20, gamma=3).tokens == expected


@pytest.fixture(scope="module")
def fused_target(llama):
    """The target as a fused ONNX graph: ORT keeps its KV cache in place."""
    pytest.importorskip("onnxruntime")
    from accelc.compiler import fused_decoder
    from accelc.families.causal_lm import load_model
    from accelc.runtime.ort_backend import OrtStepModel

    root, target_dir, _ = llama
    model = OrtStepModel(fused_decoder.build(load_model(target_dir), root / "fused"), {"intra_op_threads": 1})
    assert model.in_place
    return model


@pytest.mark.parametrize("method", METHODS)
def test_a_draft_of_the_target_weights_can_start_from_the_target_prompt_cache(method, torch_models, fused_target):
    """prompt_kv_from_target: the draft adopts the target's prompt KV (torch -> in-place ORT, and
    ORT -> torch) instead of prefilling. Output stays the target's; with the target's own weights
    as draft the draft does exactly the same work minus the prompt."""
    torch_target = torch_models[0]
    prompt = PROMPTS[1]
    expected = generate(torch_target, prompt, 20).tokens
    for target, draft in ((torch_target, fused_target), (fused_target, torch_target)):
        own = run(method, target, draft, prompt, 20, gamma=3)
        adopted = run(method, target, draft, prompt, 20, gamma=3, prompt_kv_from_target=True)
        assert own.tokens == adopted.tokens == expected, method
        assert adopted.stats["rejections"] == own.stats["rejections"] == 0
        assert own.stats["draft_tokens_fed"] - adopted.stats["draft_tokens_fed"] == len(prompt)
        assert own.stats["draft_calls"] - adopted.stats["draft_calls"] == 1


def test_a_prompt_cache_of_another_layout_is_refused(torch_models, fused_target):
    target = torch_models[0]
    _, state = target.prefill(np.array(PROMPTS[0]))
    kv = target.kv_numpy(state)
    for model in (target, fused_target):
        assert model.state_from_kv(kv).length == len(PROMPTS[0])
        with pytest.raises(UsageError, match="cannot seed a model"):
            model.state_from_kv(kv[:-2])
        with pytest.raises(UsageError, match="cannot seed a model"):
            model.state_from_kv([t[:, :1] for t in kv])


def test_sampling_on_torch_is_reproducible_and_thread_independent(torch_models):
    target, drafts = torch_models
    sampler = Sampler(temperature=0.8, top_p=0.95)
    a = pearl_generate(target, drafts["close"], PROMPTS[1], 16, gamma=3, sampler=sampler, seed=5, concurrent=True)
    b = pearl_generate(target, drafts["close"], PROMPTS[1], 16, gamma=3, sampler=sampler, seed=5, concurrent=False)
    c = speculative_generate(target, drafts["close"], PROMPTS[1], 16, gamma=3, sampler=sampler, seed=5)
    d = speculative_generate(target, drafts["close"], PROMPTS[1], 16, gamma=3, sampler=sampler, seed=5)
    assert a.tokens == b.tokens and len(a.tokens) == 16
    assert c.tokens == d.tokens


def test_alpha_of_the_tiny_llama_against_itself_is_one(torch_models):
    """The cost model on a real model (its own tests live in test_cost_model.py)."""
    from accelc.loops.calibration import estimate_alpha

    target, drafts = torch_models
    for sampler in (Sampler(), Sampler(temperature=1.0)):
        for adopt in (False, True):  # either way the token the target's prefill commits is not drafted
            est = estimate_alpha(
                target, target, [PROMPTS[0]], sampler=sampler, new_tokens=8, prompt_kv_from_target=adopt
            )
            assert est.alpha == pytest.approx(1.0, abs=1e-6) and est.positions == 7
    assert estimate_alpha(target, drafts["random"], [PROMPTS[0]], new_tokens=8).alpha < 0.5
