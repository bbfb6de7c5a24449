"""Calibration that runs models: the acceptance rate alpha of a draft against its target.

alpha = E[beta], beta = sum_x min(p(x), q(x)) = 1 - TV(p, q) per position (Leviathan et al.
2023, arXiv:2211.17192), measured along the target's own continuations of calibration prompts;
the per-position betas are what replay.py replays through each loop.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from accelc.errors import UsageError
from accelc.loops.autoregressive import Sampler, generate
from accelc.loops.cursor import check_pair
from accelc.loops.lookup import Lookup, lookup_draft
from accelc.runtime.base import StepModel

CALIBRATION_NEW_TOKENS = 32  # target-sampled positions per calibration prompt (4 x 16 left a 0.04 stderr)


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
