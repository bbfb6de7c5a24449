"""Bundle: the model in flight between passes.

A Bundle is a value made of file handles, not live objects: the source checkpoint folder (the
torch model of record), exported graphs by role, and the decode plan, plus the provenance of
every pass that produced it. Passes return a new Bundle (`evolve`) and never edit files they
did not write, which is what lets the pipeline cache each pass's output under a hash chain and
resume an interrupted compile.

`id` is that hash chain: sha256 of the input model's identity for a fresh bundle, then
sha256(previous id, pass type and version, canonical params and declared recipe inputs, accelc
version) after each pass (pipeline.step_key).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from accelc import __version__

BUNDLE_FILE = "bundle.json"


@dataclass(frozen=True)
class PassRecord:
    name: str
    params: Mapping[str, Any]
    key: str
    seconds: float
    status: str  # "ran" | "cached"


@dataclass(frozen=True)
class Bundle:
    id: str
    family: str  # "causal_lm" | "onnx"
    source: Mapping[str, Any]  # identity of the input model: description, sha256, files
    model_dir: Path | None  # HF folder (config, safetensors, tokenizer); None for ONNX input
    draft_dir: Path | None = None  # HF folder of a draft model for speculative decoding
    graphs: Mapping[str, Path] = field(default_factory=dict)  # role -> ONNX file
    graph_meta: Mapping[str, Any] = field(default_factory=dict)  # IO names, KV layout, exporter
    plan: Mapping[str, Any] = field(default_factory=dict)  # decode plan (strategy + params)
    # files one pass leaves for a later one (calibration statistics, a subnet, reformed weights);
    # a pass that consumes them (materialize) drops them, so they never reach the artifact
    intermediates: Mapping[str, Path] = field(default_factory=dict)
    reports: Mapping[str, Path] = field(default_factory=dict)  # name -> file for reports/ (search log, plots)
    provenance: tuple[PassRecord, ...] = ()

    def checkpoints(self) -> dict[str, Path]:
        """The torch checkpoints this bundle carries, by role: what exporters and targets lower."""
        roles = {"decoder": self.model_dir, "draft": self.draft_dir}
        return {role: path for role, path in roles.items() if path is not None}

    def evolve(self, **changes) -> Bundle:
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------------ persistence
    def to_json(self) -> dict:
        return {
            "id": self.id,
            "family": self.family,
            "source": dict(self.source),
            "model_dir": str(self.model_dir) if self.model_dir else None,
            "draft_dir": str(self.draft_dir) if self.draft_dir else None,
            "graphs": {k: str(v) for k, v in self.graphs.items()},
            "graph_meta": dict(self.graph_meta),
            "plan": dict(self.plan),
            "intermediates": {k: str(v) for k, v in self.intermediates.items()},
            "reports": {k: str(v) for k, v in self.reports.items()},
            "provenance": [dataclasses.asdict(p) for p in self.provenance],
        }

    @classmethod
    def from_json(cls, data: dict) -> Bundle:
        return cls(
            id=data["id"],
            family=data["family"],
            source=data["source"],
            model_dir=Path(data["model_dir"]) if data["model_dir"] else None,
            draft_dir=Path(data["draft_dir"]) if data.get("draft_dir") else None,
            graphs={k: Path(v) for k, v in data["graphs"].items()},
            graph_meta=data["graph_meta"],
            plan=data["plan"],
            intermediates={k: Path(v) for k, v in data.get("intermediates", {}).items()},
            reports={k: Path(v) for k, v in data.get("reports", {}).items()},
            provenance=tuple(PassRecord(**p) for p in data["provenance"]),
        )

    def save(self, directory: Path) -> None:
        (directory / BUNDLE_FILE).write_text(json.dumps(self.to_json(), indent=2))

    @classmethod
    def load(cls, directory: Path) -> Bundle:
        return cls.from_json(json.loads((directory / BUNDLE_FILE).read_text()))

    def relocate(self, old_root: Path, new_root: Path) -> Bundle:
        """Rewrite paths that lie under old_root (a pass's temporary workdir) to new_root."""

        def move(p: Path | None) -> Path | None:
            if p is None:
                return None
            try:
                return new_root / p.relative_to(old_root)
            except ValueError:
                return p

        return self.evolve(
            model_dir=move(self.model_dir),
            draft_dir=move(self.draft_dir),
            graphs={k: move(v) for k, v in self.graphs.items()},
            intermediates={k: move(v) for k, v in self.intermediates.items()},
            reports={k: move(v) for k, v in self.reports.items()},
        )

    def intermediate(self, kind: str, needed_by: str, made_by: str) -> Path:
        """The file a previous pass left under `kind`, or a UsageError naming the pass to add."""
        from accelc.errors import UsageError

        if kind not in self.intermediates:
            raise UsageError(f"{needed_by} needs {kind.replace('_', ' ')}: put {made_by} before it in the recipe")
        return self.intermediates[kind]


def canonical(params: Mapping[str, Any]) -> str:
    return json.dumps(params, sort_keys=True, separators=(",", ":"), default=str)


def chain(previous_id: str, step: str, params: Mapping[str, Any]) -> str:
    """The next link of the hash chain: what a pass's output is cached under."""
    text = "\n".join((previous_id, step, canonical(params), __version__))
    return hashlib.sha256(text.encode()).hexdigest()
