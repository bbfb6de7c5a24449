"""Replay maths of the speculative cost model: predicted speedups, and the draft length to use.

Pure functions of measured acceptance (calibration.py) and costs (timing.py); nothing here runs a model.

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

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from accelc.errors import InternalError, UsageError

GAMMA_MAX = 16  # S(gamma) of arXiv 2211.17192 theorem 3.8 is unimodal in practice and peaks well below 16
MIN_GAIN = 1.0  # speculate only when the best predicted speedup exceeds plain decoding's 1.0
# copy drafts from the context only when the replay predicts at least this gain over not copying:
# what it does not price (a longer verify call's rows checked in Python, PEARL's rounds made more
# even, so their slower worker's jitter shows) measured 5-7% for PEARL, whose predicted gain was 1-3%
MIN_COPY_GAIN = 1.05

VerifyCost = float | Callable[[int], float]
CatchupCost = float | Callable[[int], float] | None
LAG_MAX = 33  # tokens a draft's catch-up call is priced for at most (longer calls: as this one)


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
        raise InternalError("replaying speculative decoding needs at least one measured position")
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
        raise InternalError("replaying PEARL needs at least one measured position")
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
        raise InternalError("replaying batch speculative decoding needs at least one measured position")
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
