"""Drafts copied from the context (decoding/lookup.py): the matcher itself, greedy equality and
exact sampling of the loops that use it, and the replay that prices it."""

from __future__ import annotations

import numpy as np
import pytest
from test_speculative import (
    SAMPLES,
    TableModel,
    assert_distribution,
    exact_joint,
    noisy,
    random_table,
    run,
    sample_first_tokens,
)

from accelc.errors import UsageError
from accelc.loops.autoregressive import Sampler, generate
from accelc.loops.lookup import Lookup, lookup_draft


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
    assert lookup_draft([3, 1, 2, 3], Lookup(min_ngram=2)) == []  # only the 1-gram "3" recurs
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


@pytest.mark.parametrize("loop", ["speculative", "pearl", "stairs"])
def test_greedy_output_is_the_targets_with_lookup_drafts(loop):
    copied_rounds = 0
    for case in range(6):
        target, draft = looping_pair(case)
        prompt = [case % 10, (7 * case + 3) % 10]
        expected = generate(target, prompt, 48).tokens
        for lookup in (Lookup(), Lookup(tokens=2, max_ngram=1, min_ngram=1)):
            got = run(loop, target, draft, prompt, 48, gamma=3, lookup=lookup)
            assert got.tokens == expected, (loop, case, lookup)
            copied_rounds += got.stats["lookup_rounds"]
    assert copied_rounds > 20  # the loops really took their drafts from the context


@pytest.mark.parametrize(
    "loop, sampler",
    [
        ("speculative", Sampler(temperature=1.0)),
        ("speculative", Sampler(temperature=0.7, top_k=2)),
        ("pearl", Sampler(temperature=1.0)),
    ],
)
def test_sampling_with_lookup_drafts_is_distributed_as_the_target(loop, sampler):
    """A copied token is a draft with a one-hot q: accepted with probability p(x), else p without
    x is sampled. Over a 3-token vocabulary with 1-gram matches, most rounds are copied."""
    target = TableModel(random_table(3, seed=21))
    draft = TableModel(noisy(target.table, seed=22, sigma=1.0))
    prompt, horizon = [0, 2, 1, 0], 4
    lookup = Lookup(tokens=2, max_ngram=2, min_ngram=1)
    exact = exact_joint(target, prompt, horizon, sampler)
    samples = sample_first_tokens(
        loop, target, draft, prompt, horizon, SAMPLES, gamma=2, sampler=sampler, lookup=lookup
    )
    assert_distribution(samples, exact)


@pytest.mark.parametrize("loop, start", [("speculative", 2), ("speculative", 5), ("stairs", 3)])
def test_greedy_replay_with_lookup_prices_the_loops_own_rounds_and_calls(loop, start):
    """Greedy, copying is deterministic too: the replay over the calibration continuations counts
    exactly the rounds and the draft's calls the loop makes, each call priced by the tokens it
    feeds (a catch-up after copied rounds feeds every token the draft skipped)."""
    from accelc.loops.calibration import estimate_alpha
    from accelc.loops.replay import replayed_speedup
    from accelc.loops.stairs import next_candidates

    lookup = Lookup(tokens=4, max_ngram=2, min_ngram=1)
    c, new_tokens = 0.3, 40

    def draft_call(m):  # a draft call feeding m tokens, in target steps
        return c * (1.0 + 0.15 * (m - 1))

    positions = cost = 0.0
    trajectories, lookups, copied_rounds, longest = [], [], 0, 0
    for case in range(6):
        target, _ = looping_pair(case)
        draft = FeedLog(noisy(target.table, seed=case, sigma=1.5))  # right often enough to matter
        prompt = [case, (case + 4) % 10]
        est = estimate_alpha(target, TableModel(draft.table), [prompt], new_tokens=new_tokens, lookup=lookup)
        trajectories += est.trajectories
        lookups += est.lookups
        stats = run(loop, target, draft, prompt, new_tokens, gamma=start, lookup=lookup).stats
        positions += new_tokens - 1
        cost += stats["rounds"] + sum(draft_call(m) for m in draft.fed[1:])  # after the prefill
        copied_rounds += stats["lookup_rounds"]
        longest = max(longest, *draft.fed[1:])
    assert copied_rounds > 0 and longest > 2  # some catch-up fed more than a two-token call does
    schedule = next_candidates if loop == "stairs" else None
    replayed = replayed_speedup(
        trajectories, start, c, 1.0, catchup_cost=draft_call, schedule=schedule, lookups=lookups
    )
    assert replayed == pytest.approx(positions / cost)


