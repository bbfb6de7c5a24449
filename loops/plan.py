"""The decode plan (decode/plan.json) as a typed model, and running it with a target and, when the
plan needs one, a draft.

The plan is data written by the compiler (the `decode` recipe section, refined by passes such as
`speculative`); its `strategy` names a loop of the loop table (registry.py), which runs it.
Greedy strategies reproduce the target's greedy tokens exactly; sampling ones its distribution.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from accelc.errors import UsageError
from accelc.loops import registry
from accelc.loops.autoregressive import GenerationResult, Sampler
from accelc.loops.lookup import Lookup


class CopySpec(BaseModel):
    """Drafts copied from the context (lookup.py), as the plan records them."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tokens: int
    max_ngram: int
    min_ngram: int


class WorkerThreads(BaseModel):
    """Intra-op threads of PEARL's two workers, which run at once."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    target: int
    draft: int


class DecodePlan(BaseModel):
    """decode/plan.json. Every field a loop or the runtime reads is typed; the figures the
    speculative pass records for reports (alpha, costs, curves...) are kept as extra data. Only
    the fields given are written back, so the file keeps the shape it was written with."""

    model_config = ConfigDict(extra="allow", frozen=True)

    strategy: str = "greedy"
    sampling: bool | None = None  # None: sample exactly when the strategy is "sample"
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    max_new_tokens: int = 64
    chat_template: bool = True
    gamma: int = 4
    num_candidates: int = 2
    lookup: CopySpec | None = None
    draft_prompt_kv: Literal["target"] | None = None  # the draft starts from the target's prompt cache
    draft_source: str | None = None  # path, keep_layers, subnet_ratio or from_target
    worker_threads: WorkerThreads | None = None
    alone_session: bool = False
    fallback: bool | None = None
    reason: str | None = None
    planned_strategy: str | None = None  # set where a backend runs the plan plainly (Artifact.plan_for)

    @classmethod
    def of(cls, plan: DecodePlan | Mapping[str, Any]) -> DecodePlan:
        return plan if isinstance(plan, DecodePlan) else cls.model_validate(dict(plan))

    @classmethod
    def read(cls, path: Path) -> DecodePlan:
        """decode/plan.json, or plain greedy decoding where an artifact has none."""
        return cls.model_validate(json.loads(path.read_text())) if path.exists() else cls(strategy="greedy")

    def to_json_dict(self) -> dict:
        return self.model_dump(mode="json", exclude_unset=True)

    @property
    def samples(self) -> bool:
        return self.strategy == "sample" if self.sampling is None else self.sampling

    @property
    def prompt_kv_from_target(self) -> bool:
        return self.draft_prompt_kv == "target"

    @property
    def needs_draft(self) -> bool:
        return registry.needs_draft(self.strategy)

    def copying(self) -> Lookup | None:
        return Lookup(**self.lookup.model_dump()) if self.lookup else None

    def sampler(self, temperature: float | None = None) -> Sampler:
        """greedy unless the plan samples; an explicit temperature (0 = greedy) overrides the plan."""
        t = self.temperature if temperature is None else temperature
        sampling = self.samples if temperature is None else t > 0
        return Sampler(t, self.top_k, self.top_p) if sampling else Sampler()


def run_plan(
    plan: DecodePlan | Mapping[str, Any],
    target,
    draft,
    prompt: Sequence[int],
    max_new_tokens: int,
    *,
    eos_ids: Sequence[int] = (),
    sampler: Sampler | None = None,
) -> GenerationResult:
    plan = DecodePlan.of(plan)
    loop = registry.get(plan.strategy)
    if loop is None:
        raise UsageError(f"decode plan strategy '{plan.strategy}' is unknown; known: {', '.join(registry.names())}")
    sampler = plan.sampler() if sampler is None else sampler
    if loop.needs_draft and draft is None:
        raise UsageError(f"decode plan strategy '{plan.strategy}' needs a draft model, and this artifact has none")
    if loop.greedy_only and sampler.temperature != 0.0:
        raise UsageError(f"the {plan.strategy} strategy is greedy only: set temperature 0 or choose another strategy")
    return loop.run(plan, target, draft, prompt, max_new_tokens, sampler=sampler, eos_ids=eos_ids)
