"""The speculative cost model: acceptance rate alpha, cost ratio c, and the draft length to use.

Formulas (Leviathan et al., arXiv 2211.17192, section 3: eq. 1 and theorem 3.8, i.i.d. acceptance alpha; the sum
of TVs as expected rejections: Yin et al., arXiv 2411.00841):

    alpha = E[beta],  beta = sum_x min(p(x), q(x)) = 1 - TV(p, q)   per position, along target
            trajectories (greedy: beta = 1 where the argmaxes agree, else 0)
    E[tokens per verification round] = (1 - alpha^(gamma+1)) / (1 - alpha)
    S(gamma) = (1 - alpha^(gamma+1)) / ((1 - alpha) (gamma c + v))     c = t_draft / t_target

v is the cost of the one target call that scores gamma + 1 tokens, in target steps. The paper
takes v = 1 (a memory-bound accelerator scores a few tokens for the price of one); on a CPU a
measured v(gamma) > 1 makes the prediction honest. gamma* = argmax S over 1..gamma_max, and
when no gamma predicts S > 1 the plan is plain autoregressive decoding (with v = 1 a gain is
possible iff alpha > c).

PEARL [derived here; Liu et al., arXiv 2408.11850, give only the round time max(gamma t_d, t_t)]: with
i.i.d. acceptance a pre-verify round commits 1 token and moves to post-verify with probability
alpha; a post-verify round commits E[min(G + 1, gamma)] = (1 - alpha^gamma) / (1 - alpha)
tokens (G the run of acceptances) and falls back with probability 1 - alpha^gamma. The
two-state chain's stationary mix gives

    E[tokens per round] = (1 - alpha^gamma) / ((1 - alpha) (1 + alpha - alpha^gamma))
    S_PEARL(gamma) = E[tokens per round] / max(gamma c, v)

which assumes the two workers truly overlap (two devices, or spare cores). With measured
acceptance, `pearl_replayed_speedup` replays the two modes position by position instead, as
`replayed_speedup` does for one draft sequence a round (below).

Trajectory replay [derived here]: acceptance is not i.i.d. A draft agrees with the target for
long runs (set phrases, names, repetition) and disagrees in clusters, so the i.i.d. formula,
fed the mean alpha, misjudges how long rounds really are. `replayed_speedup` instead replays
the measured per-position acceptance beta_i of the calibration continuations through the loop
itself: a round from position i drafts g = min(gamma, positions left - 1) tokens, accepts the
first a of them with probability beta_i ... beta_{i+a-1} (1 - beta_{i+a}) (greedy: exactly the
agreeing run), and continues at i + a + 1. Backwards over positions,

    T(i, m) = (g - 1) c + c_m + v(g) + sum_{a<g} P(a | i) T(i + a + 1, 1) + P(g | i) T(i + g + 1, 2)

is the expected cost (in target steps) of committing positions i.. when the draft's next call
feeds m tokens, at the measured cost c_m of such a call (c_1 = c): 1 after a rejection, 2 after
a fully accepted round (the last draft and the bonus token). S = positions / T(0, 1). With
constant beta = alpha and c_2 = c this is R6's S(gamma) again (tests/test_cost_model.py);
greedy, it counts the loop's own rounds and draft calls exactly. A loop whose draft length
moves between rounds (stairs: +2 after a fully accepted round, else -1) adds the length to the
state: T(i, l, m), the next round at schedule(l, a == g); gamma is then the length of the first
round. A round that copies its drafts from the context (lookup.py) costs the verify call v(k)
alone, accepts the copies with their recorded acceptance (copied_acceptance), keeps the length,
and adds what it commits to m: the draft, which sat it out, feeds all of it in its next call.
Batch speculative decoding replays the same way
(`batch_replayed_speedup`), with its k candidates' acceptance at a round's first position,
where they all start from one prefix.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from accelc.errors import UsageError
from accelc.loops.autoregressive import Sampler, generate
from accelc.loops.lookup import Lookup, lookup_draft
from accelc.loops.speculative import check_pair
from accelc.runtime.base import StepModel

GAMMA_MAX = 16  # S(gamma) of arXiv 2211.17192 theorem 3.8 is unimodal in practice and peaks well below 16
MIN_GAIN = 1.0  # speculate only when the best predicted speedup exceeds plain decoding's 1.0
# copy drafts from the context only when the replay predicts at least this gain over not copying:
# what it does not price (a longer verify call's rows checked in Python, PEARL's rounds made more
# even, so their slower worker's jitter shows) measured 5-7% for PEARL, whose predicted gain was 1-3%
MIN_COPY_GAIN = 1.05
CALIBRATION_NEW_TOKENS = 32  # target-sampled positions per calibration prompt (4 x 16 left a 0.04 stderr)
TIMING_STEPS = 8  # one-token decode steps per timing repeat
TIMING_REPEATS = 5  # medians over repeats: shared machines have noisy neighbours

VerifyCost = float | Callable[[int], float]
CatchupCost = float | Callable[[int], float] | None
LAG_MAX = 33  # tokens a draft's catch-up call is priced for at most (longer calls: as this one)
COPY_CATCHUP_LENGTHS = (2, 3, 5, 9, 17, 33)  # the draft's call lengths to time when rounds copy drafts


# --------------------------------------------------------------------------- alpha
def acceptance_from_logits(
    target_logits: np.ndarray, draft_logits: np.ndarray, sampler: Sampler = Sampler()
) -> np.ndarray:
    """beta per paired row ([N, V] each): sum min(p, q) after the sampler's filtering, or for
    greedy 1.0 where the argmaxes agree (the greedy rule's acceptance)."""
    if target_logits.shape != draft_logits.shape:
        raise UsageError(f"paired logits differ in shape: target {target_logits.shape}, draft {draft_logits.shape}")
    if sampler.temperature == 0.0:
        return (np.argmax(target_logits, -1) == np.argmax(draft_logits, -1)).astype(np.float64)
    return np.array([np.minimum(sampler.probs(t), sampler.probs(d)).sum() for t, d in zip(target_logits, draft_logits)])


def first_acceptance(
    target_logits: np.ndarray, draft_logits: np.ndarray, sampler: Sampler, candidates: int
) -> np.ndarray:
    """Per paired row, P(some of k draft candidates is accepted) at a batch speculative round's
    first position, where all k are drafted from one prefix (batch_speculative.py): greedy, 1
    where the target's argmax is among the draft's k most likely tokens (the loop's candidates);
    sampling, 1 - prod_m TV(r_m, q) of recursive rejection over k i.i.d. draws."""
    from accelc.loops.batch_speculative import all_rejected_probability

    if sampler.temperature == 0.0:
        top = np.argsort(-draft_logits, axis=-1, kind="stable")[:, :candidates]
        return (top == np.argmax(target_logits, -1)[:, None]).any(-1).astype(np.float64)
    return np.array(
        [
            1.0 - all_rejected_probability(sampler.probs(t), sampler.probs(d), candidates)
            for t, d in zip(target_logits, draft_logits)
        ]
    )


@dataclass(frozen=True)
class AlphaEstimate:
    alpha: float
    stderr: float  # of the mean, treating positions as independent
    positions: int
    # beta per generated position, one array per calibration prompt: what replayed_speedup replays
    trajectories: tuple[np.ndarray, ...] = field(default=(), repr=False, compare=False)
    # with a Lookup: per prompt and position, the acceptance of each token copied from the context
    # there (empty: no match); see copied_acceptance
    lookups: tuple[tuple[np.ndarray, ...], ...] = field(default=(), repr=False, compare=False)
    # with candidates k > 1: per prompt and position, P(one of k candidates accepted) there
    # (first_acceptance), what batch_replayed_speedup prices a round's first position with
    first_accepts: tuple[np.ndarray, ...] = field(default=(), repr=False, compare=False)

    def to_dict(self) -> dict:
        return {"alpha": self.alpha, "stderr": self.stderr, "positions": self.positions}


def copied_acceptance(
    prompt: Sequence[int], continuation: Sequence[int], probs: np.ndarray | None, lookup: Lookup
) -> tuple[np.ndarray, ...]:
    """For each position a loop verifies (continuation[1:]), the acceptance of every token that
    lookup copies from the context there: greedy (probs None), 1 while it equals the continuation;
    sampling, p(x) at its position along the continuation (probs [positions, V]: exact for the
    first copied token, an estimate after it, where the loop's context may differ)."""
    seq, n = list(prompt) + list(continuation), len(continuation) - 1
    out = []
    for i in range(n):
        copied = lookup_draft(seq[: len(prompt) + i + 1], lookup, n - i)
        if probs is None:
            out.append(np.array([float(x == continuation[i + 1 + k]) for k, x in enumerate(copied)]))
        else:
            out.append(np.array([probs[i + k][x] for k, x in enumerate(copied)]))
    return tuple(out)


def estimate_alpha(
    target: StepModel,
    draft: StepModel,
    prompts: Sequence[Sequence[int]],
    *,
    sampler: Sampler = Sampler(),
    new_tokens: int = CALIBRATION_NEW_TOKENS,
    seed: int = 0,
    prompt_kv_from_target: bool = False,
    lookup: Lookup | None = None,
    candidates: int = 1,
) -> AlphaEstimate:
    """alpha = 1 - E[TV(p, q)] on calibration prompts, along the target's own continuations.

    Per prompt: the target generates `new_tokens` with `sampler`; then one prefill of each model
    over prompt + continuation gives paired logits for every generated position but the first,
    which the loops take from the target's prefill and never draft (so a trajectory holds the
    new_tokens - 1 positions a loop of that budget verifies, in order).
    prompt_kv_from_target: as the loops then run (speculative.open_pair), the draft starts from
    the target's cache of the prompt and scores the continuation from there.
    lookup: also record what copying from the context would propose and keep (copied_acceptance).
    candidates > 1: also record the acceptance of that many candidates (first_acceptance).
    """
    check_pair(target, draft)
    betas, lookups, firsts = [], [], []
    for i, prompt in enumerate(prompts):
        prompt = list(prompt)
        cont = generate(target, prompt, new_tokens, sampler=sampler, seed=seed + i).tokens
        seq = np.asarray(prompt + cont[:-1], dtype=np.int64)
        t_logits, t_state = target.prefill(seq)
        if prompt_kv_from_target:
            n = len(prompt)
            start = draft.state_from_kv(target.kv_numpy(target.truncate(t_state, n)))
            d_logits, _ = draft.extend(start, seq[n:]) if len(seq) > n else (t_logits[:0], None)
            t_logits = t_logits[n:]
        else:
            d_logits, _ = draft.prefill(seq)
            rows = slice(len(prompt), None)  # the rows that predict the generated tokens after the first
            t_logits, d_logits = t_logits[rows], d_logits[rows]
        check_pair(target, draft, t_logits.shape[-1], d_logits.shape[-1])
        betas.append(acceptance_from_logits(t_logits, d_logits, sampler))
        if candidates > 1:
            firsts.append(first_acceptance(t_logits, d_logits, sampler, candidates))
        if lookup is not None:
            probs = None if sampler.temperature == 0.0 else np.stack([sampler.probs(row) for row in t_logits])
            lookups.append(copied_acceptance(prompt, cont, probs, lookup))
    if not betas:
        raise UsageError("estimating alpha needs at least one calibration prompt")
    beta = np.concatenate(betas)
    stderr = float(beta.std(ddof=1) / np.sqrt(beta.size)) if beta.size > 1 else float("inf")
    return AlphaEstimate(float(beta.mean()), stderr, int(beta.size), tuple(betas), tuple(lookups), tuple(firsts))


# --------------------------------------------------------------------------- c
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
        return _monotone(self.verify_cost, gamma + 1, default=1.0)

    def catchup(self, m: int) -> float:
        """The draft's call feeding m tokens, in target steps, from the measured m (c for one)."""
        return _monotone({1: self.cost_ratio, **self.catchup_costs}, m, default=self.cost_ratio)

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
            raise UsageError("a median of cost measurements needs at least one")

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


def _monotone(measured: dict, x: float, default: float) -> float:
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
        raise UsageError("pricing PEARL's rounds made alone needs the workers timed against the all-core target")

    def cost(g: int) -> float:
        return sequential.verify(g) / workers.baseline_ratio

    return cost


# --------------------------------------------------------------------------- predictions
def copying_pays(with_copies: float, without: float) -> bool:
    """Whether a loop should copy drafts from the context, from its replayed speedups (MIN_COPY_GAIN)."""
    return with_copies > without * MIN_COPY_GAIN


def _check(alpha: float, gamma: int, c: float) -> None:
    if not 0.0 <= alpha <= 1.0:
        raise UsageError(f"alpha must lie in [0, 1], got {alpha}")
    if gamma < 1:
        raise UsageError(f"gamma must be at least 1, got {gamma}")
    if c < 0.0:
        raise UsageError(f"the cost ratio c must be nonnegative, got {c}")


def _v(verify_cost: VerifyCost, gamma: int) -> float:
    return float(verify_cost(gamma)) if callable(verify_cost) else float(verify_cost)


def expected_accepted_length(alpha: float, gamma: int) -> float:
    """E[tokens per verification round] = (1 - alpha^(gamma+1)) / (1 - alpha) (gamma + 1 at alpha = 1)."""
    _check(alpha, gamma, 0.0)
    return float(gamma + 1) if alpha == 1.0 else (1.0 - alpha ** (gamma + 1)) / (1.0 - alpha)


def predicted_speedup(alpha: float, gamma: int, c: float, verify_cost: VerifyCost = 1.0) -> float:
    """S(gamma) = (1 - alpha^(gamma+1)) / ((1 - alpha)(gamma c + v)) against autoregressive decoding."""
    _check(alpha, gamma, c)
    return expected_accepted_length(alpha, gamma) / (gamma * c + _v(verify_cost, gamma))


Schedule = Callable[[int, bool], int]  # a draft length's next value, from it and "every draft was accepted"


def _catchup_table(catchup_cost: CatchupCost, c: float) -> np.ndarray:
    """cost[m]: a draft call feeding m tokens (1 <= m <= LAG_MAX), in target steps; a call never
    costs less than a one-token step (c). catchup_cost None: every call is a step; a number: the
    two-token call, for every m >= 2; a function: m -> its cost (CostMeasurement.catchup)."""
    if catchup_cost is None:
        longer = [c] * (LAG_MAX - 1)
    elif callable(catchup_cost):
        longer = [float(catchup_cost(m)) for m in range(2, LAG_MAX + 1)]
    else:
        longer = [float(catchup_cost)] * (LAG_MAX - 1)
    return np.maximum(np.array([c, c, *longer]), c)


def replayed_speedup(
    trajectories: Sequence[Sequence[float]],
    gamma: int,
    c: float,
    verify_cost: VerifyCost = 1.0,
    catchup_cost: CatchupCost = None,
    schedule: Schedule | None = None,
    lookups: Sequence[Sequence[np.ndarray]] = (),
) -> float:
    """Speculative decoding's speedup replayed over measured acceptance (see the module doc):
    `trajectories` holds beta per position (AlphaEstimate.trajectories), `catchup_cost` the
    draft's multi-token calls in target steps (_catchup_table). `schedule`: how the draft length
    moves between rounds (stairs' adaptive one, starting at gamma); None keeps gamma.
    `lookups` (AlphaEstimate.lookups): rounds that copy their drafts from the context where it
    has a match; they call no draft and keep the draft length, and the draft's next call feeds
    every token it skipped. The state is (position, draft length, tokens the draft's next call
    feeds): 1 after a rejection, 2 after a fully accepted round, more after copied rounds."""
    _check(0.0, gamma, c)
    catchup_beyond_step = _catchup_table(catchup_cost, c) - c  # a draft round's first call beyond a step
    positions = cost = 0.0
    for t, trajectory in enumerate(trajectories):
        beta = np.clip(np.asarray(trajectory, dtype=np.float64), 0.0, 1.0)
        n = beta.size
        copies = lookups[t] if lookups else ()
        # a length past the positions left drafts as much as a shorter one: cap lengths at n
        top = max(gamma, n)
        lengths = [gamma] if schedule is None else range(1, top + 1)
        slot = (lambda length: 0) if schedule is None else (lambda length: length)  # a fixed length: one slot
        # without copies the draft's next call feeds 1 or 2 tokens; copied rounds add what they commit
        lag_top = LAG_MAX if copies else 2
        extra = catchup_beyond_step[: lag_top + 1]
        lags = np.arange(lag_top + 1)
        # after[i, slot(length), m]: the expected cost of committing positions i.. at that draft
        # length, the draft's next call feeding m tokens (index 0 unused)
        after = np.zeros((n + 1, top + 1 if schedule else 1, lag_top + 1))
        for i in range(n - 1, -1, -1):
            copied = np.clip(copies[i][: n - i - 1], 0.0, 1.0) if copies else np.zeros(0)
            k = copied.size
            if k:  # a round of copied drafts: the target's verify call only, for every draft length
                run = np.cumprod(np.concatenate(([1.0], copied)))
                weights = np.append(run[:-1] * (1.0 - copied), run[k])  # j copies kept, then t: j + 1 tokens
                after[i] = _v(verify_cost, k)
                for j, w in enumerate(weights):
                    after[i] += w * after[i + j + 1][:, np.minimum(lags + j + 1, lag_top)]
                continue
            for length in lengths:
                g = min(length, n - i - 1)  # the loop never drafts past the token budget
                shorter, longer = (
                    (length, length)
                    if schedule is None
                    else (min(schedule(length, False), top), min(schedule(length, True), top))
                )
                b = beta[i : i + g]
                run = np.cumprod(np.concatenate(([1.0], b)))  # run[a] = P(the first a drafts accepted)
                rest = (
                    float(np.dot(run[:-1] * (1.0 - b), after[i + 1 : i + g + 1, slot(shorter), 1]))
                    + run[g] * after[i + g + 1, slot(longer), 2]
                )
                if g:
                    after[i, slot(length)] = g * c + _v(verify_cost, g) + rest + extra
                else:  # the budget's last token: the target's own step, no draft call
                    after[i, slot(length)] = 1.0 + rest
        positions += n
        cost += after[0, slot(gamma), 1]
    if cost <= 0.0:
        raise UsageError("replaying speculative decoding needs at least one measured position")
    return positions / cost


def pearl_replayed_speedup(
    trajectories: Sequence[Sequence[float]],
    gamma: int,
    c: float,
    verify_cost: VerifyCost = 1.0,
    lookups: Sequence[Sequence[np.ndarray]] = (),
    catchup_cost: CatchupCost = None,
    alone_verify: VerifyCost | None = None,
) -> float:
    """PEARL's speedup replayed over measured acceptance, through its two modes (pearl.py), in
    units of the workers' own target step (divide by their slowdown, as choose_pearl_gamma does).
    A round at position i with u unverified drafts (pre-verify: u = 0; post-verify: u = gamma - 1)
    checks them and d_0 while the draft model drafts gamma tokens, its first call feeding the m
    tokens it lags by (1, but after a copied round everything it skipped):

        pre(i, m) = max(c_m + (gamma - 1) c, 1) + sum_a P(first rejection at a | i) pre(i + a + 1, 1)
                                                + P(d_0 accepted | i) post(i + 1)
        post(i)   = max(gamma c, v(u)) + sum_a P(...) pre(i + a + 1, 1) + P(all u + 1 | i) post(i + u + 1)

    Runs of acceptance keep PEARL in post-verify, which the i.i.d. chain fed the mean alpha
    undercounts. `lookups` (AlphaEstimate.lookups): where the context matches at position i + u,
    the round verifies U and the k copies alone instead (`alone_verify`, scoring u + k + 1 tokens,
    in the same units: on ORT the all-core session's cost over the worker's step; default the
    workers' `verify_cost`), commits the accepted j and one more token, and the draft then lags
    by what it skipped: m + j + 1 from pre-verify, max(j + 2 - u, 1) from post-verify."""
    _check(0.0, gamma, c)
    alone_verify = verify_cost if alone_verify is None else alone_verify
    catchup = _catchup_table(catchup_cost, c)
    lags = np.arange(LAG_MAX + 1)
    positions = cost = 0.0
    for t, trajectory in enumerate(trajectories):
        beta = np.clip(np.asarray(trajectory, dtype=np.float64), 0.0, 1.0)
        n = beta.size
        copies = lookups[t] if lookups else ()
        # pre[i, m]: the expected cost of committing positions i.. from pre-verify with the draft
        # lagging m tokens; post[i]: from post-verify (the draft lags 1); zero once all are committed
        pre, post = np.zeros((n + 2, LAG_MAX + 1)), np.zeros(n + 2)
        for i in range(n - 1, -1, -1):
            # gamma 1: post-verify holds no drafts, it is pre-verify with the draft lagging 1
            for u in (gamma - 1, 0) if gamma > 1 else (0,):
                at = min(i + u, n)
                copied = np.clip(copies[at][: n - at - 1], 0.0, 1.0) if copies and at < n else np.zeros(0)
                if copied.size:  # a round of copied drafts, run alone: j accepted, then one more token
                    b = np.concatenate((beta[i : i + u], copied))
                    run = np.cumprod(np.concatenate(([1.0], b)))
                    weights = np.append(run[:-1] * (1.0 - b), run[b.size])
                    lag = (lambda j: np.minimum(lags + j + 1, LAG_MAX)) if u == 0 else (lambda j: max(j + 2 - u, 1))
                    value = _v(alone_verify, u + copied.size) + sum(
                        w * pre[i + j + 1, lag(j)] for j, w in enumerate(weights)
                    )
                else:
                    b = beta[i : i + u + 1]  # U and d_0, cut where the positions end
                    run = np.cumprod(np.concatenate(([1.0], b)))
                    rest = float(np.dot(run[:-1] * (1.0 - b), pre[i + 1 : i + b.size + 1, 1])) + run[b.size] * (
                        post[i + b.size] if b.size == u + 1 else 0.0
                    )
                    drafting = catchup[lags] + (gamma - 1) * c if u == 0 else gamma * c
                    value = np.maximum(drafting, _v(verify_cost, u) if u else 1.0) + rest
                if u == 0:
                    pre[i] = value
                else:
                    post[i] = value
            if gamma == 1:
                post[i] = pre[i, 1]
        positions += n
        cost += pre[0, 1]
    if cost <= 0.0:
        raise UsageError("replaying PEARL needs at least one measured position")
    return positions / cost


def batch_predicted_speedup(
    alpha: float, gamma: int, c: float, verify_cost: VerifyCost = 1.0, candidates: int = 2
) -> float:
    """An approximation for k candidates (batch_speculative.py): a depth is accepted unless every
    live candidate is rejected, alpha_k = 1 - (1 - alpha)^k (independent rejections); the
    candidates share the first draft call (one prefix), so drafting costs c (1 + k (gamma - 1));
    verification scores candidate 0's path, plus one more target call per round in which it is
    rejected and another candidate is accepted, taken as v (1 + (1 - alpha)(k - 1))."""
    _check(alpha, gamma, c)
    k = candidates
    alpha_k = 1.0 - (1.0 - alpha) ** k
    draft = c * (1 + k * (gamma - 1))
    verify = _v(verify_cost, gamma) * (1.0 + (1.0 - alpha) * (k - 1))
    return expected_accepted_length(alpha_k, gamma) / (draft + verify)


def batch_replayed_speedup(
    trajectories: Sequence[Sequence[float]],
    first_accepts: Sequence[Sequence[float]],
    gamma: int,
    c: float,
    candidates: int,
    verify_cost: VerifyCost = 1.0,
    catchup_cost: CatchupCost = None,
) -> float:
    """Batch speculative decoding's speedup replayed over measured acceptance, as replayed_speedup
    does for one candidate. A round from position i drafts k candidates of g tokens from one
    prefix (1 + k (g - 1) draft calls), and the target scores candidate 0's path (v(g)):

        T(i, f) = c (1 + k (g - 1)) + f (c2 - c) + v(g) + (beta^k_i - beta_i) v(g - 1)
                  + sum_a P(a | i) T(i + a + 1, [a == g])

    The first position is accepted with the k candidates' probability beta^k_i (`first_accepts`,
    first_acceptance); when a candidate other than the first is, the target scores its path in
    one more call (v(g - 1)). Past the first position only the accepted candidate's branch is
    priced as live, at beta: exact greedy (the candidates' first tokens differ, so they never
    share a path), a slight underestimate sampling, where candidates that drew the same tokens
    stay live together (and share draft calls, which this prices as k branches). g = 0 (the
    budget's last token): the draft's root call and the target's own step."""
    _check(0.0, gamma, c)
    k = int(candidates)
    extra = _catchup_table(catchup_cost, c)[2] - c  # the two-token call after a fully accepted round
    positions = cost = 0.0
    for beta, first in zip(trajectories, first_accepts):
        beta = np.clip(np.asarray(beta, dtype=np.float64), 0.0, 1.0)
        first = np.maximum(np.clip(np.asarray(first, dtype=np.float64), 0.0, 1.0), beta)
        n = beta.size
        after = np.zeros((n + 1, 2))  # after[i, f]: the expected cost of committing positions i..
        for i in range(n - 1, -1, -1):
            g = min(gamma, n - i - 1)
            if g == 0:
                base = c + 1.0
            else:
                b = np.concatenate(([first[i]], beta[i + 1 : i + g]))
                run = np.cumprod(np.concatenate(([1.0], b)))
                base = (
                    c * (1 + k * (g - 1))
                    + _v(verify_cost, g)
                    + (first[i] - beta[i]) * _v(verify_cost, g - 1)
                    + float(np.dot(run[:-1] * (1.0 - b), after[i + 1 : i + g + 1, 0]))
                    + run[g] * after[i + g + 1, 1]
                )
            after[i] = (base, base + extra)
        positions += n
        cost += after[0, 0]
    if cost <= 0.0:
        raise UsageError("replaying batch speculative decoding needs at least one measured position")
    return positions / cost


def pearl_tokens_per_round(alpha: float, gamma: int) -> float:
    """(1 - alpha^gamma) / ((1 - alpha)(1 + alpha - alpha^gamma)); gamma at alpha = 1 (see module doc)."""
    _check(alpha, gamma, 0.0)
    if alpha == 1.0:
        return float(gamma)
    return (1.0 - alpha**gamma) / ((1.0 - alpha) * (1.0 + alpha - alpha**gamma))


def pearl_predicted_speedup(alpha: float, gamma: int, c: float, verify_cost: VerifyCost = 1.0) -> float:
    """S_PEARL(gamma) = E[tokens per round] / max(gamma c, v): each round costs the slower worker."""
    _check(alpha, gamma, c)
    return pearl_tokens_per_round(alpha, gamma) / max(gamma * c, _v(verify_cost, gamma))


@dataclass(frozen=True)
class GammaChoice:
    method: str  # "speculative" / "pearl", or "autoregressive" when nothing gains
    gamma: int  # the best gamma (kept for the record even when falling back)
    predicted_speedup: float  # S at that gamma
    alpha: float
    cost_ratio: float
    reason: str
    curve: dict = field(default_factory=dict)  # gamma -> predicted speedup

    def to_dict(self) -> dict:
        return {**asdict(self), "curve": {str(g): s for g, s in self.curve.items()}}


def _choose(name: str, speedup: Callable[[int], float], alpha: float, c: float, gamma_max: int) -> GammaChoice:
    if gamma_max < 1:
        raise UsageError(f"gamma_max must be at least 1, got {gamma_max}")
    curve = {g: speedup(g) for g in range(1, gamma_max + 1)}
    best = max(curve, key=lambda g: (curve[g], -g))  # ties go to the shorter draft
    s = curve[best]
    if s <= MIN_GAIN:
        return GammaChoice(
            "autoregressive",
            best,
            s,
            alpha,
            c,
            f"no gain: the best predicted speedup is {s:.3f} at gamma={best} (alpha={alpha:.3f}, "
            f"c={c:.3f}), so decode autoregressively",
            curve,
        )
    return GammaChoice(
        name, best, s, alpha, c, f"gamma={best} maximises the predicted speedup {s:.3f} over 1..{gamma_max}", curve
    )


def choose_gamma(
    alpha: float,
    c: float,
    *,
    gamma_max: int = GAMMA_MAX,
    verify_cost: VerifyCost = 1.0,
    trajectories: Sequence[Sequence[float]] = (),
    catchup_cost: CatchupCost = None,
    schedule: Schedule | None = None,
    lookups: Sequence[Sequence[np.ndarray]] = (),
) -> GammaChoice:
    """gamma* = argmax S(gamma) over 1..gamma_max, or autoregressive when max S <= 1. With
    measured `trajectories`, S is replayed over them (replayed_speedup; with a `schedule`, gamma
    is where the draft length starts; with `lookups`, rounds copy from the context where they
    can); else R6's i.i.d. S."""
    if trajectories:
        return _choose(
            "speculative",
            lambda g: replayed_speedup(trajectories, g, c, verify_cost, catchup_cost, schedule, lookups),
            alpha,
            c,
            gamma_max,
        )
    return _choose("speculative", lambda g: predicted_speedup(alpha, g, c, verify_cost), alpha, c, gamma_max)


def choose_batch_gamma(
    alpha: float,
    c: float,
    candidates: int,
    *,
    gamma_max: int = GAMMA_MAX,
    verify_cost: VerifyCost = 1.0,
    trajectories: Sequence[Sequence[float]] = (),
    first_accepts: Sequence[Sequence[float]] = (),
    catchup_cost: CatchupCost = None,
) -> GammaChoice:
    """Batch speculative decoding's draft length: replayed over measured `trajectories` and the
    k candidates' `first_accepts` (batch_replayed_speedup), else the i.i.d. approximation."""
    if trajectories and first_accepts:
        return _choose(
            "batch_speculative",
            lambda g: batch_replayed_speedup(trajectories, first_accepts, g, c, candidates, verify_cost, catchup_cost),
            alpha,
            c,
            gamma_max,
        )
    return _choose(
        "batch_speculative",
        lambda g: batch_predicted_speedup(alpha, g, c, verify_cost, candidates),
        alpha,
        c,
        gamma_max,
    )


def choose_pearl_gamma(
    alpha: float,
    c: float,
    *,
    gamma_max: int = GAMMA_MAX,
    verify_cost: VerifyCost = 1.0,
    worker_slowdown: float = 1.0,
    trajectories: Sequence[Sequence[float]] = (),
    lookups: Sequence[Sequence[np.ndarray]] = (),
    catchup_cost: CatchupCost = None,
    alone_verify: VerifyCost | None = None,
) -> GammaChoice:
    """PEARL's window: argmax S_PEARL(gamma), or autoregressive when max S_PEARL <= 1; with
    measured `trajectories` (and `lookups`, with the draft's `catchup_cost` and the cost of the
    rounds made alone, `alone_verify`), S_PEARL is replayed over them (pearl_replayed_speedup).

    PEARL's two workers split the cores, so each model steps slower than it does alone:
    `c` and `verify_cost` are the workers' own, and `worker_slowdown` is the target worker's
    step time over the autoregressive step (all cores) that the speedup is measured against."""
    if worker_slowdown <= 0:
        raise UsageError(f"worker_slowdown must be positive, got {worker_slowdown}")
    if trajectories:
        return _choose(
            "pearl",
            lambda g: (
                pearl_replayed_speedup(trajectories, g, c, verify_cost, lookups, catchup_cost, alone_verify)
                / worker_slowdown
            ),
            alpha,
            c,
            gamma_max,
        )
    return _choose(
        "pearl", lambda g: pearl_predicted_speedup(alpha, g, c, verify_cost) / worker_slowdown, alpha, c, gamma_max
    )
