""" "Stairs" assisted greedy generation (Grigaliunas & Lukosevicius, IVUS 2024, arXiv 2407.19947).

Each round the assistant (draft) greedily proposes n tokens d_1..d_n, the large model (target)
predicts its greedy token m_i after prefix + d_1..d_i for every i = 0..n, the longest run with
d_i = m_{i-1} is kept and the target's own m_k is appended. Kept tokens are exactly what target
greedy decoding would produce, so the output equals it token for token, for any assistant.

Two validations give the same m_0..m_n:
- "staircase" (the paper's form, the fallback): n + 1 inputs prefix, prefix + d_1, ...,
  prefix + d_1..d_n, using only the LAST position's logits of each, which is all a model that
  exposes last-position logits offers. On the batch-1 StepModel protocol the staircase's rows
  are n + 1 extend calls from the shared KV prefix (O(n^2) tokens in all).
- "single" (the lowering): one causal extend over prefix + d_1..d_n returns all n + 1
  predictions at once (standard speculative verification), 1 call and n + 1 tokens.
`validation="auto"` lowers to "single" whenever the target returns all-position logits, which
every StepModel does; a model object can opt out with `all_position_logits = False`.

The assistant's batch size n adapts as HF assisted generation does (transformers' `AssistedCandidateGenerator`):
start at `candidates` (HF's 5 by default; a decode plan starts it at its gamma), +2 after a round
where all were accepted, else -1 (never below 1).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np

from accelc.errors import InternalError, UsageError
from accelc.loops import registry
from accelc.loops.acceptance import SpecStats
from accelc.loops.autoregressive import GenerationResult, Sampler
from accelc.loops.cursor import ModelCursor, begin, check_args, commit, propose
from accelc.loops.lookup import Lookup
from accelc.loops.pricing import Pricing, one_sequence_chooser
from accelc.loops.registry import DraftOptions
from accelc.runtime.base import StepModel

INITIAL_CANDIDATES = 5  # HF assisted generation's starting num_assistant_tokens
GROW_ON_FULL_ACCEPT = 2  # HF's heuristic schedule: +2 when every candidate was accepted
SHRINK_ON_REJECT = 1  # ... and -1 otherwise
VALIDATIONS = ("auto", "single", "staircase")


def next_candidates(n: int, all_accepted: bool) -> int:
    """The assistant's next batch size: +2 after a round that accepted every candidate, else -1
    (never below 1). replay.replayed_speedup replays the same schedule."""
    return n + GROW_ON_FULL_ACCEPT if all_accepted else max(1, n - SHRINK_ON_REJECT)


def staircase_predictions(cursor: ModelCursor, tokens: list[int], drafts: list[int]):
    """m_0..m_n from n + 1 staircase rows, each read from its last position only.

    Returns (m, states, rows): the row-i state holds tokens + drafts[:i], rows[i] its last logits.
    """
    base = cursor.state
    have = base.length
    if cursor.fed[:have] != tokens[:have]:
        raise InternalError("KV state out of step with the sequence: a rollback is missing")
    states, rows = [], []
    for i in range(len(drafts) + 1):
        seq = tokens + drafts[:i]
        if have == len(seq) and cursor.next_logits is not None:
            last, state = cursor.next_logits, base
        else:
            logits, state = cursor.extend(base, seq[have:])
            last = logits[-1]
        states.append(state)
        rows.append(last)
    return [int(np.argmax(r)) for r in rows], states, rows


def stairs_generate(
    target: StepModel,
    draft: StepModel,
    prompt: Sequence[int],
    max_new_tokens: int,
    *,
    candidates: int = INITIAL_CANDIDATES,
    adaptive: bool = True,
    eos_ids: Sequence[int] = (),
    validation: str = "auto",
    prompt_kv_from_target: bool = False,
    lookup: Lookup | None = None,
) -> GenerationResult:
    """Greedy assisted generation; `candidates` is the assistant's (initial) batch size n;
    prompt_kv_from_target: see speculative.open_pair; lookup: rounds copy their candidates from
    the context where it has a match (lookup.py; the assistant's batch size is then left as it is)."""
    check_args(prompt, max_new_tokens, candidates=candidates)
    if validation not in VALIDATIONS:
        raise UsageError(f"validation must be one of {', '.join(VALIDATIONS)}, got {validation!r}")
    if validation == "auto":
        validation = "single" if getattr(target, "all_position_logits", True) else "staircase"
    greedy = Sampler()
    t0 = time.perf_counter()
    n_prompt = len(prompt)
    tgt, dft, tokens, done = begin(
        target, draft, prompt, max_new_tokens, eos_ids, lambda logits: int(np.argmax(logits)), prompt_kv_from_target
    )
    t1 = time.perf_counter()
    stats = SpecStats()
    n_assist = candidates
    schedule = []
    while not done:
        n = len(tokens)
        budget = max_new_tokens - (n - n_prompt) - 1
        drafts, _, copied = propose(dft, tokens, min(n_assist, budget), greedy, 0, lookup, budget)
        g = len(drafts)
        schedule.append(g)
        stats.lookup_rounds += copied
        if validation == "single":
            m = [int(i) for i in np.argmax(tgt.logits_from(tokens + drafts, start=n), axis=-1)]
        else:
            m, states, rows = staircase_predictions(tgt, tokens, drafts)
        k = 0
        while k < g and drafts[k] == m[k]:
            k += 1
        for i in range(min(k + 1, g)):
            stats.record(None, None, i < k, greedy_tv=0.0 if i < k else 1.0)
        if validation == "single":
            tgt.rollback(n + k)
        else:
            tgt.reset(states[k], tokens + drafts[:k], rows[k])
        dft.rollback(n + k)
        if adaptive and not copied:
            n_assist = next_candidates(n_assist, k == g)
        stats.rounds += 1
        stats.drafted += g
        before = len(tokens)
        done = commit(tokens, drafts[:k] + [m[k]], n_prompt, max_new_tokens, eos_ids)
        stats.round_tokens += len(tokens) - before
    t2 = time.perf_counter()
    return GenerationResult(
        tokens[n_prompt:],
        t1 - t0,
        t2 - t1,
        stats.as_dict(
            tgt,
            dft,
            method="stairs",
            validation=validation,
            candidates_schedule=schedule,
            lookup=lookup.to_dict() if lookup else None,
        ),
    )


def _generate(target, draft, prompt, max_new_tokens, options: DraftOptions, *, sampler, eos_ids, seed):
    # the plan's gamma (the best fixed draft length) is where the assistant's adaptive schedule starts
    return stairs_generate(
        target,
        draft,
        prompt,
        max_new_tokens,
        candidates=options.gamma,
        eos_ids=eos_ids,
        lookup=options.lookup,
        prompt_kv_from_target=options.prompt_kv_from_target,
    )


registry.register_loop(
    registry.Loop(
        "stairs",
        _generate,
        DraftOptions,
        needs_draft=True,
        copies_from_context=True,
        greedy_only=True,
        pricing=Pricing(
            one_sequence_chooser(next_candidates),
            "acceptance replayed over the calibration continuations (replay.replayed_speedup), "
            "with stairs' adaptive draft length",
        ),
    )
)
