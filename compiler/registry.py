"""Explicit registries of passes and targets: a decorator and a dict, nothing more.

A pass is a class with a pydantic `Params` model and `run(bundle, ctx) -> Bundle`; a target is a
class with `Params` and `lower(bundle, ctx) -> Lowered`. Registering them here is what makes
them usable from a recipe, listable by `accelc passes` and part of the recipe's JSON Schema.
Modules register on import; `load_all()` imports the built-in ones (their heavy dependencies
are imported lazily inside `run`/`lower`, so listing stays fast).
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict

from accelc.registry import Registry


class Params(BaseModel):
    """Base of every pass/target parameter model: unknown keys are errors, not silently dropped."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Step:
    """What a pass or target declares besides its parameters (compiler/inputs.py, compiler/dataflow.py).

    `reads`: the recipe inputs it reads, as dotted paths ("data.calibration", "decode"); their
    values are part of its cache key, and its context exposes only them. `consumes` / `produces`
    / `drops`: the bundle contents it needs, leaves and removes (dataflow.KINDS), which is what
    `accelc validate` checks a recipe's order against; override `flow` when they depend on params.
    `families`: the model families it applies to (families/base.py), which `accelc validate` holds
    a recipe's model to.
    """

    families: ClassVar[tuple[str, ...]] = ("causal_lm",)
    reads: ClassVar[tuple[str, ...]] = ()
    consumes: ClassVar[tuple[str, ...]] = ()
    produces: ClassVar[tuple[str, ...]] = ()
    drops: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def flow(cls, params) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
        """(consumes, produces, drops) for these params."""
        return cls.consumes, cls.produces, cls.drops

    @classmethod
    def files(cls, params) -> tuple[str, ...]:
        """Paths its params name (as written in the recipe) whose content it reads, such as a draft
        checkpoint folder: their content, not just their names, goes into its cache key."""
        return ()


class Pass(Step):
    """A model transformation. Subclasses set `name`, a one-line docstring and `Params`."""

    name: ClassVar[str]
    Params: ClassVar[type[Params]] = Params
    # Part of the cache key: bump it whenever the pass's output changes for the same params, so
    # caches written by an older implementation are never reused.
    version: ClassVar[int] = 1

    def __init__(self, params: Params):
        self.params = params

    def run(self, bundle, ctx):  # -> Bundle
        raise NotImplementedError


class Target(Step):
    """A lowering to a deployment target. Subclasses set `kind`, a docstring and `Params`."""

    kind: ClassVar[str]
    Params: ClassVar[type[Params]] = Params
    version: ClassVar[int] = 1  # part of the cache key, as for passes

    def __init__(self, params: Params):
        self.params = params

    def lower(self, bundle, ctx):  # -> Lowered
        raise NotImplementedError


PASSES: Registry[type[Pass]] = Registry(
    "pass",
    (
        "accelc.passes.export_onnx",
        "accelc.passes.export_flow",
        "accelc.passes.jacobi",
        "accelc.passes.pruning",
        "accelc.passes.quantize",
        "accelc.passes.gguf_weights",
        "accelc.passes.speculative",
        "accelc.passes.lookahead",
        "accelc.passes.export_denoiser",
        "accelc.passes.diffusion_sampling",
        "accelc.passes.partition",
    ),
)
TARGETS: Registry[type[Target]] = Registry(
    "target", ("accelc.targets.cpu", "accelc.targets.cuda", "accelc.targets.fpga"), key=lambda cls: cls.kind
)
register_pass = PASSES.register
register_target = TARGETS.register


def load_all() -> None:
    PASSES.load_all()
    TARGETS.load_all()


def describe(cls: type[Pass] | type[Target]) -> dict[str, Any]:
    """Name, summary and every parameter with type, default and description (for `passes show`)."""
    params = []
    for field_name, field in cls.Params.model_fields.items():
        default = None if field.is_required() else field.get_default(call_default_factory=True)
        params.append(
            {
                "name": field_name,
                "type": getattr(field.annotation, "__name__", str(field.annotation)),
                # nested options (a target's per-backend Params) as the plain values a recipe writes
                "default": default.model_dump() if isinstance(default, BaseModel) else default,
                "required": field.is_required(),
                "description": field.description or "",
            }
        )
    doc = (cls.__doc__ or "").strip()
    return {
        "name": getattr(cls, "name", getattr(cls, "kind", "")),
        "summary": doc.split("\n")[0],
        "doc": doc,
        "params": params,
        # what `accelc validate` holds a recipe to (the last three for default params)
        "families": list(cls.families),
        "reads": list(cls.reads),
        "consumes": list(cls.consumes),
        "produces": list(cls.produces),
        "drops": list(cls.drops),
    }
