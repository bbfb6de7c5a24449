"""Batch (multi-draft) speculative sampling: the recursive rejection step, exact output
distributions, greedy candidates, and call accounting."""

from __future__ import annotations

import math

import numpy as np
import pytest
from test_speculative import (
    DIST_DRAFT,
    DIST_TARGET,
    SAMPLES,
    TableModel,
    assert_distribution,
    exact_joint,
    random_table,
    sample_first_tokens,
)

from accelc.loops.acceptance import position_uniform, sample_index, tv_distance
from accelc.loops.autoregressive import Sampler, generate
from accelc.loops.batch_speculative import all_rejected_probability, batch_speculative_generate, recursive_rejection
from accelc.loops.speculative import speculative_generate


@pytest.mark.parametrize("m", [1, 2, 4])
def test_recursive_rejection_outputs_p_and_all_rejected_matches_the_product_of_tvs(m):
    """Recursive rejection sampling (SpecInfer, arXiv 2305.09781) at one position: output exactly p; P(all M rejected) = prod TV(r_m, q)."""
    rng = np.random.default_rng(m)
    p, q = rng.dirichlet(np.ones(6)), rng.dirichlet(np.ones(6))
    n, out, all_rejected = 20000, [], 0
    for s in range(n):
        ys = [sample_index(q, position_uniform(s, 0, 0, j)) for j in range(m)]
        tok, hit = recursive_rejection(
            p, q, ys, [position_uniform(s, 0, 1, j) for j in range(m)], position_uniform(s, 0, 2)
        )
        out.append((tok,))
        all_rejected += hit < 0
    assert_distribution(out, {(i,): float(p[i]) for i in range(6)})
    prob = all_rejected_probability(p, q, m)
    assert abs(all_rejected / n - prob) < 4 * math.sqrt(prob * (1 - prob) / n) + 1e-9
    assert prob <= tv_distance(p, q) + 1e-12  # more candidates never reject more often


@pytest.mark.parametrize(
    "gamma,k,sampler",
    [
        (2, 2, Sampler(temperature=1.0)),
        (1, 3, Sampler(temperature=1.0)),
        (2, 3, Sampler(temperature=0.7, top_k=2)),
    ],
)
def test_batch_speculative_sampling_is_distributed_as_the_target(gamma, k, sampler):
    target, draft = TableModel(DIST_TARGET), TableModel(DIST_DRAFT)
    prompt, horizon = [0, 2], 4
    exact = exact_joint(target, prompt, horizon, sampler)
    samples = sample_first_tokens(
        "batch_speculative", target, draft, prompt, horizon, SAMPLES, gamma=gamma, sampler=sampler, num_candidates=k
    )
    assert_distribution(samples, exact)


def test_more_candidates_reject_less_than_one():
    target = TableModel(random_table(6, seed=3))
    draft = TableModel(random_table(6, seed=4))
    sampler = Sampler(temperature=1.0)
    rates = {}
    for k in (1, 4):
        acc = ver = 0
        for seed in range(20):
            r = batch_speculative_generate(
                target, draft, [1], 40, gamma=2, num_candidates=k, sampler=sampler, seed=seed
            )
            acc, ver = acc + r.stats["accepted"], ver + r.stats["verified"]
        rates[k] = acc / ver
    assert rates[4] > rates[1] + 0.1


def test_one_candidate_is_speculative_sampling():
    """k = 1 is the single-draft rule with the same streams: the same tokens for the same seed."""
    target = TableModel(random_table(5, seed=7))
    draft = TableModel(random_table(5, seed=8))
    for seed in range(10):
        for sampler in (Sampler(), Sampler(temperature=1.0)):
            a = batch_speculative_generate(
                target, draft, [2], 20, gamma=3, num_candidates=1, sampler=sampler, seed=seed
            )
            b = speculative_generate(target, draft, [2], 20, gamma=3, sampler=sampler, seed=seed)
            assert a.tokens == b.tokens
            assert a.stats["target_calls"] == b.stats["target_calls"]


def test_greedy_candidates_branch_on_the_drafts_top_tokens():
    """Greedy candidates start with the draft's top-k first tokens, so a draft whose second
    choice is the target's first accepts where a single greedy draft cannot."""
    v = 6
    target_table = np.full((v + 1, v, v), -5.0)
    draft_table = np.full((v + 1, v, v), -5.0)
    for cur in range(v):
        target_table[:, cur, (cur + 1) % v] = 5.0  # target: 0 1 2 3 ...
        draft_table[:, cur, (cur + 2) % v] = 5.0  # draft's first choice is wrong ...
        draft_table[:, cur, (cur + 1) % v] = 4.0  # ... its second is right
    target, draft = TableModel(target_table), TableModel(draft_table)
    expected = generate(target, [0], 12).tokens
    one = batch_speculative_generate(target, draft, [0], 12, gamma=3, num_candidates=1)
    two = batch_speculative_generate(target, draft, [0], 12, gamma=3, num_candidates=2)
    assert one.tokens == two.tokens == expected
    assert one.stats["accepted"] == 0
    assert two.stats["accepted"] > 0  # candidate 1 starts right, then drifts back to the draft's argmax
    assert two.stats["target_calls"] <= 1 + 2 * two.stats["rounds"]  # at most k calls per round
