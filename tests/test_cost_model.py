"""The cost model: alpha from paired logits, cost ratio timing, gamma choice and its fallback."""

from __future__ import annotations

import time

import numpy as np
import pytest
from test_speculative import TableModel, noisy, random_table, unigram

from accelc.errors import UsageError
from accelc.loops.acceptance import tv_distance
from accelc.loops.autoregressive import Sampler
from accelc.loops.calibration import CALIBRATION_NEW_TOKENS, acceptance_from_logits, estimate_alpha
from accelc.loops.replay import (
    GAMMA_MAX,
    batch_predicted_speedup,
    choose_gamma,
    choose_pearl_gamma,
    expected_accepted_length,
    pearl_predicted_speedup,
    predicted_speedup,
    replayed_speedup,
)
from accelc.loops.timing import measure_cost_ratio

ALPHAS = [0.0, 0.2, 0.5, 0.7, 0.8, 0.9, 0.95, 1.0]
COSTS = [0.0, 0.01, 0.05, 0.1, 0.3, 0.6, 1.0, 2.0]


def test_alpha_of_a_draft_equal_to_the_target_is_one():
    table = random_table(6, seed=0)
    for sampler in (Sampler(), Sampler(temperature=1.0), Sampler(temperature=0.7, top_p=0.9)):
        est = estimate_alpha(TableModel(table), TableModel(table.copy()), [[1, 2], [3]], sampler=sampler)
        assert est.alpha == pytest.approx(1.0, abs=1e-12) and est.positions == 2 * (CALIBRATION_NEW_TOKENS - 1)


def test_alpha_of_a_unigram_pair_is_one_minus_tv():
    p_logits, q_logits = np.log([0.6, 0.3, 0.1]), np.log([0.2, 0.5, 0.3])
    sampler = Sampler(temperature=1.0)
    est = estimate_alpha(unigram(p_logits), unigram(q_logits), [[0], [1, 2]], sampler=sampler, new_tokens=8)
    assert est.alpha == pytest.approx(1 - tv_distance(sampler.probs(p_logits), sampler.probs(q_logits)))
    assert estimate_alpha(unigram(p_logits), unigram(q_logits), [[0]]).alpha == 0.0  # greedy: argmaxes differ


def test_alpha_predicts_the_measured_acceptance_rate():
    from accelc.loops.speculative import speculative_generate

    target = TableModel(random_table(6, seed=1))
    draft = TableModel(noisy(target.table, seed=2, sigma=0.6))
    sampler = Sampler(temperature=1.0)
    prompts = [[i] for i in range(6)]
    est = estimate_alpha(target, draft, prompts, sampler=sampler, new_tokens=200)
    acc = ver = 0
    for seed in range(10):
        r = speculative_generate(target, draft, [seed % 6], 150, gamma=3, sampler=sampler, seed=seed)
        acc, ver = acc + r.stats["accepted"], ver + r.stats["verified"]
    assert 0.3 < est.alpha < 0.95
    assert acc / ver == pytest.approx(est.alpha, abs=0.05)


def test_acceptance_from_logits_rejects_mismatched_pairs():
    with pytest.raises(UsageError, match="shape"):
        acceptance_from_logits(np.zeros((3, 4)), np.zeros((3, 5)))


def test_expected_length_and_speedup_formulas():
    assert expected_accepted_length(1.0, 4) == 5.0
    assert expected_accepted_length(0.0, 4) == 1.0
    assert expected_accepted_length(0.5, 2) == pytest.approx(1.75)
    assert predicted_speedup(0.5, 2, 0.1) == pytest.approx(1.75 / 1.2)
    assert predicted_speedup(0.5, 2, 0.1, verify_cost=lambda g: 1.5) == pytest.approx(1.75 / 1.7)
    # PEARL: a perfect draft commits gamma tokens a round for the price of the slower worker
    assert pearl_predicted_speedup(1.0, 4, 0.1) == pytest.approx(4.0)
    assert pearl_predicted_speedup(0.0, 4, 0.1) == pytest.approx(1.0)
    assert pearl_predicted_speedup(0.8, 5, 0.2) > predicted_speedup(0.8, 5, 0.2)
    with pytest.raises(UsageError):
        predicted_speedup(1.2, 2, 0.1)


