"""Execute a decode plan (decode/plan.json) with a target and, when the plan needs one, a draft.

The plan is data written by the compiler (the `decode` recipe section, refined by passes such as
`speculative`); this module maps its `strategy` to the generation loop that implements it.
Greedy strategies reproduce the target's greedy tokens exactly; sampling ones its distribution.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from accelc.errors import UsageError
from accelc.loops.autoregressive import GenerationResult, Sampler, generate
from accelc.loops.lookup import Lookup

AUTOREGRESSIVE = ("greedy", "sample")
NEEDS_DRAFT = ("speculative", "batch_speculative", "pearl", "stairs")
STRATEGIES = AUTOREGRESSIVE + NEEDS_DRAFT


def prompt_kv_from_target(plan: Mapping[str, Any]) -> bool:
    """Whether the plan's draft starts from the target's prompt cache (speculative.open_pair)."""
    return plan.get("draft_prompt_kv") == "target"


def sampler_of(plan: Mapping[str, Any], temperature: float | None = None) -> Sampler:
    """greedy unless the plan samples; an explicit temperature (0 = greedy) overrides the plan."""
    t = plan.get("temperature", 1.0) if temperature is None else temperature
    sampling = plan.get("sampling", plan.get("strategy") == "sample") if temperature is None else t > 0
    return Sampler(t, plan.get("top_k", 0), plan.get("top_p", 1.0)) if sampling else Sampler()


def run_plan(
    plan: Mapping[str, Any],
    target,
    draft,
    prompt: Sequence[int],
    max_new_tokens: int,
    *,
    eos_ids: Sequence[int] = (),
    sampler: Sampler | None = None,
) -> GenerationResult:
    strategy = plan.get("strategy", "greedy")
    if strategy not in STRATEGIES:
        raise UsageError(f"decode plan strategy '{strategy}' is unknown; known: {', '.join(STRATEGIES)}")
    sampler = sampler_of(plan) if sampler is None else sampler
    seed = int(plan.get("seed", 0))
    if strategy in AUTOREGRESSIVE:
        return generate(target, list(prompt), max_new_tokens, sampler=sampler, eos_ids=tuple(eos_ids), seed=seed)
    if draft is None:
        raise UsageError(f"decode plan strategy '{strategy}' needs a draft model, and this artifact has none")
    gamma = int(plan.get("gamma", 4))
    shared = {"prompt_kv_from_target": prompt_kv_from_target(plan)}
    lookup = Lookup(**plan["lookup"]) if plan.get("lookup") else None  # drafts copied from the context
    if strategy == "speculative":
        from accelc.loops.speculative import speculative_generate

        return speculative_generate(
            target,
            draft,
            prompt,
            max_new_tokens,
            gamma=gamma,
            sampler=sampler,
            eos_ids=eos_ids,
            seed=seed,
            lookup=lookup,
            **shared,
        )
    if strategy == "batch_speculative":
        from accelc.loops.batch_speculative import batch_speculative_generate

        return batch_speculative_generate(
            target,
            draft,
            prompt,
            max_new_tokens,
            gamma=gamma,
            sampler=sampler,
            num_candidates=int(plan.get("num_candidates", 2)),
            eos_ids=eos_ids,
            seed=seed,
            **shared,
        )
    if strategy == "pearl":
        from accelc.loops.pearl import pearl_generate

        return pearl_generate(
            target,
            draft,
            prompt,
            max_new_tokens,
            gamma=gamma,
            sampler=sampler,
            eos_ids=eos_ids,
            seed=seed,
            lookup=lookup,
            **shared,
        )
    from accelc.loops.stairs import stairs_generate

    if sampler.temperature != 0.0:
        raise UsageError("the stairs strategy is greedy only: set temperature 0 or choose another strategy")
    # the plan's gamma (the best fixed draft length) is where the assistant's adaptive schedule starts
    return stairs_generate(
        target, draft, prompt, max_new_tokens, candidates=gamma, eos_ids=eos_ids, lookup=lookup, **shared
    )
