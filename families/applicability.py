"""Whether a recipe's passes and targets apply to the family of its model, checked before any work.

`accelc validate` and `accelc compile` both call `check_recipe`, so a pass written for causal
LMs on an ONNX graph (say) is exit 2 with the list of steps that do apply, not a failure
minutes into a compile. A target that lowers to runtime backends (`backends:` in its step) is
held to the backends the family's artifacts can run on too.
"""

from __future__ import annotations

from accelc.compiler import registry
from accelc.errors import UsageError
from accelc.families.base import FAMILIES, Family, family_for
from accelc.runtime.backends import get_backend


def _applies_to(cls) -> str:
    names = [FAMILIES[name].title if name in FAMILIES else name for name in cls.families]
    return ", ".join(names) or "no family"


def check_recipe(recipe) -> Family:
    """The recipe's family, after refusing (UsageError) any step that does not apply to it."""
    family = family_for(recipe)
    source = getattr(recipe, "_source", None) or "recipe"
    registry.load_all()
    for section, tag, table, applicable in (
        ("passes", "type", registry.PASSES, family.passes),
        ("targets", "kind", registry.TARGETS, family.targets),
    ):
        for i, step in enumerate(getattr(recipe, section)):
            name = getattr(step, tag)
            if family.name not in table[name].families:
                raise UsageError(
                    f"{source}: {section}[{i}] '{name}' does not apply to the {family.name} family "
                    f"({family.title} models; it applies to {_applies_to(table[name])} models); {section} that "
                    f"do: {', '.join(applicable()) or 'none'}"
                )
    for i, step in enumerate(recipe.targets):
        runs = family.backends()
        for backend in getattr(step, "backends", ()):
            if backend not in runs:
                lowers = [FAMILIES[f].title for f in get_backend(backend).families if f in FAMILIES]
                raise UsageError(
                    f"{source}: targets[{i}] '{step.kind}' backend '{backend}' does not apply to the "
                    f"{family.name} family ({family.title} models; {backend} runs {', '.join(lowers) or 'no'} "
                    f"models only); backends that do: {', '.join(b for b in runs if b != 'torch')}"
                )
    return family
