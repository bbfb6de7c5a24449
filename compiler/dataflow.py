"""A recipe's steps walked symbolically: does every step find in the bundle what it consumes?

Each pass and target declares what it consumes, produces and drops (registry.Step.flow), in the
kinds below. Walking the recipe in order over those declarations, without loading a model, finds a
misordered recipe (the cpu target's ort backend with no export_onnx, reform before any subnet) at
`accelc validate` time, before a long search starts, with the step that would fail and the passes
that would fix it.
"""

from __future__ import annotations

from dataclasses import dataclass

from accelc.errors import UsageError


@dataclass(frozen=True)
class Kind:
    what: str  # how an error message names it
    fix: str | None = None  # how to provide it, where naming the providing passes reads badly


KINDS = {
    "onnx_graph": Kind("an ONNX decoder graph"),
    "calibration_stats": Kind("calibration statistics", fix="the importance pass"),
    "subnet": Kind("a subnet (a pruning mask)"),
    "consumer_weights": Kind("reformed o_proj/down_proj weights"),
    "draft": Kind("a draft model"),
    "plan": Kind("a decode plan"),
}


def providers(kind: str, family: str | None = None) -> list[str]:
    """The passes that make `kind` from something else (a quantizer consumes a graph it rewrites),
    those that apply to `family` where one is named (each family has its own exporter)."""
    from accelc.compiler import registry

    out = []
    for name, cls in sorted(registry.PASSES.items()):
        if kind in cls.produces and kind not in cls.consumes and (family is None or family in cls.families):
            out.append(name)
    return out


def _fix(kind: str, family: str) -> str:
    spec = KINDS[kind]
    if spec.fix:
        return spec.fix
    names = providers(kind, family)
    if not names:
        return "a pass that produces it"
    return names[0] + (f" (or {', '.join(names[1:])})" if len(names) > 1 else "")


def _steps(recipe):
    """(where, name, class, params) of every pass, then every target, in recipe order."""
    from accelc.compiler import registry

    for i, step in enumerate(recipe.passes):
        yield f"passes[{i}]", step.type, registry.PASSES[step.type], step
    for i, step in enumerate(recipe.targets):
        yield f"targets[{i}]", step.kind, registry.TARGETS[step.kind], step


def check_order(recipe, family) -> None:
    """Raise UsageError at the first step that consumes what no earlier step produced, naming the
    later step that makes it (the recipe is misordered) or the passes that would (one is missing).
    The ingested model starts with what its `family` provides (an .onnx input is its own graph)."""
    steps = list(_steps(recipe))
    have = set(family.provides)
    for i, (where, name, cls, params) in enumerate(steps):
        consumes, produces, drops = cls.flow(params)
        for kind in consumes:
            if kind in have:
                continue
            needs = f"{where} {name} needs {KINDS[kind].what}"
            later = next((s for s in steps[i + 1 :] if kind in s[2].flow(s[3])[1]), None)
            if later is not None:
                raise UsageError(f"{needs}, which {later[0]} {later[1]} makes after it: put it after {later[1]}")
            place = "before it" if where.startswith("passes") else "in passes"
            raise UsageError(f"{needs}: put {_fix(kind, family.name)} {place}")
        have = (have - set(drops)) | set(produces)
