"""Lookahead decoding (Fu et al., arXiv 2402.02057): a Jacobi window plus a pool of n-grams
collected from its trajectories, verified in the same call, over the causal StepModel protocol.

The paper's step is one forward pass over a token tree: a lookahead branch (the Jacobi window,
W positions, with its last N - 1 iterations kept as levels) and a verification branch (G
candidate n-grams from the pool that start with the last committed token), told apart by a
special attention mask. A StepModel's `extend` is causal over the k tokens it is fed, and the
ORT, OpenVINO and TVM graphs take no attention mask of another shape, so the G candidates cannot
share a call without changing every backend's graph. What one call is here, on every backend:

    fed = [last] + candidate + the window's guesses for the positions after it

one causal chain of 1 + max(W - 1, candidate) tokens, a candidate being N - 1 tokens (a copy
from the context: up to lookup's `tokens`), fewer near the token budget: the chosen
candidate is verified in front of the window (the verification branch), and the window's guesses
past it are iterated as in Jacobi decoding (`jacobi.py`, the lookahead branch; where the
candidate is rejected, the predictions after it still become the next window). Every
prediction whose context matched is the greedy token, so the output is exactly the greedy one.

The pool: a token a call predicts at position p followed the token fed at p - 1, which the call
before predicted after the token fed at p - 2, and so on: the window's trajectory along one
diagonal of the paper's 2D window (its N - 1 levels). Every such chain of N tokens goes into
the pool under its first token, at most G per key, the freshest first. The candidate a call verifies is, in order of preference:

  1. the remainder of another candidate of the last call that agreed with every token the last
     call committed (so G candidates are consulted, one call at a time, at no extra call);
  2. with `lookup` (prompt lookup decoding, `lookup.py`), what followed the latest earlier
     occurrence of the text's last tokens in the context: copies join the pool's candidates;
  3. the pool's freshest n-gram after the last token.

G = 0 verifies nothing but copies: lookahead is then Jacobi decoding (with prompt lookup).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from accelc.errors import UsageError
from accelc.loops import registry
from accelc.loops.autoregressive import GenerationResult
from accelc.loops.jacobi import DEFAULT_WINDOW, check_window, plan_value, window_decode
from accelc.loops.lookup import Lookup, lookup_draft
from accelc.runtime.base import StepModel

DEFAULT_NGRAM = 5  # N, the paper's LEVEL default
DEFAULT_GUESS_SET = 7  # G, the paper's GUESS_SET_SIZE default


def check_lookahead(ngram: int, window: int, guess_set: int) -> None:
    def whole(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    if not whole(ngram) or ngram < 2:
        raise UsageError(
            f"lookahead n-gram size N must be an integer >= 2 (a candidate is N - 1 tokens after the last one), "
            f"got {ngram!r}"
        )
    check_window(window)
    if not whole(guess_set) or guess_set < 0:
        raise UsageError(
            f"lookahead guess set size G (n-grams kept per first token) must be an integer >= 0, got {guess_set!r}"
        )


class NgramPool:
    """N-grams keyed by their first token; per key at most `guess_set` continuations, freshest first."""

    def __init__(self, ngram: int, guess_set: int):
        self.ngram, self.guess_set = ngram, guess_set
        self._grams: dict[int, list[tuple[int, ...]]] = {}

    def add(self, gram: Sequence[int]) -> None:
        if self.guess_set == 0:
            return
        key, rest = int(gram[0]), tuple(int(t) for t in gram[1:])
        kept = self._grams.setdefault(key, [])
        if rest in kept:
            kept.remove(rest)
        kept.insert(0, rest)
        del kept[self.guess_set :]

    def candidates(self, key: int) -> list[tuple[int, ...]]:
        return list(self._grams.get(int(key), ()))

    def __len__(self) -> int:
        return sum(len(v) for v in self._grams.values())


class LookaheadGuesser:
    """What each lookahead call feeds (see the module doc) and the pool it learns from."""

    def __init__(self, ngram: int, guess_set: int, lookup: Lookup | None):
        self.pool = NgramPool(ngram, guess_set)
        self.lookup = lookup
        self._candidates: list[tuple[int, ...]] = []
        self._chosen: tuple[int, ...] = ()
        self._follow: tuple[int, ...] = ()
        # position -> the token the last call predicted there, after the N - 1 tokens it followed
        # along the Jacobi iterations that led to it (the paper's 2D window, one diagonal a position)
        self._trajectories: dict[int, tuple[int, ...]] = {}
        self.candidate_calls = self.candidate_tokens = self.lookup_calls = self.follow_calls = 0

    def chain(self, tokens: Sequence[int], guesses: list[int], limit: int) -> list[int]:
        candidates = [self._follow] if self._follow else []
        copied = tuple(lookup_draft(tokens, self.lookup, limit)) if self.lookup is not None else ()
        if copied:
            candidates.append(copied)
        candidates += self.pool.candidates(tokens[-1])
        self._candidates = candidates
        self._chosen = tuple(candidates[0][:limit]) if candidates and limit > 0 else ()
        if self._chosen:
            self.candidate_calls += 1
            self.follow_calls += bool(self._follow)
            self.lookup_calls += bool(copied) and candidates[0] is copied
        return (list(self._chosen) + guesses[len(self._chosen) :])[:limit]

    def observe(self, start: int, fed: Sequence[int], predictions: np.ndarray, accepted: int) -> None:
        n = self.pool.ngram
        trajectories = {}
        for i, token in enumerate(fed):
            # the token fed at start + i continues the trajectory the last call predicted there
            before = self._trajectories.get(start + i, ())
            history = before if before[-1:] == (token,) else (token,)
            gram = (*history, int(predictions[i]))[-n:]
            trajectories[start + i + 1] = gram
            if len(gram) == n:
                self.pool.add(gram)
        self._trajectories = trajectories
        self.candidate_tokens += min(accepted, len(self._chosen))
        committed = tuple(int(t) for t in predictions[: accepted + 1])
        self._follow = next(
            (
                c[len(committed) :]
                for c in self._candidates[1:]
                if len(c) > len(committed) and c[: len(committed)] == committed
            ),
            (),
        )

    def stats(self) -> dict:
        return {
            "pool_ngrams": len(self.pool),
            "candidate_calls": self.candidate_calls,
            "candidate_tokens_accepted": self.candidate_tokens,
            "lookup_calls": self.lookup_calls,
            "follow_calls": self.follow_calls,
        }


def lookahead_generate(
    model: StepModel,
    prompt: Sequence[int],
    max_new_tokens: int,
    *,
    ngram: int = DEFAULT_NGRAM,
    window: int = DEFAULT_WINDOW,
    guess_set: int = DEFAULT_GUESS_SET,
    lookup: Lookup | None = None,
    eos_ids: Sequence[int] = (),
) -> GenerationResult:
    """Greedy lookahead decoding (N, W, G as in the paper; `lookup`: prompt lookup's copies join
    the candidates): exactly the target's greedy output."""
    check_lookahead(ngram, window, guess_set)
    guesser = LookaheadGuesser(ngram, guess_set, lookup)
    result = window_decode(
        model, prompt, max_new_tokens, window=window, guesser=guesser, eos_ids=eos_ids, method="lookahead"
    )
    result.stats.update(
        ngram=ngram, guess_set=guess_set, lookup=lookup.to_dict() if lookup else None, **guesser.stats()
    )
    return result


@dataclass(frozen=True)
class LookaheadOptions:
    ngram: int = DEFAULT_NGRAM
    window: int = DEFAULT_WINDOW
    guess_set: int = DEFAULT_GUESS_SET
    lookup: Lookup | None = None

    def __post_init__(self):
        check_lookahead(self.ngram, self.window, self.guess_set)

    @classmethod
    def from_plan(cls, plan) -> LookaheadOptions:
        return cls(
            plan_value(plan, "ngram", DEFAULT_NGRAM),
            plan_value(plan, "window", DEFAULT_WINDOW),
            plan_value(plan, "guess_set", DEFAULT_GUESS_SET),
            plan.copying(),
        )


def _generate(target, draft, prompt, max_new_tokens, options: LookaheadOptions, *, sampler, eos_ids, seed):
    return lookahead_generate(
        target,
        prompt,
        max_new_tokens,
        ngram=options.ngram,
        window=options.window,
        guess_set=options.guess_set,
        lookup=options.lookup,
        eos_ids=tuple(eos_ids),
    )


registry.register_loop(
    registry.Loop("lookahead", _generate, LookaheadOptions, greedy_only=True, copies_from_context=True)
)
