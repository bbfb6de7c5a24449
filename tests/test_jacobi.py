"""Jacobi and lookahead decoding (loops/jacobi.py, loops/lookahead.py): the greedy output exactly,
on table models and on the tiny Llama through torch and ONNX Runtime (with prompt lookup too),
call accounting, the n-gram pool, and bad options."""

from __future__ import annotations

import numpy as np
import pytest
from test_lookup import looping_pair
from test_speculative import PROMPTS, TableModel, llama, ort_models, random_table, torch_models  # noqa: F401

from accelc.errors import UsageError
from accelc.loops.autoregressive import generate
from accelc.loops.jacobi import JacobiOptions, jacobi_generate
from accelc.loops.lookahead import LookaheadOptions, NgramPool, lookahead_generate
from accelc.loops.lookup import Lookup
from accelc.loops.plan import DecodePlan, run_plan

VARIANTS = {
    "jacobi": lambda m, p, n, **kw: jacobi_generate(m, p, n, **kw),
    "lookahead": lambda m, p, n, **kw: lookahead_generate(m, p, n, **kw),
    "lookahead+lookup": lambda m, p, n, **kw: lookahead_generate(m, p, n, lookup=Lookup(), **kw),
    "lookahead N=2 W=3 G=1": lambda m, p, n, **kw: lookahead_generate(m, p, n, ngram=2, window=3, guess_set=1, **kw),
    "lookahead G=0": lambda m, p, n, **kw: lookahead_generate(m, p, n, guess_set=0, **kw),
}


def check_accounting(result, max_new_tokens: int) -> None:
    stats = result.stats
    assert stats["target_calls"] == 1 + len(stats["call_tokens_fed"])
    assert sum(stats["call_tokens_committed"]) == len(result.tokens) - 1  # the first comes from the prefill
    assert all(1 <= c <= f for c, f in zip(stats["call_tokens_committed"], stats["call_tokens_fed"]))
    assert stats["tokens_per_call"] >= 1.0
    assert len(result.tokens) <= max_new_tokens


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_output_is_the_greedy_output_on_table_models(variant):
    for case in range(8):
        model = looping_pair(case)[0] if case % 2 else TableModel(random_table(12, seed=case, scale=2.0))
        prompt = [case % 10, (3 * case + 1) % 10, 2]
        for budget in (1, 2, 7, 40):
            expected = generate(model, prompt, budget).tokens
            got = VARIANTS[variant](model, prompt, budget)
            assert got.tokens == expected, (variant, case, budget)
            check_accounting(got, budget)


@pytest.mark.parametrize("variant", ["jacobi", "lookahead+lookup"])
def test_generation_stops_at_eos_exactly(variant):
    model, _ = looping_pair(3)
    prompt = [3, 4]
    full = generate(model, prompt, 40).tokens
    eos = full[5]
    expected = generate(model, prompt, 40, eos_ids=(eos,)).tokens
    assert expected[-1] == eos and len(expected) <= 6
    assert VARIANTS[variant](model, prompt, 40, eos_ids=(eos,)).tokens == expected


def test_a_window_of_one_is_greedy_decoding_one_token_a_call():
    model, _ = looping_pair(1)
    expected = generate(model, [1, 2], 30)
    for result in (
        jacobi_generate(model, [1, 2], 30, window=1),
        lookahead_generate(model, [1, 2], 30, window=1, guess_set=0),
    ):
        assert result.tokens == expected.tokens
        assert result.stats["target_calls"] == expected.stats["target_calls"] == 30
        assert set(result.stats["call_tokens_fed"]) == {1} and result.stats["tokens_per_call"] == 1.0