class FeedLog(TableModel):
    """A TableModel that logs how many tokens each call fed (a round's target call)."""

    def __init__(self, table):
        super().__init__(table)
        self.fed: list[int] = []

    def extend(self, state, ids):
        self.fed.append(int(np.asarray(ids).size))
        return super().extend(state, ids)


@pytest.mark.parametrize("sigma", [0.0, 1.5])
@pytest.mark.parametrize(
    "gamma, c, c2, slope",
    [(1, 0.3, 0.5, 0.1), (3, 0.2, 0.2, 0.0), (4, 0.45, 0.45, 0.0), (3, 0.2, 0.5, 0.1), (4, 0.45, 0.5, 0.0)],
)
def test_greedy_pearl_replay_with_lookup_prices_each_round_it_runs(gamma, c, c2, slope, sigma):
    """PEARL's rounds of copied drafts verify U and the copies alone (no draft call), the others
    run both workers: the replay counts the rounds the loop runs and prices each, a copied round
    at the alone cost of the tokens the target fed, a parallel one at max(draft work, v(tokens
    fed - 1)), the draft's work being gamma calls, the first priced by the tokens it fed (all it
    skipped during copied rounds). The one thing the replay cannot know is what a lookup finds
    after a U that holds a wrong draft (the loop looks after whatever U is; the replay sees the
    target's tokens there, and whether there is a match decides the round's kind), so with
    gamma > 1 and a draft that errs the replay is within a few percent; with a draft that never
    errs (the target's own table) it is exact."""
    from accelc.loops.calibration import estimate_alpha
    from accelc.loops.replay import pearl_replayed_speedup

    lookup = Lookup(tokens=4, max_ngram=2, min_ngram=1)
    new_tokens = 40

    def verify(g):  # the workers' target scoring g + 1 tokens
        return 1.0 + slope * g

    def alone(g):  # the same alone, on all cores
        return 0.6 * verify(g)

    def draft_call(m):  # the draft feeding m tokens in one call: c2 for two, a quarter of that step for each more
        return c if m == 1 else c2 + 0.25 * (c2 - c) * (m - 2)

    positions = cost = 0.0
    trajectories, lookups, copied_rounds = [], [], 0
    for case in range(3):
        target, _ = looping_pair(case)
        draft = TableModel(noisy(target.table, seed=case, sigma=sigma) if sigma else target.table)
        prompt = [case, (case + 4) % 10]
        est = estimate_alpha(target, draft, [prompt], new_tokens=new_tokens, lookup=lookup)
        trajectories += est.trajectories
        lookups += est.lookups
        logged_target, logged_draft = FeedLog(target.table), FeedLog(draft.table)
        stats = run("pearl", logged_target, logged_draft, prompt, new_tokens, gamma=gamma, lookup=lookup).stats
        rounds = logged_target.fed[1:]  # after the prefill, one target call a round ...
        drafts = iter(logged_draft.fed[1:])  # ... and gamma draft calls in those both workers run
        assert len(rounds) == stats["rounds"] == len(stats["mode_trace"])
        assert len(logged_draft.fed[1:]) == gamma * (stats["rounds"] - stats["rounds_copied"])
        for fed, mode in zip(rounds, stats["mode_trace"]):
            if mode == "copied":
                cost += alone(fed - 1)
            else:
                draft_work = draft_call(next(drafts)) + sum(draft_call(next(drafts)) for _ in range(gamma - 1))
                cost += max(draft_work, verify(fed - 1) if fed > 1 else 1.0)
        positions += new_tokens - 1
        copied_rounds += stats["lookup_rounds"]
    assert copied_rounds > 5
    replayed = pearl_replayed_speedup(
        trajectories, gamma, c, verify, lookups, catchup_cost=draft_call, alone_verify=alone
    )
    assert replayed == pytest.approx(positions / cost, rel=1e-6 if gamma == 1 or not sigma else 0.05)
    assert replayed != pytest.approx(pearl_replayed_speedup(trajectories, gamma, c, verify), rel=0.03)
