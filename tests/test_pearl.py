"""PEARL: exact output distribution, the pre/post-verify mode machine, the threaded schedule
against the sequential one, and the tokens-per-round model of the cost model."""

from __future__ import annotations

import numpy as np
import pytest
from test_speculative import (
    DIST_DRAFT,
    DIST_TARGET,
    SAMPLES,
    TableModel,
    assert_distribution,
    exact_joint,
    noisy,
    random_table,
    sample_first_tokens,
    unigram,
)

from accelc.loops.acceptance import tv_distance
from accelc.loops.autoregressive import Sampler, generate
from accelc.loops.pearl import pearl_generate
from accelc.loops.replay import pearl_tokens_per_round


@pytest.mark.parametrize(
    "gamma,sampler",
    [
        (1, Sampler(temperature=1.0)),
        (2, Sampler(temperature=1.0)),
        (3, Sampler(temperature=1.5, top_p=0.8)),
    ],
)
def test_pearl_sampling_is_distributed_as_the_target(gamma, sampler):
    target, draft = TableModel(DIST_TARGET), TableModel(DIST_DRAFT)
    prompt, horizon = [0, 2], 4  # prefill token, then a pre-verify round and post-verify rounds
    exact = exact_joint(target, prompt, horizon, sampler)
    samples = sample_first_tokens("pearl", target, draft, prompt, horizon, SAMPLES, gamma=gamma, sampler=sampler)
    assert_distribution(samples, exact)


def _cycle_tables(v: int, wrong_after: int | None):
    """Target greedy walks 0, 1, 2, ...; the draft agrees except after token `wrong_after`."""
    target = np.full((v + 1, v, v), -6.0)
    for cur in range(v):
        target[:, cur, (cur + 1) % v] = 6.0
    draft = target.copy()
    if wrong_after is not None:
        draft[:, wrong_after, :] = -6.0
        draft[:, wrong_after, (wrong_after + 3) % v] = 6.0
    return TableModel(target), TableModel(draft)


def test_a_draft_identical_to_the_target_never_rejects_and_stays_in_post_verify():
    for sampler in (Sampler(), Sampler(temperature=1.0)):
        target = TableModel(random_table(7, seed=2))
        r = pearl_generate(target, target, [1, 2], 40, gamma=4, sampler=sampler, seed=3, concurrent=False)
        assert r.stats["rejections"] == 0
        assert r.stats["mode_trace"] == ["pre"] + ["post"] * (r.stats["rounds"] - 1)
        assert (r.stats["pre_to_post"], r.stats["post_to_pre"]) == (1, 0)
        # post-verify commits gamma tokens a round: the adaptive run never breaks
        assert r.stats["rounds"] == 1 + -(-(40 - 2) // 4)


def test_a_draft_wrong_on_its_first_token_keeps_pre_verify_and_rolls_back():
    """Forced early rejection: every first draft is rejected, every round is pre-verify, the
    residual (target argmax) is committed and the draft's other gamma - 1 tokens are dropped."""
    target, _ = _cycle_tables(8, None)
    draft_table = np.roll(target.table, 2, axis=2)  # the draft always predicts cur + 3
    r = pearl_generate(target, TableModel(draft_table), [0], 12, gamma=3, concurrent=False)
    assert r.tokens == generate(target, [0], 12).tokens
    assert set(r.stats["mode_trace"]) == {"pre"}
    assert r.stats["accepted"] == 0 and r.stats["rejections"] == r.stats["rounds"] == 11
    assert r.stats["pre_to_post"] == r.stats["post_to_pre"] == 0


def test_a_rejection_in_post_verify_switches_back_to_pre_verify():
    target, draft = _cycle_tables(8, wrong_after=5)
    r = pearl_generate(target, draft, [0], 30, gamma=3, concurrent=False)
    assert r.tokens == generate(target, [0], 30).tokens
    trace = r.stats["mode_trace"]
    assert r.stats["post_to_pre"] >= 2 and r.stats["pre_to_post"] >= 2
    switches = sum(1 for a, b in zip(trace, trace[1:]) if (a, b) == ("post", "pre"))
    assert r.stats["post_to_pre"] - switches in (0, 1)  # the trace has no round after the last switch
    assert r.stats["rejections"] == r.stats["post_to_pre"] + trace.count("pre") - r.stats["pre_to_post"]


def test_threads_and_the_sequential_schedule_emit_the_same_tokens():
    target = TableModel(random_table(9, seed=4))
    draft = TableModel(noisy(target.table, seed=5, sigma=0.7))
    for sampler in (Sampler(), Sampler(temperature=0.9, top_k=5)):
        for seed in range(4):
            a = pearl_generate(target, draft, [3], 30, gamma=3, sampler=sampler, seed=seed, concurrent=True)
            b = pearl_generate(target, draft, [3], 30, gamma=3, sampler=sampler, seed=seed, concurrent=False)
            assert a.tokens == b.tokens
            assert a.stats["mode_trace"] == b.stats["mode_trace"]
            assert a.stats["target_calls"] == b.stats["target_calls"]


@pytest.mark.parametrize("gamma", [2, 4])
def test_tokens_per_round_match_the_derived_two_state_model(gamma):
    p_logits, q_logits = np.log([0.5, 0.3, 0.15, 0.05]), np.log([0.35, 0.35, 0.2, 0.1])
    sampler = Sampler(temperature=1.0)
    alpha = 1.0 - tv_distance(sampler.probs(p_logits), sampler.probs(q_logits))
    rounds = tokens = 0
    for seed in range(6):
        r = pearl_generate(
            unigram(p_logits), unigram(q_logits), [0], 400, gamma=gamma, sampler=sampler, seed=seed, concurrent=False
        )
        rounds += r.stats["rounds"]
        tokens += r.stats["mean_accepted_length"] * r.stats["rounds"]
    assert tokens / rounds == pytest.approx(pearl_tokens_per_round(alpha, gamma), rel=0.05)