def test_gamma_choice_is_the_brute_force_argmax():
    for alpha in ALPHAS:
        for c in COSTS:

            def s(g):
                if alpha == 1.0:
                    return (g + 1) / (g * c + 1)
                return (1 - alpha ** (g + 1)) / ((1 - alpha) * (g * c + 1))

            best = max(range(1, GAMMA_MAX + 1), key=lambda g: (s(g), -g))
            choice = choose_gamma(alpha, c)
            assert choice.gamma == best and choice.predicted_speedup == pytest.approx(s(best))
            # a gain is possible iff alpha > c (arXiv 2211.17192, corollary 3.9)
            assert (choice.method == "speculative") == (alpha > c), (alpha, c)
            pearl = choose_pearl_gamma(alpha, c)
            assert pearl.predicted_speedup == pytest.approx(
                max(pearl_predicted_speedup(alpha, g, c) for g in range(1, GAMMA_MAX + 1))
            )


def test_large_draft_cost_falls_back_to_autoregressive():
    choice = choose_gamma(0.8, 0.9)
    assert choice.method == "autoregressive"
    assert "no gain" in choice.reason and choice.predicted_speedup <= 1.0
    assert choose_gamma(0.8, 0.05, verify_cost=5.0).method == "autoregressive"  # a slow verifier too
    d = choose_gamma(0.9, 0.05).to_dict()
    assert d["method"] == "speculative" and d["curve"]["1"] > 1.0


class Slow(TableModel):
    def __init__(self, table, seconds):
        super().__init__(table)
        self.seconds = seconds

    def extend(self, state, ids):
        time.sleep(self.seconds)
        return super().extend(state, ids)


def test_cost_ratio_is_measured_per_decode_step():
    table = random_table(4, seed=0)
    m = measure_cost_ratio(Slow(table, 0.010), Slow(table, 0.0025), [1, 2], steps=4, repeats=3, verify_lengths=(1, 4))
    # sleeps only ever overshoot, and a busy shared machine makes them jitter: loose bounds
    assert 0.1 < m.cost_ratio < 0.5
    assert 0.5 < m.verify_cost[1] < 2.0 and 0.5 < m.verify(3) < 2.0
    assert set(m.to_dict()) == {
        "cost_ratio",
        "target_step_seconds",
        "draft_step_seconds",
        "verify_cost",
        "catchup_cost",
        "baseline_ratio",
        "catchup_costs",
    }
    assert 0.1 < m.catchup_cost < 0.5  # the draft's two-token call: one sleep of the draft, in target steps
    assert m.catchup_costs == {2: m.catchup_cost} and m.catchup(9) == m.catchup(2) and m.catchup(1) == m.cost_ratio
    assert m.baseline_ratio is None
    # a baseline timed in the same repeats: the target's step over it (PEARL's worker slowdown)
    paired = measure_cost_ratio(
        Slow(table, 0.010), Slow(table, 0.0025), [1, 2], steps=4, repeats=3, baseline=Slow(table, 0.005)
    )
    assert 1.3 < paired.baseline_ratio < 3.0


def test_concurrent_costs_time_each_model_while_the_other_decodes():
    class Counting(Slow):
        calls = 0

        def extend(self, state, ids):
            type(self).calls += 1
            return super().extend(state, ids)

    table = random_table(4, seed=0)
    calls = {}
    for concurrent in (False, True):
        Counting.calls = 0
        m = measure_cost_ratio(
            Slow(table, 0.010), Counting(table, 0.0025), [1, 2], steps=4, repeats=3, concurrent=concurrent
        )
        calls[concurrent] = Counting.calls
        assert 0.1 < m.cost_ratio < 0.5  # sleeps do not contend for the machine: c is unchanged
    # timing the target (3 repeats x 4 steps of 10 ms) kept the draft busy for ~120 ms more
    assert calls[True] > calls[False] + 20


def test_vocabulary_mismatch_is_a_usage_error():
    with pytest.raises(UsageError, match="vocabulary"):
        estimate_alpha(TableModel(random_table(4, seed=0)), TableModel(random_table(5, seed=0)), [[1]])
    with pytest.raises(UsageError, match="vocabulary"):
        measure_cost_ratio(TableModel(random_table(4, seed=0)), TableModel(random_table(5, seed=0)), [1])


