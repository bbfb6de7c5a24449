"""Runtime backends in a registry, as passes and targets are (compiler/registry.py).

A backend is what opens a StepModel from the files a target lowered into an artifact. Each
backend module defines one `Backend` subclass and registers it with `register_backend`; that
entry names the backend, its optional dependency (checked lazily: on opening a model, or by
`accelc validate` for the backends a recipe's targets name), the decode roles it can hold and
how a model of a role is opened from the runtime config the target recorded. So an artifact, a
recipe check and `accelc run --backend` know every backend without naming any.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from accelc.errors import InternalError, MissingDependency, UsageError
from accelc.registry import Registry

if TYPE_CHECKING:
    from accelc.runtime.artifact import Artifact
    from accelc.runtime.base import BatchModel, StepModel

# The decode roles a model can have in an artifact: the model of record, and a speculative draft.
ROLES = ("target", "draft")


@dataclass(frozen=True)
class Dependency:
    """An optional Python module a backend needs, and the command that installs it."""

    module: str
    install: str
    what: str

    def check(self) -> None:
        """Import the module, or raise MissingDependency naming the pip command (exit 3)."""
        try:
            importlib.import_module(self.module)
        except ImportError as exc:
            raise MissingDependency(f"{self.what} (python module '{self.module}')", self.install) from exc


@dataclass(frozen=True)
class Placement:
    """One backend's share of an artifact: the target folder holding its files (None for torch,
    whose checkpoints sit under model/) and the runtime config its target recorded."""

    artifact: Artifact
    directory: Path | None
    config: Mapping[str, Any]


class Backend:
    """Opens StepModels of one backend from an artifact. Subclasses set `name`, a one-line
    docstring, `dependency` and `roles`, and implement `held_roles`, `files` and `open`."""

    name: ClassVar[str]
    dependency: ClassVar[Dependency | None] = None
    roles: ClassVar[tuple[str, ...]] = ROLES
    # The model families (families/base.py) whose artifacts it runs, as passes and targets declare theirs.
    families: ClassVar[tuple[str, ...]] = ("causal_lm",)
    # Whether `open(threads=...)` gives each model its own share of the cores (PEARL's parallel
    # workers); where one thread pool serves a whole process, it cannot.
    threads_per_model: ClassVar[bool] = False

    def __init__(self, placement: Placement):
        self.placement = placement

    def held_roles(self) -> dict[str, Any]:
        """Role -> what holds it in this artifact (a graph, a library folder, a checkpoint)."""
        raise NotImplementedError

    def has_draft(self) -> bool:
        """Whether this backend holds a draft model that differs from the target."""
        held = self.held_roles()
        return "draft" in held and held["draft"] != held.get("target")

    def unavailable(self) -> str | None:
        """Why this machine cannot run the backend (a GPU backend on a host without one), or None.
        Validation at compile time skips such a backend and records the reason; opening it is exit 3."""
        return None

    def files(self, role: str) -> list[Path]:
        """The files or folders `open(role)` reads, checked against the manifest before it does
        (runtime/integrity.py): a damaged file is refused by name, not met as a parser's error."""
        raise NotImplementedError

    def open(self, role: str, *, threads: int | None = None, alone_session: bool = False) -> StepModel:
        """The StepModel of `role`. `threads`: a share of the cores instead of the artifact's
        (PEARL's workers), where the backend can size a model per instance; `alone_session`: with
        them, the calls made alone run on the artifact's own threads (StepModel.alone)."""
        raise NotImplementedError

    def open_batched(self, role: str, *, slots: int, threads: int | None = None) -> BatchModel | None:
        """A model decoding up to `slots` sequences per call (serving's continuous batching), or
        None where this backend's model decodes one sequence per call."""
        return None

    def check(self, role: str) -> None:
        """What opening `role` needs, each with one clear error: the role, the dependency, and the
        files intact. Callers that open models in worker processes (`accelc bench`) check first."""
        if role not in self.roles or role not in self.held_roles():
            raise UsageError(f"the {self.name} backend of this artifact has no '{role}' model")
        if self.dependency is not None:
            self.dependency.check()
        self.placement.artifact.integrity.require(*self.files(role))

    def step_model(self, role: str, *, threads: int | None = None, alone_session: bool = False) -> StepModel:
        """The model of `role` in the runtime protocol of the artifact's family, after `check`: the
        family opens it through this backend (Family.open_model), which is `open`, a StepModel,
        unless the family serves another protocol (a flow's blocks: runtime/flow.py)."""
        self.check(role)
        family = self.placement.artifact.family
        return family.open_model(self, role, threads=threads, alone_session=alone_session)


class GraphBackend(Backend):
    """A backend that runs the artifact's exported ONNX graphs, one per role (its runtime config's
    `graphs` names each role's entry of the manifest's `graphs`): ORT, OpenVINO."""

    def held_roles(self) -> dict[str, object]:
        return dict(self.placement.config.get("graphs", {}))

    def graph(self, role: str) -> Path:
        art = self.placement.artifact
        return art.dir / art.manifest["graphs"][self.held_roles()[role]]

    def files(self, role: str) -> list[Path]:
        return graph_files(self.graph(role))


def graph_files(graph: Path) -> list[Path]:
    """An ONNX graph's files: the graph, and the .data file beside it that holds its weights."""
    return [graph, graph.with_name(graph.name + ".data")]


BACKENDS: Registry[type[Backend]] = Registry(
    "runtime backend",
    (
        "accelc.runtime.torch_backend",
        "accelc.runtime.ort_backend",
        "accelc.runtime.openvino_backend",
        "accelc.runtime.tvm_backend",
        "accelc.runtime.cuda_tvm_backend",
        "accelc.runtime.cuda_ort_backend",
        "accelc.runtime.vta_backend",
    ),
)
load_all = BACKENDS.load_all
get_backend = BACKENDS.require


def register_backend(cls: type[Backend]) -> type[Backend]:
    unknown = set(cls.roles) - set(ROLES)
    if unknown:
        raise InternalError(f"backend '{cls.name}' declares unknown roles {sorted(unknown)}; known: {', '.join(ROLES)}")
    return BACKENDS.register(cls)


def backend_names() -> list[str]:
    return sorted(load_all())


def check_dependencies(names) -> None:
    """MissingDependency (exit 3) for the first of `names` whose optional dependency is absent."""
    for name in names:
        dependency = get_backend(name).dependency
        if dependency is not None:
            dependency.check()
