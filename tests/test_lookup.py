"""Drafts copied from the context (decoding/lookup.py): the matcher itself, greedy equality and
exact sampling of the loops that use it, and the replay that prices it."""
from __future__ import annotations

import pytest

from accelc.decoding.autoregressive import Sampler, generate
from accelc.decoding.lookup import Lookup, lookup_draft
from accelc.decoding.speculative import speculative_generate
from accelc.decoding.stairs import stairs_generate
from accelc.errors import UsageError

from test_speculative import (SAMPLES, TableModel, assert_distribution, exact_joint, noisy, random_table,
                              sample_first_tokens)


def test_the_longest_recurring_suffix_wins_and_its_latest_occurrence():
    lookup = Lookup(tokens=3, max_ngram=3, min_ngram=1)
    # "5 6 7" recurs at 0 and 4: the later one's continuation (9) is the freshest context
    assert lookup_draft([5, 6, 7, 8, 5, 6, 7, 9, 1, 5, 6, 7], lookup) == [9, 1, 5]
    # only "6 7" recurs: a 2-gram match
    assert lookup_draft([6, 7, 4, 4, 1, 6, 7], lookup) == [4, 4, 1]
    assert lookup_draft([6, 7, 4, 4, 1, 6, 7], lookup, limit=1) == [4]
    assert lookup_draft([6, 7, 4, 4, 1, 6, 7], lookup, limit=0) == []


def test_no_match_or_only_short_matches_give_no_draft():
    assert lookup_draft([1, 2, 3, 4], Lookup()) == []
    assert lookup_draft([3, 1, 2, 3], Lookup(min_ngram=2)) == []   # only the 1-gram "3" recurs
    assert lookup_draft([3, 1, 2, 3], Lookup(min_ngram=1)) == [1, 2, 3]
    assert lookup_draft([7], Lookup(min_ngram=1)) == []
    with pytest.raises(UsageError):
        Lookup(min_ngram=3, max_ngram=2)


def looping_pair(case: int):
    """A target whose greedy continuation falls into a cycle (tokens recur, so lookup fires) and
    a random draft that knows nothing of it."""
    target = TableModel(random_table(10, seed=300 + case, scale=3.0))
    draft = TableModel(random_table(10, seed=400 + case, scale=3.0))
    return target, draft


@pytest.mark.parametrize("loop", ["speculative", "stairs"])
def test_greedy_output_is_the_targets_with_lookup_drafts(loop):
    copied_rounds = 0
    for case in range(6):
        target, draft = looping_pair(case)
        prompt = [case % 10, (7 * case + 3) % 10]
        expected = generate(target, prompt, 48).tokens
        for lookup in (Lookup(), Lookup(tokens=2, max_ngram=1, min_ngram=1)):
            if loop == "speculative":
                got = speculative_generate(target, draft, prompt, 48, gamma=3, lookup=lookup)
            else:
                got = stairs_generate(target, draft, prompt, 48, candidates=3, lookup=lookup)
            assert got.tokens == expected, (loop, case, lookup)
            copied_rounds += got.stats["lookup_rounds"]
    assert copied_rounds > 20  # the loops really took their drafts from the context


@pytest.mark.parametrize("sampler", [Sampler(temperature=1.0), Sampler(temperature=0.7, top_k=2)])
def test_sampling_with_lookup_drafts_is_distributed_as_the_target(sampler):
    """A copied token is a draft with a one-hot q: accepted with probability p(x), else p without
    x is sampled. Over a 3-token vocabulary with 1-gram matches, most rounds are copied."""
    target = TableModel(random_table(3, seed=21))
    draft = TableModel(noisy(target.table, seed=22, sigma=1.0))
    prompt, horizon = [0, 2, 1, 0], 4
    lookup = Lookup(tokens=2, max_ngram=2, min_ngram=1)
    exact = exact_joint(target, prompt, horizon, sampler)
    samples = sample_first_tokens("speculative", target, draft, prompt, horizon, SAMPLES, gamma=2, sampler=sampler,
                                  lookup=lookup)
    assert_distribution(samples, exact)


@pytest.mark.parametrize("loop, start", [("speculative", 2), ("speculative", 5), ("stairs", 3)])
def test_greedy_replay_with_lookup_prices_the_loops_own_rounds_and_calls(loop, start):
    """Greedy, copying is deterministic too: the replay over the calibration continuations counts
    exactly the rounds, the verified positions' draft calls and the catch-up calls the loop makes."""
    from accelc.decoding.cost_model import estimate_alpha, replayed_speedup
    from accelc.decoding.stairs import next_candidates

    lookup = Lookup(tokens=4, max_ngram=2, min_ngram=1)
    c, c2, new_tokens = 0.3, 0.5, 40
    positions = cost = 0.0
    trajectories, lookups, copied_rounds = [], [], 0
    for case in range(3):
        target, draft = looping_pair(case)
        draft = TableModel(noisy(target.table, seed=case, sigma=1.5))  # right often enough to matter
        prompt = [case, (case + 4) % 10]
        est = estimate_alpha(target, draft, [prompt], new_tokens=new_tokens, lookup=lookup)
        trajectories += est.trajectories
        lookups += est.lookups
        if loop == "speculative":
            stats = speculative_generate(target, draft, prompt, new_tokens, gamma=start, lookup=lookup).stats
        else:
            stats = stairs_generate(target, draft, prompt, new_tokens, candidates=start, lookup=lookup).stats
        model_drafted = stats["draft_calls"] - 1  # after the prefill every draft call drafts one token
        positions += new_tokens - 1
        cost += stats["rounds"] + c * model_drafted + (c2 - c) * stats["draft_catchup_calls"]
        copied_rounds += stats["lookup_rounds"]
    assert 0 < copied_rounds
    schedule = next_candidates if loop == "stairs" else None
    replayed = replayed_speedup(trajectories, start, c, 1.0, catchup_cost=c2, schedule=schedule, lookups=lookups)
    assert replayed == pytest.approx(positions / cost)