@pytest.mark.parametrize("alpha,gamma,c", [(0.3, 1, 0.2), (0.7, 4, 0.5), (0.9, 3, 0.05)])
def test_batch_prediction_with_one_candidate_is_plain_speculative(alpha, gamma, c):
    one = batch_predicted_speedup(alpha, gamma, c, 1.1, candidates=1)
    assert one == pytest.approx(predicted_speedup(alpha, gamma, c, 1.1))
    # a second candidate raises acceptance; at gamma=1 it shares the one draft call
    two = batch_predicted_speedup(alpha, 1, c, 1.0, candidates=2)
    assert two > 0


def test_pearl_workers_slowdown_scales_the_curve_and_can_force_fallback():
    alone = choose_pearl_gamma(0.8, 0.3, gamma_max=6)
    shared = choose_pearl_gamma(0.8, 0.3, gamma_max=6, worker_slowdown=2.0)
    assert shared.curve == pytest.approx({g: s / 2.0 for g, s in alone.curve.items()})
    assert alone.method == "pearl"
    slow = choose_pearl_gamma(0.8, 0.3, gamma_max=6, worker_slowdown=max(alone.curve.values()) * 1.01)
    assert slow.method == "autoregressive"
    with pytest.raises(UsageError):
        choose_pearl_gamma(0.8, 0.3, worker_slowdown=0)


@pytest.mark.parametrize("alpha,gamma", [(0.5, 1), (0.8, 3), (0.95, 6), (1.0, 4)])
def test_replay_of_constant_acceptance_is_the_iid_formula(alpha, gamma):
    # beta = alpha at every position is R6's assumption; only the end of the trajectory (the
    # loop never drafts past the budget) differs, by O(gamma / length)
    replayed = replayed_speedup([np.full(20_000, alpha)], gamma, 0.2, verify_cost=1.3)
    assert replayed == pytest.approx(predicted_speedup(alpha, gamma, 0.2, 1.3), rel=2e-3)


@pytest.mark.parametrize("gamma", [1, 3, 5])
def test_greedy_replay_prices_the_loops_own_rounds_and_calls(gamma):
    """Greedy acceptance is deterministic, so replaying the measured trajectories must count
    exactly the rounds, draft calls and two-token catch-up calls that speculative_generate makes."""
    from accelc.loops.speculative import speculative_generate

    target = TableModel(random_table(8, seed=3))
    draft = TableModel(noisy(target.table, seed=4, sigma=0.7))
    prompts, new_tokens, c, c2 = [[1, 2], [5], [7, 0, 3]], 40, 0.3, 0.45
    est = estimate_alpha(target, draft, prompts, new_tokens=new_tokens)
    assert 0.3 < est.alpha < 0.95  # a draft that is right often, and wrong often enough to matter
    positions = cost = 0.0
    for prompt in prompts:
        stats = speculative_generate(target, draft, prompt, new_tokens, gamma=gamma).stats
        one_token_calls = stats["draft_calls"] - 1  # every call but the prefill feeds 1 token ...
        catchups = stats["draft_tokens_fed"] - len(prompt) - one_token_calls  # ... or 2
        positions += new_tokens - 1  # the first token comes from the prefill
        cost += stats["rounds"] + c * stats["drafted"] + (c2 - c) * catchups
    assert replayed_speedup(est.trajectories, gamma, c, 1.0, catchup_cost=c2) == pytest.approx(positions / cost)


@pytest.mark.parametrize("gamma, candidates", [(1, 2), (3, 2), (4, 3)])
def test_greedy_batch_replay_prices_the_loops_own_rounds_and_calls(gamma, candidates):
    """Greedy batch speculative is deterministic too: with the k candidates' first-position
    acceptance recorded, the replay counts exactly its rounds, draft calls (1 + k (g - 1) a
    round), catch-up calls and the target's extra call for a path other than candidate 0's."""
    from accelc.loops.batch_speculative import batch_speculative_generate
    from accelc.loops.replay import batch_replayed_speedup

    target = TableModel(random_table(8, seed=11))
    draft = TableModel(noisy(target.table, seed=12, sigma=1.0))
    prompts, new_tokens, c, c2 = [[1, 2], [4], [6, 0, 3]], 40, 0.3, 0.45
    est = estimate_alpha(target, draft, prompts, new_tokens=new_tokens, candidates=candidates)
    assert all((f >= b).all() for f, b in zip(est.first_accepts, est.trajectories))
    assert sum(f.sum() - b.sum() for f, b in zip(est.first_accepts, est.trajectories)) > 3  # later candidates matter
    positions = cost = 0.0
    for prompt in prompts:
        stats = batch_speculative_generate(
            target, draft, prompt, new_tokens, gamma=gamma, num_candidates=candidates
        ).stats
        positions += new_tokens - 1
        cost += (stats["target_calls"] - 1) + c * (stats["draft_calls"] - 1) + (c2 - c) * stats["draft_catchup_calls"]
    replayed = batch_replayed_speedup(est.trajectories, est.first_accepts, gamma, c, candidates, 1.0, catchup_cost=c2)
    assert replayed == pytest.approx(positions / cost)