def test_the_pool_and_the_copies_put_more_tokens_in_each_call_than_the_plain_window():
    """Greedy text of a table model falls into cycles: the n-grams of the window's trajectories
    (and copies from the context) predict them, the plain Jacobi window mostly does not."""
    per_call = {"jacobi": [], "lookahead": [], "lookahead+lookup": []}
    accepted_from_candidates = 0
    for case in range(8):
        model, _ = looping_pair(case)
        for name in per_call:
            result = VARIANTS[name](model, [case % 10, (7 * case + 3) % 10], 64)
            per_call[name].append(result.stats["tokens_per_call"])
            accepted_from_candidates += result.stats.get("candidate_tokens_accepted", 0)
    mean = {k: float(np.mean(v)) for k, v in per_call.items()}
    assert mean["lookahead"] > 1.3 * mean["jacobi"], mean
    assert mean["lookahead+lookup"] > mean["jacobi"], mean
    assert accepted_from_candidates > 50


def test_the_pool_keeps_the_freshest_g_continuations_per_first_token():
    pool = NgramPool(ngram=3, guess_set=2)
    for gram in ((1, 2, 3), (1, 4, 5), (1, 2, 3), (1, 6, 7), (2, 1, 1)):
        pool.add(gram)
    assert pool.candidates(1) == [(6, 7), (2, 3)]
    assert pool.candidates(2) == [(1, 1)] and pool.candidates(9) == [] and len(pool) == 3
    empty = NgramPool(ngram=3, guess_set=0)
    empty.add((1, 2, 3))
    assert len(empty) == 0


@pytest.mark.parametrize(
    "options, message",
    [
        ({"ngram": 1}, "N must be an integer >= 2"),
        ({"window": 0}, "window must be a whole number of tokens >= 1"),
        ({"guess_set": -1}, "G .* must be an integer >= 0"),
        ({"window": 2.5}, "window must be a whole number"),
    ],
)
def test_bad_lookahead_options_are_usage_errors_with_the_reason(options, message):
    model, _ = looping_pair(0)
    with pytest.raises(UsageError, match=message) as caught:
        lookahead_generate(model, [1], 5, **options)
    assert caught.value.exit_code == 2
    with pytest.raises(UsageError, match=message):
        LookaheadOptions(**options)
    plan = DecodePlan(strategy="lookahead", **options)
    with pytest.raises(UsageError, match=message):
        run_plan(plan, model, None, [1], 5)


def test_bad_plan_values_and_sampling_are_refused():
    model, _ = looping_pair(0)
    with pytest.raises(UsageError, match="window"):
        jacobi_generate(model, [1], 5, window=0)
    with pytest.raises(UsageError, match="window must be a whole number"):
        JacobiOptions.from_plan(DecodePlan(strategy="jacobi", window="7"))
    for strategy in ("jacobi", "lookahead"):
        with pytest.raises(UsageError, match="greedy only"):
            run_plan(DecodePlan(strategy=strategy, sampling=True), model, None, [1], 5)


def test_a_plan_runs_the_loops_with_its_settings():
    model, _ = looping_pair(2)
    expected = generate(model, [2, 3], 40).tokens
    plan = DecodePlan(
        strategy="lookahead", window=4, ngram=3, guess_set=2, lookup={"tokens": 4, "max_ngram": 2, "min_ngram": 2}
    )
    result = run_plan(plan, model, None, [2, 3], 40)
    assert result.tokens == expected
    assert (result.stats["window"], result.stats["ngram"], result.stats["guess_set"]) == (4, 3, 2)
    assert result.stats["lookup"] == {"tokens": 4, "max_ngram": 2, "min_ngram": 2}
    result = run_plan(DecodePlan(strategy="jacobi", window=3), model, None, [2, 3], 40)
    assert result.tokens == expected and max(result.stats["call_tokens_fed"]) == 3


@pytest.mark.parametrize("backend", ["torch", "ort"])
def test_greedy_equality_on_the_tiny_llama(backend, request):
    """Real KV caches: the accepted guesses' positions are kept and the rest truncated, call after call."""
    model = request.getfixturevalue("torch_models" if backend == "torch" else "ort_models")[0]
    for prompt in PROMPTS:
        expected = generate(model, prompt, 24).tokens
        for name in ("jacobi", "lookahead", "lookahead+lookup"):
            got = VARIANTS[name](model, prompt, 24)
            assert got.tokens == expected, (backend, name, prompt)
            check_accounting(got, 24)
