"""Pricing loops that feed a window of tokens a call (jacobi.py, lookahead.py) against greedy
decoding, from runs of the loops and the backend's measured per-call cost curve.

Greedy decoding feeds and commits one token a call. A window loop's call feeds k tokens and
commits c >= 1 of them. With cost(k) the time of a k-token call over a one-token call on the
same model (timing.call_cost_curve), runs whose decode calls fed k_1..k_m tokens and committed
c_1..c_m decode

    speedup = sum c_i / sum cost(k_i)

times as fast as greedy decoding (the prompt's prefill is the same for both). How many guesses a
call keeps depends on the text and on every call before it (the pool fills as it runs), which
no closed form holds, so the loops are run on calibration prompts rather than modelled. On a GPU
cost(k) stays near 1 up to dozens of tokens; on a small CPU it grows with k from the start, and
then no window pays (the plan keeps greedy decoding and says so, with the curve).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from accelc.loops.timing import monotone


@dataclass(frozen=True)
class WindowRun:
    """One generation's decode calls: tokens each fed and committed (a loop's stats)."""

    fed: tuple[int, ...]
    committed: tuple[int, ...]

    @classmethod
    def of(cls, result) -> WindowRun:
        return cls(tuple(result.stats["call_tokens_fed"]), tuple(result.stats["call_tokens_committed"]))


def call_cost(curve: dict[int, float], k: int) -> float:
    """cost(k) from the measured curve (interpolated, nondecreasing; past its end: linear in k
    from its last point, never cheaper a token than there)."""
    last = max(curve)
    if k <= last:
        return monotone(curve, k, default=float(k))
    return monotone(curve, last, default=float(last)) * k / last


def predicted_speedup(runs: Sequence[WindowRun], curve: dict[int, float]) -> float:
    """Decode-phase speedup over greedy decoding: tokens committed over the calls' summed cost."""
    tokens = sum(sum(r.committed) for r in runs)
    cost = sum(call_cost(curve, k) for r in runs for k in r.fed)
    return tokens / cost if cost else 1.0


@dataclass(frozen=True)
class Priced:
    """A configuration of a window loop, priced from its calibration runs."""

    name: str  # how reports name it: "jacobi", "lookahead", "lookahead+lookup"
    strategy: str  # the loop
    settings: dict  # its decode plan fields (window, ngram, guess_set, lookup)
    tokens_per_call: float  # committed per decode call
    tokens_fed_per_call: float
    predicted_speedup: float
    identical_to_greedy: bool

    @classmethod
    def of(cls, name: str, strategy: str, settings: dict, runs: Sequence[WindowRun], curve, identical: bool) -> Priced:
        calls = sum(len(r.fed) for r in runs) or 1
        return cls(
            name,
            strategy,
            settings,
            sum(sum(r.committed) for r in runs) / calls,
            sum(sum(r.fed) for r in runs) / calls,
            predicted_speedup(runs, curve),
            identical,
        )

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "strategy": self.strategy,
            "settings": self.settings,
            "tokens_per_call": self.tokens_per_call,
            "tokens_fed_per_call": self.tokens_fed_per_call,
            "predicted_speedup": self.predicted_speedup,
            "identical_to_greedy": self.identical_to_greedy,
        }


@dataclass(frozen=True)
class WindowChoice:
    strategy: str  # the winner's loop, or "greedy"
    settings: dict
    predicted_speedup: float
    reason: str


def choose(
    priced: Sequence[Priced], curve: dict[int, float], min_speedup: float = 1.0, fallback: bool = True
) -> WindowChoice:
    """The configuration predicted fastest, or greedy decoding (with the measured reason) where
    none is predicted faster than `min_speedup` x greedy; `fallback` False plans the fastest anyway
    (to measure it), unless it missed the greedy tokens."""
    best = max(priced, key=lambda p: p.predicted_speedup)
    if not best.identical_to_greedy:
        reason = f"{best.name} did not reproduce the greedy tokens on calibration (near-tied logits across call sizes)"
        return WindowChoice("greedy", {}, 1.0, reason)
    k = round(best.tokens_fed_per_call)
    why = (
        f"{best.name} commits {best.tokens_per_call:.2f} tokens a call feeding {best.tokens_fed_per_call:.1f}, "
        f"and a {k}-token call costs {call_cost(curve, k):.2f} one-token calls here"
    )
    if best.predicted_speedup > min_speedup:
        reason = f"{best.name} predicted {best.predicted_speedup:.2f}x greedy decoding: {why}"
    elif fallback:
        reason = f"no window pays: {why} (predicted {best.predicted_speedup:.2f}x); greedy decoding is kept"
        return WindowChoice("greedy", {}, 1.0, reason)
    else:
        reason = (
            f"no window pays: {why} (predicted {best.predicted_speedup:.2f}x); the recipe disabled the "
            f"fallback, so {best.name} is planned anyway"
        )
    return WindowChoice(best.strategy, best.settings, best.predicted_speedup, reason)
