"""The typed decode plan and the loop table: plan.json round trips, run_plan dispatches every
registered loop through its entry, a new loop is one registration, and the pass's copying
decision is a library function."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
from test_speculative import TableModel, noisy, random_table

from accelc.errors import UsageError
from accelc.loops import registry
from accelc.loops.autoregressive import GenerationResult, Sampler, generate
from accelc.loops.calibration import AlphaEstimate
from accelc.loops.lookup import Lookup
from accelc.loops.plan import DecodePlan, run_plan
from accelc.loops.pricing import Measured, Pricing, decide
from accelc.loops.replay import GammaChoice
from accelc.loops.timing import CostMeasurement

# a plan.json as the speculative pass wrote it before the plan was typed: every key survives
WRITTEN = {
    "strategy": "pearl",
    "max_new_tokens": 48,
    "temperature": 1.0,
    "top_k": 0,
    "top_p": 1.0,
    "seed": 3,
    "chat_template": True,
    "sampling": False,
    "gamma": 5,
    "num_candidates": 2,
    "fallback": False,
    "reason": "gamma=5 maximises the predicted speedup 1.300 over 1..8",
    "alpha": 0.71,
    "verify_cost": {"2": 1.1, "3": 1.2},
    "lookup": {"tokens": 6, "max_ngram": 2, "min_ngram": 2},
    "worker_threads": {"target": 1, "draft": 1},
    "alone_session": True,
    "draft_prompt_kv": "target",
    "draft_source": "from_target",
    "predicted_curve": {"1": 1.1, "5": 1.3},
}


def test_a_written_plan_reads_into_typed_fields_and_writes_back_unchanged(tmp_path):
    path = tmp_path / "plan.json"
    path.write_text(__import__("json").dumps(WRITTEN))
    plan = DecodePlan.read(path)
    assert plan.strategy == "pearl" and plan.gamma == 5 and plan.seed == 3 and plan.needs_draft
    assert plan.copying() == Lookup(tokens=6, max_ngram=2, min_ngram=2)
    assert plan.worker_threads.target == 1 and plan.alone_session and plan.prompt_kv_from_target
    assert plan.sampler() == Sampler() and plan.sampler(0.5) == Sampler(0.5, 0, 1.0)
    assert plan.to_json_dict() == WRITTEN
    # a plain backend's copy of it records what was planned, and still writes what it was given
    plain = plan.model_copy(update={"strategy": "greedy", "planned_strategy": "pearl"})
    assert not plain.needs_draft and plain.to_json_dict() == {
        **WRITTEN,
        "strategy": "greedy",
        "planned_strategy": "pearl",
    }
    assert DecodePlan.read(tmp_path / "none.json").strategy == "greedy"


def test_a_recipe_decode_section_samples_by_its_strategy():
    assert DecodePlan.of({"strategy": "sample", "temperature": 0.7, "top_k": 5}).sampler() == Sampler(0.7, 5, 1.0)
    assert DecodePlan.of({"strategy": "greedy", "temperature": 0.7}).sampler() == Sampler()


@pytest.mark.parametrize("name", registry.names())
def test_every_registered_loop_reproduces_greedy_decoding_through_run_plan(name):
    vocab, prompt = 12, [1, 2, 3]
    target = TableModel(random_table(vocab, 0))
    draft = TableModel(noisy(target.table, 1, 0.5))
    expected = generate(target, prompt, 20, sampler=Sampler()).tokens
    plan = DecodePlan(strategy=name, gamma=3)
    got = run_plan(plan, target, draft, prompt, 20, sampler=Sampler())
    assert got.tokens == expected


def test_run_plan_refuses_what_a_loop_cannot_run():
    target = TableModel(random_table(8, 0))
    with pytest.raises(UsageError, match="unknown; known: greedy, sample, speculative"):
        run_plan({"strategy": "beam"}, target, None, [1], 4)
    with pytest.raises(UsageError, match="needs a draft model"):
        run_plan({"strategy": "speculative"}, target, None, [1], 4)
    with pytest.raises(UsageError, match="stairs strategy is greedy only"):
        run_plan({"strategy": "stairs"}, target, target, [1], 4, sampler=Sampler(1.0))


@dataclass(frozen=True)
class RepeatOptions:
    times: int

    @classmethod
    def from_plan(cls, plan: DecodePlan) -> RepeatOptions:
        return cls(plan.gamma)


def _repeat(target, draft, prompt, max_new_tokens, options: RepeatOptions, *, sampler, eos_ids, seed):
    """A toy loop: the target's greedy first token, repeated."""
    first = generate(target, list(prompt), 1, sampler=sampler, seed=seed).tokens[0]
    return GenerationResult([first] * min(options.times, max_new_tokens), 0.0, 0.0, {"seed": seed})


def test_a_new_loop_is_one_registration():
    target = TableModel(random_table(8, 0))
    loop = registry.register_loop(registry.Loop("repeat", _repeat, RepeatOptions, needs_draft=False))
    try:
        assert "repeat" in registry.names(needs_draft=False) and not DecodePlan(strategy="repeat").needs_draft
        got = run_plan({"strategy": "repeat", "gamma": 3, "seed": 7}, target, None, [1, 2], 10)
        first = generate(target, [1, 2], 1).tokens[0]
        assert got.tokens == [first] * 3 and got.stats == {"seed": 7}
        assert registry.get("repeat") is loop
    finally:
        registry.unregister_loop("repeat")
    assert registry.get("repeat") is None


def _measured(lookups) -> Measured:
    alpha = AlphaEstimate(0.5, 0.01, 4, (np.full(4, 0.5),), lookups)
    return Measured(alpha, CostMeasurement(0.2, 0.01, 0.002))


def _pricing(with_copies: float) -> Pricing:
    def choose(measured, gamma_max, lookups):
        s = with_copies if lookups else 1.2
        return GammaChoice("speculative", 2, s, 0.5, 0.2, f"S={s}", {2: s})

    return Pricing(choose, "replayed")


def test_copying_is_kept_only_where_the_replay_predicts_a_five_percent_gain():
    lookups = ((np.array([1.0]), np.zeros(0), np.zeros(0), np.array([1.0, 0.0])),)
    lookup = Lookup(tokens=2, max_ngram=2, min_ngram=2)
    kept = decide(_pricing(1.3), _measured(lookups), 8, lookup)
    assert kept.lookup == lookup and kept.choice.predicted_speedup == 1.3
    assert kept.lookup_report == {
        "lookup_predicted_speedup": 1.3,
        "lookup_match_rate": 0.5,
        "predicted_speedup_without_lookup": 1.2,
    }
    off = decide(_pricing(1.25), _measured(lookups), 8, lookup)
    assert off.lookup is None and off.choice.predicted_speedup == 1.2 and "so it is off" in off.prediction
    assert decide(_pricing(2.0), _measured(()), 8, None).lookup_report == {}
