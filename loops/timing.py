"""Timing that runs models: the cost ratio c of a draft step to a target step, and the
measured cost curves of multi-token calls (verification, a draft's catch-up), in target steps.

Costs are medians of ratios timed back to back, so a machine that changes speed while it is
measured moves both sides of a ratio alike; PEARL's workers are timed while both run.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from accelc.errors import InternalError
from accelc.loops.cursor import check_pair
from accelc.runtime.base import StepModel

TIMING_STEPS = 8  # one-token decode steps per timing repeat
TIMING_REPEATS = 5  # medians over repeats: shared machines have noisy neighbours
COPY_CATCHUP_LENGTHS = (2, 3, 5, 9, 17, 33)  # the draft's call lengths to time when rounds copy drafts


@dataclass(frozen=True)
class CostMeasurement:
    cost_ratio: float  # c = draft step time / target step time
    target_step_seconds: float
    draft_step_seconds: float
    verify_cost: dict = field(default_factory=dict)  # k -> target time to score k tokens, in target steps
    # m -> the draft scoring m tokens in one call, in target steps: a round's first draft call
    # after a fully accepted round feeds 2 (the last draft and the bonus token), after copied
    # rounds every token the draft skipped
    catchup_costs: dict = field(default_factory=dict)
    # the target's step over a `baseline` model's step timed beside it (PEARL's one-thread worker
    # against the all-core target that plain decoding runs); None: no baseline was timed
    baseline_ratio: float | None = None

    @property
    def catchup_cost(self) -> float | None:
        """The draft's two-token call, in target steps (None: not measured)."""
        return self.catchup_costs.get(2)

    def verify(self, gamma: int) -> float:
        """v(gamma): scoring gamma + 1 tokens, interpolated from the measured k (1.0 if none)."""
        return monotone(self.verify_cost, gamma + 1, default=1.0)

    def catchup(self, m: int) -> float:
        """The draft's call feeding m tokens, in target steps, from the measured m (c for one)."""
        return monotone({1: self.cost_ratio, **self.catchup_costs}, m, default=self.cost_ratio)

    def to_dict(self) -> dict:
        return {
            **asdict(self),
            "verify_cost": {str(k): v for k, v in self.verify_cost.items()},
            "catchup_costs": {str(k): v for k, v in self.catchup_costs.items()},
            "catchup_cost": self.catchup_cost,
        }

    @classmethod
    def median(cls, measurements: Sequence[CostMeasurement]) -> CostMeasurement:
        """Field by field medians of measurements taken over a while (a benchmark's run): the
        costs of the machine's typical state, where one measurement catches whichever it is in."""
        if not measurements:
            raise InternalError("a median of cost measurements needs at least one")

        def med(values):
            return None if any(v is None for v in values) else float(np.median(values))

        fields = {
            name: med([getattr(m, name) for m in measurements])
            for name in ("cost_ratio", "target_step_seconds", "draft_step_seconds", "baseline_ratio")
        }
        curves = {
            name: {k: med([getattr(m, name).get(k) for m in measurements]) for k in getattr(measurements[0], name)}
            for name in ("verify_cost", "catchup_costs")
        }
        return cls(**curves, **fields)


def monotone(measured: dict, x: float, default: float) -> float:
    """A measured call cost at x, interpolated (past the ends: the end's). Feeding more tokens never
    costs less, so the curve is made nondecreasing: timing noise between neighbouring lengths
    cannot make a longer call look cheaper."""
    if not measured:
        return default
    xs = sorted(measured)
    return float(np.interp(x, xs, np.maximum.accumulate([measured[k] for k in xs])))


def _decode_timer(model: StepModel, prompt: Sequence[int], steps: int) -> Callable[[], float]:
    """A timer of `steps` greedy one-token decode steps from the prompt's state (seconds per step)."""
    logits, state = model.prefill(np.asarray(prompt, dtype=np.int64))
    first = int(np.argmax(logits[-1]))

    def per_step() -> float:
        s, tok = state, first
        t = time.perf_counter()
        for _ in range(steps):
            out, s = model.extend(s, np.array([tok], dtype=np.int64))
            tok = int(np.argmax(out[-1]))
        return (time.perf_counter() - t) / steps

    return per_step


def _call_ratios(model: StepModel, prompt: Sequence[int], lengths: Sequence[int], repeats: int) -> dict[int, float]:
    """k -> one call scoring k tokens after the prompt over one call scoring 1 token: the median
    of ratios timed back to back (always from the prompt's state), every k in every repeat, so a
    machine that changes speed while it is measured moves both calls of a ratio alike."""
    _, state = model.prefill(np.asarray(prompt, dtype=np.int64))

    def call(k: int) -> float:
        ids = np.asarray((list(prompt) * k)[:k], dtype=np.int64)
        t = time.perf_counter()
        model.extend(state, ids)
        return time.perf_counter() - t

    ratios: dict[int, list[float]] = {int(k): [] for k in lengths}
    for _ in range(repeats):
        for k in ratios:
            one = call(1)
            ratios[k].append(call(k) / one)
    return {k: float(np.median(r)) for k, r in ratios.items()}


