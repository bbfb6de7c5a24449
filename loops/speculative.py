"""Speculative sampling (Leviathan et al. 2023; Chen et al. 2023) over two StepModels.

Each round the draft proposes gamma tokens autoregressively (gamma one-token draft calls), the
target scores all of them in ONE `extend` call (a StepModel returns logits for every fed
position) and the exact rule of Leviathan et al. (arXiv 2211.17192, algorithm 1) and Chen et al.
(arXiv 2302.01318, algorithm 2) keeps a prefix of them:

    accept the draft token x ~ q with probability min(1, p(x) / q(x))
    at the first rejection sample r = max(p - q, 0) / sum(max(p - q, 0)) and end the round
    if all gamma drafts are accepted, sample one bonus token from p at position gamma + 1

Every committed token is then distributed exactly as the target's p, where p and q are the
same `Sampler`'s distributions (temperature, top-k and top-p applied identically to both).
Rejected positions are rolled back on both models with `truncate`. At temperature 0 both are
one-hot argmaxes and the rule reads "accept while the draft token equals the target's argmax,
then take the target's argmax": the target's greedy output, token for token, for any draft.

As in `generate`, the first new token comes from the target's prefill logits, so prefill and
decode times compare with the autoregressive baseline's.

Randomness is per position and the accept/reject/residual rule is shared with the other loops
(acceptance.py); the round's moving parts too (cursor.py).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from accelc.loops import registry
from accelc.loops.acceptance import SpecStats, own_sample, verify_chain
from accelc.loops.autoregressive import GenerationResult, Sampler
from accelc.loops.cursor import begin, check_args, commit, propose
from accelc.loops.lookup import Lookup
from accelc.loops.pricing import Pricing, one_sequence_chooser
from accelc.loops.registry import DraftOptions
from accelc.runtime.base import StepModel

DEFAULT_GAMMA = 4  # drafts per round when no plan chose one; the cost model picks gamma in [1, 16]


# --------------------------------------------------------------------------- the loop
def speculative_generate(
    target: StepModel,
    draft: StepModel,
    prompt: Sequence[int],
    max_new_tokens: int,
    *,
    gamma: int = DEFAULT_GAMMA,
    sampler: Sampler = Sampler(),
    eos_ids: Sequence[int] = (),
    seed: int = 0,
    prompt_kv_from_target: bool = False,
    lookup: Lookup | None = None,
) -> GenerationResult:
    """Speculative sampling with `gamma` drafts per round; greedy when sampler.temperature == 0.
    prompt_kv_from_target: see open_pair. lookup: rounds copy their drafts from the context where
    it has a match (lookup.py), and ask the draft model elsewhere."""
    check_args(prompt, max_new_tokens, gamma=gamma)
    t0 = time.perf_counter()
    n_prompt = len(prompt)
    tgt, dft, tokens, done = begin(
        target,
        draft,
        prompt,
        max_new_tokens,
        eos_ids,
        lambda logits: own_sample(logits, sampler, seed, n_prompt),
        prompt_kv_from_target,
    )
    t1 = time.perf_counter()
    stats = SpecStats()
    while not done:
        n = len(tokens)
        budget = max_new_tokens - (n - n_prompt) - 1  # never draft past the token budget
        # 1. draft g tokens (positions n .. n+g-1): copied from the context, or gamma from the model
        drafts, qs, copied = propose(dft, tokens, min(gamma, budget), sampler, seed, lookup, budget)
        g = len(drafts)
        stats.lookup_rounds += copied
        # 2. one target call: rows [g+1, V] predict positions n .. n+g
        rows = tgt.logits_from(tokens + drafts, start=n)
        # 3. accept a prefix, then a residual sample or the bonus token
        j, t = verify_chain(rows, drafts, qs, sampler, seed, n, stats)
        if t is None:
            t = own_sample(rows[g], sampler, seed, n + g)
        # 4. roll back what was rejected: both models keep tokens + drafts[:j]
        tgt.rollback(n + j)
        dft.rollback(n + j)
        stats.rounds += 1
        stats.drafted += g
        before = len(tokens)
        done = commit(tokens, drafts[:j] + [t], n_prompt, max_new_tokens, eos_ids)
        stats.round_tokens += len(tokens) - before
    t2 = time.perf_counter()
    return GenerationResult(
        tokens[n_prompt:],
        t1 - t0,
        t2 - t1,
        stats.as_dict(tgt, dft, method="speculative", gamma=gamma, lookup=lookup.to_dict() if lookup else None),
    )


registry.register_loop(
    registry.Loop(
        "speculative",
        registry.with_draft_options(speculative_generate),
        DraftOptions,
        needs_draft=True,
        copies_from_context=True,
        pricing=Pricing(
            one_sequence_chooser(), "acceptance replayed over the calibration continuations (replay.replayed_speedup)"
        ),
    )
)
