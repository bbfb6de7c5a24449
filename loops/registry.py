"""The loop table: every generation loop registers one entry here, in its own module.

An entry names the loop (the `strategy` of decode/plan.json), its generate function with its ONE
options type (built from the plan by `Options.from_plan`), whether it needs a draft, whether it
is greedy only, and, for loops with parameters to choose, its pricing (pricing.Pricing: the
replay that picks gamma from measured acceptance and costs). `run_plan`, the speculative pass and
the benchmarks iterate this table, so adding a loop is one module and one line in LOOPS' list of built-in modules.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from accelc.registry import Registry

if TYPE_CHECKING:
    from accelc.loops.autoregressive import GenerationResult, Sampler
    from accelc.loops.lookup import Lookup
    from accelc.loops.plan import DecodePlan
    from accelc.loops.pricing import Pricing


class Options(Protocol):
    """A loop's options, built from the decode plan."""

    @classmethod
    def from_plan(cls, plan: DecodePlan) -> Options: ...


@dataclass(frozen=True)
class NoOptions:
    """Options of a loop that takes none beyond the sampler (autoregressive decoding)."""

    @classmethod
    def from_plan(cls, plan: DecodePlan) -> NoOptions:
        return cls()


@dataclass(frozen=True)
class DraftOptions:
    """Options of a loop with one draft sequence a round: its draft length, drafts copied from the
    context (lookup.py) and whether the draft adopts the target's prompt cache (cursor.open_pair)."""

    gamma: int = 4
    lookup: Lookup | None = None
    prompt_kv_from_target: bool = False

    @classmethod
    def from_plan(cls, plan: DecodePlan) -> DraftOptions:
        return cls(plan.gamma, plan.copying(), plan.prompt_kv_from_target)


# generate(target, draft or None, prompt, max_new_tokens, options, *, sampler, eos_ids, seed)
Generate = Callable[..., "GenerationResult"]


def with_draft_options(generate: Callable[..., GenerationResult]) -> Generate:
    """The table's call for a loop whose generate function takes DraftOptions' fields as keywords
    (gamma, lookup, prompt_kv_from_target) beside sampler, eos_ids and seed."""

    def run(target, draft, prompt, max_new_tokens, options: DraftOptions, *, sampler, eos_ids, seed):
        return generate(
            target,
            draft,
            prompt,
            max_new_tokens,
            gamma=options.gamma,
            sampler=sampler,
            eos_ids=eos_ids,
            seed=seed,
            lookup=options.lookup,
            prompt_kv_from_target=options.prompt_kv_from_target,
        )

    return run


@dataclass(frozen=True)
class Loop:
    name: str
    generate: Generate
    options: type = NoOptions  # has from_plan(plan)
    needs_draft: bool = False
    greedy_only: bool = False
    copies_from_context: bool = False  # its rounds can first copy drafts from the context (lookup.py)
    pricing: Pricing | None = None  # how the speculative pass chooses its parameters; None: nothing to choose

    def run(
        self, plan: DecodePlan, target, draft, prompt: Sequence[int], max_new_tokens: int, *, sampler: Sampler, eos_ids
    ) -> GenerationResult:
        options: Any = self.options.from_plan(plan)
        return self.generate(
            target, draft, prompt, max_new_tokens, options, sampler=sampler, eos_ids=eos_ids, seed=plan.seed
        )


LOOPS: Registry[Loop] = Registry(
    "loop",
    (
        "accelc.loops.autoregressive",
        "accelc.loops.speculative",
        "accelc.loops.batch_speculative",
        "accelc.loops.pearl",
        "accelc.loops.stairs",
        "accelc.loops.jacobi",
        "accelc.loops.lookahead",
    ),
)
register_loop = LOOPS.register
load_all = LOOPS.load_all


def unregister_loop(name: str) -> None:
    LOOPS.pop(name)


def loops() -> Iterator[Loop]:
    """Every registered loop, built-in ones first, in registration order."""
    load_all()
    return iter(list(LOOPS.values()))


def get(name: str) -> Loop | None:
    load_all()
    return LOOPS.get(name)


def names(*, needs_draft: bool | None = None, priced: bool = False) -> tuple[str, ...]:
    """Loop names, optionally only those that need a draft (or not) or that the pass can price."""
    return tuple(
        loop.name
        for loop in loops()
        if (needs_draft is None or loop.needs_draft == needs_draft) and (not priced or loop.pricing is not None)
    )


def copying(name: str) -> bool:
    """Whether the loop `name` can copy drafts from the context (False for an unknown name)."""
    loop = get(name)
    return loop is not None and loop.copies_from_context


def needs_draft(name: str) -> bool:
    """Whether the loop `name` needs a draft model (False for an unknown name)."""
    loop = get(name)
    return loop is not None and loop.needs_draft