def call_cost_curve(
    model: StepModel, prompt: Sequence[int], lengths: Sequence[int], repeats: int = TIMING_REPEATS
) -> dict[int, float]:
    """k -> a call scoring k tokens over a one-token call (1 -> 1.0), timed back to back from the
    prompt's state: the cost curve that loops feeding a window of tokens a call are priced with
    (jacobi_pricing.py). Untimed first: one call of each length (a fresh session allocates)."""
    _, state = model.prefill(np.asarray(prompt, dtype=np.int64))
    for k in {1, *lengths}:
        model.extend(state, np.asarray((list(prompt) * k)[:k], dtype=np.int64))
    return {1: 1.0, **_call_ratios(model, prompt, sorted({int(k) for k in lengths} - {1}), repeats)}


@contextlib.contextmanager
def _busy(model: StepModel | None, prompt: Sequence[int], steps: int):
    """While the block runs, `model` keeps decoding on a thread of its own: the other PEARL
    worker, which shares the machine's cores, caches and memory bandwidth with the timed one."""
    if model is None:
        yield
        return
    timer, stop = _decode_timer(model, prompt, steps), threading.Event()

    def keep_decoding() -> None:
        while not stop.is_set():
            timer()

    worker = threading.Thread(target=keep_decoding, daemon=True)
    worker.start()
    try:
        yield
    finally:
        stop.set()
        worker.join()


def measure_cost_ratio(
    target: StepModel,
    draft: StepModel,
    prompt: Sequence[int],
    *,
    steps: int = TIMING_STEPS,
    repeats: int = TIMING_REPEATS,
    verify_lengths: Sequence[int] = (),
    concurrent: bool = False,
    baseline: StepModel | None = None,
    catchup_lengths: Sequence[int] = (2,),
) -> CostMeasurement:
    """Time one-token decode steps of both models on this backend (medians), the draft's
    two-token catch-up call, and optionally the target scoring k tokens in one call for each k
    in `verify_lengths`. concurrent: time each model while the other one decodes on another
    thread, as PEARL's workers run (on a small CPU they slow each other down). baseline: also
    time this model's step alone in every repeat, for the target's step over it (baseline_ratio).
    catchup_lengths: the draft's calls of that many tokens to time (catchup_costs; 2 always)."""
    check_pair(target, draft)
    timers = _decode_timer(target, prompt, steps), _decode_timer(draft, prompt, steps)
    base_timer = _decode_timer(baseline, prompt, steps) if baseline is not None else None
    for timer in (*timers, base_timer):  # untimed: a fresh session's first one-token calls allocate and pack
        if timer is not None:
            timer()
    other = {id(target): draft if concurrent else None, id(draft): target if concurrent else None}

    def timed(model: StepModel, timer: Callable[[], float]) -> float:
        with _busy(other[id(model)], prompt, steps):
            return timer()

    # the models alternate, so a neighbour that slows the machine for a while slows all of them:
    # c is the median of paired ratios, not a ratio of medians taken minutes apart
    rounds = [
        (timed(target, timers[0]), timed(draft, timers[1]), base_timer() if base_timer else None)
        for _ in range(repeats)
    ]
    t_step, d_step = (float(np.median([r[i] for r in rounds])) for i in (0, 1))
    c = float(np.median([d / t for t, d, _ in rounds]))
    baseline_ratio = float(np.median([t / b for t, _, b in rounds])) if base_timer else None
    # multi-token calls in units of their own model's one-token call, timed beside it (a call
    # from the prompt's state is one decode step): the draft's in target steps through c
    with _busy(other[id(draft)], prompt, steps):
        catchups = {m: r * c for m, r in _call_ratios(draft, prompt, sorted({2, *catchup_lengths}), repeats).items()}
    with _busy(other[id(target)], prompt, steps):
        verify = _call_ratios(target, prompt, verify_lengths, repeats)
    return CostMeasurement(c, t_step, d_step, verify, catchups, baseline_ratio)


def alone_verify(sequential: CostMeasurement, workers: CostMeasurement) -> Callable[[int], float]:
    """PEARL's rounds made alone (pearl.py: copied drafts) on the target's all-core session: its
    verify call scoring g + 1 tokens, in the units PEARL is replayed in, the worker target's step."""
    if not workers.baseline_ratio:
        raise InternalError("pricing PEARL's rounds made alone needs the workers timed against the all-core target")

    def cost(g: int) -> float:
        return sequential.verify(g) / workers.baseline_ratio

    return cost


def measure_loop_costs(target, draft, prompt: Sequence[int], *, gamma_max: int, copying: bool, **timing):
    """The costs a draft-length choice up to `gamma_max` is priced with, in target steps: verifying
    2..gamma_max + 1 tokens (the last committed token plus the drafts: on a CPU more than one
    decode step), and the draft's catch-up calls (with copies from the context, every length a
    copy can make it skip). `timing`: measure_cost_ratio's own options (concurrent, baseline)."""
    return measure_cost_ratio(
        target,
        draft,
        prompt,
        catchup_lengths=COPY_CATCHUP_LENGTHS if copying else (2,),
        verify_lengths=range(2, gamma_max + 2),
        **timing,
    )
