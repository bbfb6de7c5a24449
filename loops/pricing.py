"""The decisions the speculative pass makes for a loop, as library functions: what a loop is
priced with (Measured), each loop's pricing (Pricing: its replay choosing gamma), the choice of
gamma and of copying drafts from the context (decide), and the plan built from them (plan_fields).

Benchmarks call these instead of re-deciding; the replay maths itself is replay.py.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from accelc.loops.replay import MIN_COPY_GAIN, GammaChoice, Schedule, VerifyCost, choose_gamma, copying_pays

if TYPE_CHECKING:
    from accelc.loops.calibration import AlphaEstimate
    from accelc.loops.lookup import Lookup
    from accelc.loops.timing import CostMeasurement


@dataclass(frozen=True)
class Measured:
    """What a loop's parameters are chosen from: acceptance along calibration continuations, and
    the costs its models run at (PEARL: its workers', timed while both run)."""

    alpha: AlphaEstimate
    cost: CostMeasurement
    candidates: int = 1  # draft sequences a round the acceptance was measured for (batch speculative)
    worker_slowdown: float = 1.0  # the workers' target step over the all-core one (PEARL)
    alone_verify: VerifyCost | None = None  # PEARL's rounds made alone, in the workers' units


# choose(measured, gamma_max, lookups) -> the loop's gamma; lookups () prices rounds without copies
Chooser = Callable[[Measured, int, Sequence[Sequence[np.ndarray]]], GammaChoice]


@dataclass(frozen=True)
class Pricing:
    choose: Chooser
    prediction: str  # how the choice is predicted, recorded in the plan
    candidates: bool = False  # acceptance is measured for the plan's num_candidates drafts a round
    parallel_workers: bool = False  # target and draft run at once: priced with workers timed together


def measured_for(
    pricing: Pricing,
    alpha: AlphaEstimate,
    sequential: CostMeasurement,
    workers: CostMeasurement | None = None,
    *,
    candidates: int = 1,
    alone_session: bool = True,
) -> Measured:
    """What a loop is priced with: the pair's costs timed one after the other (`sequential`), or,
    for a loop whose target and draft run at once (PEARL) on workers that each get a share of the
    cores, the `workers`' costs timed while both run, each slowed by the other's use of the caches
    and memory bandwidth. Its rounds made alone run on an all-core session with `alone_session`,
    else on the workers' target."""
    from accelc.loops.timing import alone_verify

    n = candidates if pricing.candidates else 1
    if not pricing.parallel_workers or workers is None:
        return Measured(alpha, sequential, n)
    alone = alone_verify(sequential, workers) if alone_session else None
    return Measured(alpha, workers, n, workers.baseline_ratio, alone)


def one_sequence_chooser(schedule: Schedule | None = None) -> Chooser:
    """The pricing of a loop with one draft sequence a round: the measured acceptance replayed
    through it (replay.choose_gamma); with a `schedule`, its draft length moves between rounds
    and gamma is where it starts."""

    def choose(measured: Measured, gamma_max: int, lookups) -> GammaChoice:
        return choose_gamma(
            measured.alpha.alpha,
            measured.cost.cost_ratio,
            gamma_max=gamma_max,
            verify_cost=measured.cost.verify,
            trajectories=measured.alpha.trajectories,
            catchup_cost=measured.cost.catchup,
            schedule=schedule,
            lookups=lookups,
        )

    return choose


@dataclass(frozen=True)
class Decision:
    choice: GammaChoice
    lookup: Lookup | None  # copying from the context, kept only where it pays
    prediction: str
    lookup_report: dict = field(default_factory=dict)


def decide(pricing: Pricing, measured: Measured, gamma_max: int, lookup: Lookup | None = None) -> Decision:
    """The loop's gamma by its replay; with `lookup`, also priced copying drafts from the context,
    kept only where the replay predicts a MIN_COPY_GAIN gain over not copying (copying_pays)."""
    choice = pricing.choose(measured, gamma_max, ())
    if lookup is None:
        return Decision(choice, None, pricing.prediction)
    # copied drafts pay where the text repeats itself and the target agrees with the copy (greedy,
    # mostly); sampled, a copied token survives with probability p(x)
    copying = pricing.choose(measured, gamma_max, measured.alpha.lookups)
    report = {
        "lookup_predicted_speedup": copying.predicted_speedup,
        "lookup_match_rate": float(np.mean([c.size > 0 for t in measured.alpha.lookups for c in t])),
        "predicted_speedup_without_lookup": choice.predicted_speedup,
    }
    if copying_pays(copying.predicted_speedup, choice.predicted_speedup):
        return Decision(
            copying, lookup, pricing.prediction + ", with drafts copied from the context where it matches", report
        )
    off = f"; copying drafts from the context predicted less than a {MIN_COPY_GAIN - 1:.0%} gain, so it is off"
    return Decision(choice, None, pricing.prediction + off, report)


def plan_fields(
    strategy: str,
    decision: Decision,
    measured: Measured,
    sequential: CostMeasurement,
    *,
    autoregressive: str,
    fallback_allowed: bool,
    num_candidates: int,
    backend: str,
    records: dict | None = None,
) -> dict:
    """decode/plan.json's fields for `strategy` decided as `decision`: the loop, or
    `autoregressive` (greedy / sample) when nothing gains and the fallback is allowed, with every
    figure measured (`sequential`: the target and draft timed alone) and the loop's own `records`."""
    choice, alpha = decision.choice, measured.alpha
    fallback = choice.method == "autoregressive" and fallback_allowed
    reason = (
        choice.reason
        if fallback or choice.method != "autoregressive"
        else f"{choice.reason}; the recipe disabled the fallback, so {strategy} is used anyway"
    )
    return {
        "strategy": autoregressive if fallback else strategy,
        "sampling": autoregressive == "sample",
        "gamma": choice.gamma,
        "num_candidates": num_candidates,
        "fallback": fallback,
        "reason": reason,
        "alpha": alpha.alpha,
        "alpha_stderr": alpha.stderr,
        "alpha_positions": alpha.positions,
        "cost_ratio": sequential.cost_ratio,
        "cost_backend": backend,
        "target_step_ms": sequential.target_step_seconds * 1e3,
        "draft_step_ms": sequential.draft_step_seconds * 1e3,
        "verify_cost": {str(k): v for k, v in sequential.verify_cost.items()},
        "draft_catchup_cost": sequential.catchup_cost,
        "draft_catchup_costs": {str(k): v for k, v in sequential.catchup_costs.items()},
        "prediction": decision.prediction,
        **({"lookup": decision.lookup.to_dict()} if decision.lookup else {}),
        **decision.lookup_report,
        **(records or {}),
        "predicted_speedup": choice.predicted_speedup,
        "predicted_curve": {str(k): v for k, v in choice.curve.items()},
    }
