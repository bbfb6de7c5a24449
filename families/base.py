"""The model-family protocol and its registry.

A family is the kind of model a recipe compiles (a causal LM, an opaque ONNX graph; next a
masked-diffusion LM, a flow, a CNN). One module per family defines a `Family` subclass and
registers it; that entry says how a recipe's `model:` section is recognised as this family, how
such a model is ingested into the first Bundle, which runtime protocol its artifacts serve and
on which runtime backends, which decode role reads which exported graph, and how an artifact
of it is proved: validated (parity), evaluated (quality) and benchmarked. Passes and targets
say which families they apply to (`families` on compiler/registry.py's Pass and Target); a
family lists them back through `passes()` and `targets()`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from accelc.errors import UsageError
from accelc.registry import Registry


class Family:
    """One kind of model. Subclasses set the class attributes and implement the methods."""

    name: ClassVar[str]  # the value of Bundle.family and of the manifest's model.family
    title: ClassVar[str]  # how messages call its models ("causal LM")
    inputs: ClassVar[str]  # what a recipe's model section may name for it, for messages
    protocol: ClassVar[type | None] = None  # the runtime protocol its artifacts serve (StepModel)
    provides: ClassVar[tuple[str, ...]] = ()  # what an ingested model already is (compiler/dataflow.py KINDS)

    def builtins(self) -> list[str]:
        """The built-in models (`model.builtin`) of this family: real ones fetched or trained once
        into the asset cache, and tiny seeded ones for tests."""
        return []

    def train(self, name: str, steps: int | None = None, fresh: bool = False) -> Path:
        """`accelc train NAME`: build the built-in model `name` that this project trains (on real
        data, with progress and a checkpoint it resumes from unless `fresh`), into the asset
        cache; `steps` overrides its training length. Returns the model folder. Built-ins that
        are fetched or seeded are not trained."""
        raise UsageError(f"built-in model '{name}' is not trained by accelc; it is fetched or seeded on first use")

    def recognises(self, spec, path: Path | None) -> bool:
        """Whether the recipe's model section names a model of this family: `spec.builtin` among
        its built-ins, or the file or folder `path` (resolved) in a format it reads. Families
        are asked in registry order, so a family that claims only folders of its own kind
        (a config it recognises) comes before one that claims every folder."""
        if path is None:
            return spec.builtin in self.builtins()
        return self.recognises_path(path)

    def recognises_path(self, path: Path) -> bool:
        return False

    def check_input(self, spec, recipe=None) -> None:
        """Refuse (exit 2, naming the file) a model input this family recognises by its name but
        cannot read, cheaply and before any work: compile's check and `accelc validate` call it.
        The default reads nothing."""

    def ingest(self, spec, recipe=None):  # -> Bundle
        """The first Bundle of the pipeline for the model `spec` names."""
        raise NotImplementedError

    def graph_roles(self, bundle) -> dict[str, str]:
        """Decode role (target, draft) -> the bundle's graph of that role, for graph backends."""
        raise NotImplementedError

    def decode_plan(self, recipe, bundle) -> dict | None:
        """What compile writes to the artifact's `decode/plan.json` (how its models are run to
        generate), from the recipe and what the passes decided (`bundle.plan`); None for a
        family whose artifacts have no generation loop."""
        return None

    def open_model(self, backend, role: str, *, threads: int | None = None, alone_session: bool = False):
        """The model of `role` on `backend` (runtime/backends.py, over its share of the artifact) in
        this family's runtime protocol. A backend opens a StepModel itself (`Backend.open`); a
        family with another protocol opens it here from the backend's placement, by backend name
        (a flow's blocks: families/tarflow.py), so no backend branches on families."""
        return backend.open(role, threads=threads, alone_session=alone_session)

    def plan_warnings(self, directory: Path) -> list[str]:
        """What a deployment of the provisional artifact in `directory` should know about its
        plan (backends that cannot run it, say); they go into the manifest's `warnings`."""
        return []

    def run(self, art, args) -> int:
        """`accelc run ARTIFACT`: generate with the artifact (text for an LM, an image grid for a
        flow, predictions for a CNN) from the command line's `args`; returns the exit code."""
        raise UsageError(f"accelc run: {self.title} artifacts cannot be run")

    def prove(self, directory: Path, recipe, manifest: dict[str, Any]) -> tuple[dict, bool]:
        """Validate, evaluate and benchmark the (provisional) artifact in `directory`; write its
        reports/ and return (manifest metrics, whether every check passed)."""
        raise NotImplementedError

    def evaluate(self, art, text: str, spec) -> dict:
        """`accelc eval`: the quality of an artifact's backends on `text` (a PerplexitySpec
        protocol), with an `ok` verdict; a family whose artifacts have no such measure says so."""
        raise UsageError(f"accelc eval: {self.title} artifacts have no quality measure on text")

    def bench(self, art, spec) -> dict:
        """`accelc bench`: the speed and memory of an artifact's backends (a BenchSpec protocol)."""
        raise UsageError(f"accelc bench: {self.title} artifacts have no benchmark")

    def report_bench(self, art, result: dict, figure: Path) -> None:
        """`accelc bench`'s plot at `figure` and its table on stdout, for this family's `bench` result."""
        import json

        print(json.dumps(result, indent=2))

    def passes(self) -> list[str]:
        """The registered passes that apply to this family."""
        from accelc.compiler import registry

        registry.load_all()
        return sorted(name for name, cls in registry.PASSES.items() if self.name in cls.families)

    def backends(self) -> list[str]:
        """The registered runtime backends that run this family's artifacts."""
        from accelc.runtime import backends

        return sorted(name for name, cls in backends.load_all().items() if self.name in cls.families)

    def targets(self) -> list[str]:
        """The registered targets that apply to this family."""
        from accelc.compiler import registry

        registry.load_all()
        return sorted(kind for kind, cls in registry.TARGETS.items() if self.name in cls.families)


FAMILIES: Registry[type[Family]] = Registry(
    "model family",
    (  # asked in this order (family_for): causal_lm, which claims every folder, comes last
        "accelc.families.onnx_graph",
        "accelc.families.tarflow",
        "accelc.families.cnn",
        "accelc.families.diffusion_lm",
        "accelc.families.causal_lm",
    ),
)
register_family = FAMILIES.register
load_all = FAMILIES.load_all


def get_family(name: str) -> Family:
    return FAMILIES.require(name)()


def family_of_builtin(name: str) -> Family:
    """The family whose built-in model is `name`."""
    families = [cls() for cls in load_all().values()]
    for family in families:
        if name in family.builtins():
            return family
    allowed = ", ".join(n for family in families for n in family.builtins())
    raise UsageError(f"'{name}' is not a built-in model; allowed: {allowed}")


def family_for(recipe) -> Family:
    """The family of the model a recipe's `model:` section names."""
    from accelc.compiler.recipe import resolve_path

    spec = recipe.model
    path = None if spec.path is None else resolve_path(recipe, spec.path)
    if path is not None and not path.exists():
        raise UsageError(f"model path {path} does not exist")
    families = [cls() for cls in load_all().values()]
    if path is None:
        try:
            return family_of_builtin(spec.builtin)
        except UsageError as exc:
            raise UsageError(f"model.builtin {exc}") from None
    for family in families:
        if family.recognises(spec, path):
            return family
    expected = "; or ".join(f.inputs for f in families)
    raise UsageError(f"model path {path}: expected {expected}")
