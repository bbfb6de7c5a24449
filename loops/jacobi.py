"""Greedy Jacobi decoding over a window (Santilli et al., arXiv 2305.10427, section 3; the Jacobi
iteration lookahead decoding builds on, Fu et al., arXiv 2402.02057, section 2).

Greedy decoding solves y_i = argmax p(. | prompt, y_<i) one position at a time. Jacobi decoding
iterates a window of W positions at once, to a fixed point: guess the W - 1 tokens after the
last committed one, score `[last] + guesses` in ONE causal `extend` (a StepModel returns logits
for every fed position) and read off every position's argmax:

    fed:         last    g_1     g_2    ...   g_{W-1}
    prediction:  y_1     y_2     y_3    ...   y_W        (y_i given the committed text and g_<i)

y_1 is the greedy token (its context is committed text). y_{i+1} is too, as long as g_1..g_i
equal y_1..y_i, so every call commits 1 + (the guesses that matched) tokens: exactly the greedy
output, whatever the guesses. The KV state keeps the accepted positions (`truncate` drops the
rest) and the predictions past them become the next call's guesses (the Jacobi update, shifted
so the window starts after the new last token). W = 1 feeds one token a call: greedy decoding.

A call feeds W tokens, so it pays off only where a W-token call costs little more than a
one-token one (`passes/lookahead.py` measures both). `window_decode` is the loop; a `Guesser`
says what a call feeds after the last token and learns from what it predicted: the plain
Jacobi window here, the n-gram pool of lookahead decoding in `lookahead.py`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from accelc.errors import UsageError
from accelc.loops import registry
from accelc.loops.autoregressive import GenerationResult
from accelc.loops.cursor import check_args, commit
from accelc.runtime.base import StepModel

DEFAULT_WINDOW = 7  # lookahead decoding's default W (arXiv 2402.02057; hao-ai-lab/LookaheadDecoding)


def check_window(window: int) -> None:
    if not isinstance(window, int) or isinstance(window, bool) or window < 1:
        raise UsageError(
            f"the Jacobi window must be a whole number of tokens >= 1 (1 is greedy decoding), got {window!r}"
        )


def plan_value(plan, key: str, default: int):
    """A setting the decode plan carries beside its typed fields (window, ngram, ...), checked by
    the options it builds."""
    return (plan.model_extra or {}).get(key, default)


class Guesser(Protocol):
    def chain(self, tokens: Sequence[int], guesses: list[int], limit: int) -> list[int]:
        """At most `limit` tokens fed after the last committed token (`guesses`: the window's)."""
        ...

    def observe(self, start: int, fed: Sequence[int], predictions: np.ndarray, accepted: int) -> None:
        """What a call predicted after each fed token (fed[0] at position `start` of the text);
        `accepted` of the fed guesses were kept."""
        ...


class WindowGuesser:
    """Plain Jacobi: the call feeds the window's guesses as they are."""

    def chain(self, tokens: Sequence[int], guesses: list[int], limit: int) -> list[int]:
        return guesses[:limit]

    def observe(self, start: int, fed: Sequence[int], predictions: np.ndarray, accepted: int) -> None:
        pass


def initial_guesses(prompt: Sequence[int], count: int) -> list[int]:
    """The first window: the prompt's last tokens (any guess is exact; text that repeats its
    context makes these right more often than a constant)."""
    tail = list(prompt[-count:]) if count else []
    return (tail * (count // max(len(tail), 1) + 1))[:count]


def next_guesses(predictions: np.ndarray, accepted: int, count: int) -> list[int]:
    """The Jacobi update: the predictions past the new last token (position accepted + 1 on),
    padded with the last prediction to `count` tokens."""
    rest = [int(t) for t in predictions[accepted + 1 :]][:count]
    pad = rest[-1] if rest else int(predictions[-1])
    return rest + [pad] * (count - len(rest))


def window_decode(
    model: StepModel,
    prompt: Sequence[int],
    max_new_tokens: int,
    *,
    window: int,
    guesser: Guesser,
    eos_ids: Sequence[int] = (),
    method: str = "jacobi",
) -> GenerationResult:
    """Greedy decoding, a window of `window` positions per call (see the module doc). Stats:
    target_calls (the prefill included, as autoregressive decoding counts it), tokens_per_call,
    and per decode call the tokens fed and committed (what the lookahead pass prices)."""
    check_args(prompt, max_new_tokens)
    check_window(window)
    n_prompt = len(prompt)
    t0 = time.perf_counter()
    logits, state = model.prefill(np.asarray(prompt, dtype=np.int64))
    t1 = time.perf_counter()
    tokens = list(prompt)
    done = commit(tokens, [int(np.argmax(logits[-1]))], n_prompt, max_new_tokens, eos_ids)
    guesses = initial_guesses(prompt, window - 1)
    fed_lengths: list[int] = []
    committed: list[int] = []
    while not done:
        n = len(tokens)  # the state holds tokens[:-1]: the last token is fed by this call
        budget = max_new_tokens - (n - n_prompt)  # tokens still to commit, the next one included
        chain = [int(t) for t in guesser.chain(tokens, guesses, budget - 1)]
        fed = [tokens[-1], *chain]
        logits, state = model.extend(state, np.asarray(fed, dtype=np.int64))
        predictions = np.argmax(logits, axis=-1)
        accepted = 0
        while accepted < len(chain) and chain[accepted] == predictions[accepted]:
            accepted += 1
        state = model.truncate(state, n + accepted)  # keeps last + the accepted guesses
        before = len(tokens)
        done = commit(tokens, [int(t) for t in predictions[: accepted + 1]], n_prompt, max_new_tokens, eos_ids)
        fed_lengths.append(len(fed))
        committed.append(len(tokens) - before)
        guesser.observe(n - 1, fed, predictions, accepted)
        guesses = next_guesses(predictions, accepted, window - 1)
    t2 = time.perf_counter()
    new = tokens[n_prompt:]
    calls = 1 + len(fed_lengths)
    stats = {
        "method": method,
        "window": window,
        "target_calls": calls,
        "target_tokens_fed": n_prompt + sum(fed_lengths),
        "tokens_per_call": len(new) / calls,
        "call_tokens_fed": fed_lengths,
        "call_tokens_committed": committed,
    }
    return GenerationResult(new, t1 - t0, t2 - t1, stats)


@dataclass(frozen=True)
class JacobiOptions:
    window: int = DEFAULT_WINDOW

    def __post_init__(self):
        check_window(self.window)

    @classmethod
    def from_plan(cls, plan) -> JacobiOptions:
        return cls(plan_value(plan, "window", DEFAULT_WINDOW))


def jacobi_generate(
    model: StepModel,
    prompt: Sequence[int],
    max_new_tokens: int,
    *,
    window: int = DEFAULT_WINDOW,
    eos_ids: Sequence[int] = (),
) -> GenerationResult:
    """Greedy Jacobi decoding: the target's greedy output, `window` positions iterated a call."""
    return window_decode(model, prompt, max_new_tokens, window=window, guesser=WindowGuesser(), eos_ids=eos_ids)


def _generate(target, draft, prompt, max_new_tokens, options: JacobiOptions, *, sampler, eos_ids, seed):
    return jacobi_generate(target, prompt, max_new_tokens, window=options.window, eos_ids=tuple(eos_ids))


registry.register_loop(registry.Loop("jacobi", _generate, JacobiOptions, greedy_only=True))
