"""The exact accept/reject/residual rule every draft-then-verify loop shares, its per-position
randomness, and the statistics of verified positions.

The rule (Leviathan et al. 2023, arXiv:2211.17192, Algorithm 1; Chen et al. 2023,
arXiv:2302.01318): accept a draft x ~ q with probability min(1, p(x) / q(x)); at the first
rejection sample r = max(p - q, 0) / sum(max(p - q, 0)). At temperature 0 it reads "accept while
the draft equals the target's argmax, then take the target's argmax".

Randomness uses per-position streams: the uniform behind a decision at absolute position n comes
from (seed, n, stream, index) alone. A committed token depends only on its own position's streams
and on earlier tokens, which keeps the rule exact however rounds fall, and makes runs reproducible
across loops and across threaded / sequential schedules. The draft's token at n uses the DRAFT
stream; a token the target samples itself (first token, bonus) uses the same stream, so with
draft == target speculative, batch speculative and PEARL emit the same sequence for the same seed.

Statistics (GenerationResult.stats), shared by every method in this package:
    target_calls, draft_calls   model calls, prefill included
    drafted                     draft tokens proposed (batch speculative: every candidate's)
    verified                    positions where a draft token was checked against the target
    accepted                    draft tokens accepted
    rejections                  verified positions that ended in a residual sample
    expected_rejections         sum of TV(p, q) over verified positions (arXiv 2411.00841)
    acceptance_rate             accepted / verified: the empirical alpha of the cost model
    draft_efficiency            accepted / drafted
    mean_accepted_length        tokens committed per verification round (R6's
                                (1 - alpha^(gamma+1)) / (1 - alpha); the prefill token excluded)
    draft_catchup_calls         draft calls feeding several tokens (after a fully accepted round,
                                or rounds the draft sat out)
    lookup_rounds               rounds whose drafts were copied from the context (lookup.py)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from accelc.loops.autoregressive import Sampler

if TYPE_CHECKING:  # the cursor module builds on this one
    from accelc.loops.cursor import ModelCursor

RESIDUAL_FLOOR = 1e-12  # a residual with less mass is rounding noise of p == q: sample p itself

# Random streams of one position (see the module docstring).
STREAM_DRAFT, STREAM_ACCEPT, STREAM_RESIDUAL = 0, 1, 2
_MASK64 = (1 << 64) - 1


# --------------------------------------------------------------------------- randomness
def _splitmix64(z: int) -> int:
    z = (z + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def position_uniform(seed: int, position: int, stream: int, index: int = 0) -> float:
    """A uniform in [0, 1) fixed by (seed, absolute position, stream, index) and nothing else.

    SplitMix64 chained over the four keys: a counter-based generator, so no state is carried
    between rounds or threads (and it costs a microsecond, not a Generator construction).
    """
    z = _splitmix64(seed & _MASK64)
    z = _splitmix64(z ^ (position & _MASK64))
    z = _splitmix64(z ^ (stream & _MASK64))
    z = _splitmix64(z ^ (index & _MASK64))
    return (z >> 11) * (1.0 / (1 << 53))


def sample_index(p: np.ndarray, u: float) -> int:
    """Inverse-CDF draw from the nonnegative weights p (any positive total) with the uniform u."""
    c = np.cumsum(p)
    i = int(np.searchsorted(c, u * c[-1], side="right"))
    if i >= p.size:  # u * total rounded up to total: the last token with mass
        i = int(np.flatnonzero(p)[-1])
    return i


def own_sample(logits: np.ndarray, sampler: Sampler, seed: int, position: int) -> int:
    """A token the target picks itself (first token, bonus, or a step with no draft)."""
    if sampler.temperature == 0.0:
        return int(np.argmax(logits))
    return sample_index(sampler.probs(logits), position_uniform(seed, position, STREAM_DRAFT))


def verify_token(p: np.ndarray, q: np.ndarray, x: int, u_accept: float, u_residual: float) -> tuple[bool, int]:
    """The exact rule at one position: (True, x) keeps the draft x ~ q, else (False, a residual sample).

    Accept with probability min(1, p(x)/q(x)), written u * q(x) < p(x) so p >= q always accepts.
    """
    if u_accept * q[x] < p[x]:
        return True, x
    r = np.maximum(p - q, 0.0)
    if r.sum() <= RESIDUAL_FLOOR:
        r = p
    return False, sample_index(r, u_residual)


def tv_distance(p: np.ndarray, q: np.ndarray) -> float:
    """TV(p, q) = 1/2 sum |p - q| = 1 - sum min(p, q)."""
    return 0.5 * float(np.abs(p - q).sum())


# --------------------------------------------------------------------------- statistics
@dataclass
class SpecStats:
    rounds: int = 0
    drafted: int = 0
    verified: int = 0
    accepted: int = 0
    rejections: int = 0
    expected_rejections: float = 0.0
    round_tokens: int = 0  # tokens committed by verification rounds (the prefill token excluded)
    lookup_rounds: int = 0  # rounds whose drafts were copied from the context (lookup.py)

    def record(self, p: np.ndarray | None, q: np.ndarray | None, accepted: bool, *, greedy_tv: float = 0.0) -> None:
        """One verified position: a draft checked against the target."""
        self.verified += 1
        self.expected_rejections += greedy_tv if p is None else tv_distance(p, q)
        if accepted:
            self.accepted += 1
        else:
            self.rejections += 1

    def as_dict(self, target: ModelCursor, draft: ModelCursor, **extra) -> dict:
        return {
            "target_calls": target.calls,
            "draft_calls": draft.calls,
            "target_tokens_fed": target.tokens_fed,
            "draft_tokens_fed": draft.tokens_fed,
            "draft_catchup_calls": draft.multi_token_calls,
            "lookup_rounds": self.lookup_rounds,
            "rounds": self.rounds,
            "drafted": self.drafted,
            "verified": self.verified,
            "accepted": self.accepted,
            "rejections": self.rejections,
            "expected_rejections": self.expected_rejections,
            "acceptance_rate": self.accepted / self.verified if self.verified else 0.0,
            "draft_efficiency": self.accepted / self.drafted if self.drafted else 0.0,
            "mean_accepted_length": self.round_tokens / self.rounds if self.rounds else 0.0,
            **extra,
        }


def verify_chain(
    rows: np.ndarray,
    drafts: Sequence[int],
    qs: Sequence[np.ndarray | None],
    sampler: Sampler,
    seed: int,
    start: int,
    stats: SpecStats,
) -> tuple[int, int | None]:
    """Check drafts[i] (at position start + i) against rows[i] in turn.

    Returns (j, t): j drafts accepted, then t = the residual (or, greedy, the target's argmax)
    at the first rejection, or None when all were accepted.
    """
    greedy = sampler.temperature == 0.0
    for i, x in enumerate(drafts):
        if greedy:
            choice = int(np.argmax(rows[i]))
            ok = choice == x
            stats.record(None, None, ok, greedy_tv=0.0 if ok else 1.0)
            if not ok:
                return i, choice
        else:
            p = sampler.probs(rows[i])
            pos = start + i
            ok, t = verify_token(
                p, qs[i], x, position_uniform(seed, pos, STREAM_ACCEPT), position_uniform(seed, pos, STREAM_RESIDUAL)
            )
            stats.record(p, qs[i], ok)
            if not ok:
                return i, t
    return len(drafts), None