@pytest.mark.parametrize("start", [1, 3, 5])
def test_greedy_replay_of_the_stairs_schedule_prices_its_rounds_and_calls(start):
    """The same exact count for stairs, whose draft length moves every round (next_candidates)."""
    from accelc.loops.stairs import next_candidates, stairs_generate

    target = TableModel(random_table(8, seed=5))
    draft = TableModel(noisy(target.table, seed=6, sigma=0.5))
    prompts, new_tokens, c, c2 = [[1, 2], [4], [6, 0, 3]], 48, 0.25, 0.4
    est = estimate_alpha(target, draft, prompts, new_tokens=new_tokens)
    positions = cost = 0.0
    for prompt in prompts:
        stats = stairs_generate(target, draft, prompt, new_tokens, candidates=start).stats
        one_token_calls = stats["draft_calls"] - 1
        catchups = stats["draft_tokens_fed"] - len(prompt) - one_token_calls
        positions += new_tokens - 1
        cost += stats["rounds"] + c * stats["drafted"] + (c2 - c) * catchups
    replayed = replayed_speedup(est.trajectories, start, c, 1.0, catchup_cost=c2, schedule=next_candidates)
    assert replayed == pytest.approx(positions / cost)
    assert replayed != pytest.approx(replayed_speedup(est.trajectories, start, c, 1.0, catchup_cost=c2))


@pytest.mark.parametrize("gamma, c", [(1, 0.3), (3, 0.2), (4, 0.45)])
def test_greedy_pearl_replay_counts_the_loops_own_rounds_in_each_mode(gamma, c):
    """PEARL greedy is deterministic too: the replay prices exactly its pre- and post-verify rounds."""
    from accelc.loops.pearl import pearl_generate
    from accelc.loops.replay import pearl_replayed_speedup

    target = TableModel(random_table(8, seed=7))
    draft = TableModel(noisy(target.table, seed=8, sigma=0.6))
    prompts, new_tokens = [[1, 2], [4], [6, 0, 3]], 40

    def verify(g):  # scoring g + 1 tokens
        return 1.0 + 0.1 * g

    est = estimate_alpha(target, draft, prompts, new_tokens=new_tokens)
    positions = cost = 0.0
    for prompt in prompts:
        stats = pearl_generate(target, draft, prompt, new_tokens, gamma=gamma, concurrent=False).stats
        positions += new_tokens - 1
        cost += stats["rounds_pre"] * max(gamma * c, 1.0) + stats["rounds_post"] * max(gamma * c, verify(gamma - 1))
    assert pearl_replayed_speedup(est.trajectories, gamma, c, verify) == pytest.approx(positions / cost)


def test_replayed_gamma_choice_follows_bursty_acceptance():
    # the same mean acceptance, 0.9, in runs of 9 agreements and a miss: a draft of 9 tokens
    # fits every run exactly, while the i.i.d. model prices each draft as a fresh 0.9 coin
    bursty = [np.tile(np.r_[np.ones(9), 0.0], 40)]
    iid = choose_gamma(0.9, 0.1, gamma_max=12, verify_cost=1.0)
    replayed = choose_gamma(0.9, 0.1, gamma_max=12, verify_cost=1.0, trajectories=bursty)
    assert replayed.curve == pytest.approx({g: replayed_speedup(bursty, g, 0.1) for g in range(1, 13)})
    assert replayed.gamma == 9 and iid.gamma != 9
    assert replayed.predicted_speedup > iid.predicted_speedup
