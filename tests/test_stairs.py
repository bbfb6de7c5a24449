""" "Stairs" assisted greedy: staircase validation equals its single-sequence lowering, both equal
target greedy, call counts, and the assistant's adaptive batch size."""

from __future__ import annotations

from test_speculative import TableModel, noisy, random_table

from accelc.loops.autoregressive import generate
from accelc.loops.stairs import stairs_generate


class LastPositionOnly(TableModel):
    """A target that declares it exposes only last-position logits: 'auto' must use the staircase."""

    all_position_logits = False


def test_staircase_and_single_sequence_validation_agree_token_for_token():
    for case in range(5):
        target = TableModel(random_table(10, seed=case, scale=2.5))
        draft = TableModel(noisy(target.table, seed=50 + case, sigma=1.0))
        expected = generate(target, [case], 40).tokens
        single = stairs_generate(target, draft, [case], 40, validation="single")
        stair = stairs_generate(target, draft, [case], 40, validation="staircase")
        assert single.tokens == stair.tokens == expected
        for key in ("accepted", "rounds", "drafted", "candidates_schedule", "draft_calls"):
            assert single.stats[key] == stair.stats[key], key
        # one target call per round when lowered; n + 1 staircase rows (calls) otherwise
        assert single.stats["target_calls"] == 1 + single.stats["rounds"]
        assert stair.stats["target_calls"] == 1 + sum(g + 1 for g in stair.stats["candidates_schedule"])
        assert stair.stats["target_tokens_fed"] > single.stats["target_tokens_fed"]
        assert single.stats["target_calls"] <= 40  # never more large-model calls than greedy steps


def test_auto_lowers_to_single_unless_the_target_lacks_all_position_logits():
    table = random_table(6, seed=1)
    assert stairs_generate(TableModel(table), TableModel(table), [1], 10).stats["validation"] == "single"
    r = stairs_generate(LastPositionOnly(table), TableModel(table), [1], 10)
    assert r.stats["validation"] == "staircase"
    assert r.tokens == generate(TableModel(table), [1], 10).tokens


def test_assistant_batch_grows_by_two_on_full_acceptance_and_shrinks_by_one_otherwise():
    table = random_table(6, seed=2)
    perfect = stairs_generate(TableModel(table), TableModel(table), [1], 60)
    assert perfect.stats["candidates_schedule"][:4] == [5, 7, 9, 11]
    wrong = stairs_generate(TableModel(table), TableModel(random_table(6, seed=3, scale=5.0)), [1], 30)
    sched = wrong.stats["candidates_schedule"]
    assert sched[0] == 5 and min(sched[:-1]) == 1  # the last round may be cut by the token budget
    assert all(b in (a + 2, max(a - 1, 1)) for a, b in zip(sched, sched[1:-1]))
    fixed = stairs_generate(TableModel(table), TableModel(table), [1], 30, candidates=3, adaptive=False)
    assert set(fixed.stats["candidates_schedule"][:-1]) == {3}
