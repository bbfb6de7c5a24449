"""Open a compiled artifact directory and hand out its StepModels, tokenizer and decode plan.

The runtime reads only the artifact (manifest.json and the files it names); it never imports
passes or targets, so a deployment needs accelc's runtime and the backend's library, nothing else.
"""

from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path

from accelc.errors import UsageError
from accelc.loops.plan import DecodePlan
from accelc.runtime.backends import Backend, Placement, get_backend
from accelc.runtime.integrity import Integrity

MANIFEST = "manifest.json"
HF_DIR = "model/hf"
HF_DIRS = {"target": HF_DIR, "draft": "model/draft_hf"}  # torch checkpoints by decode role
ONNX_DIR = "model/onnx"
# A checkpoint's weight files: the tokenizer is read without them, so `run` on ORT never hashes them.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


class Artifact:
    def __init__(self, directory: str | Path):
        self.dir = Path(directory).absolute()  # backends hand out paths under it: integrity matches them
        manifest = self.dir / MANIFEST
        if not manifest.exists():
            raise UsageError(
                f"{self.dir}: not an accelc artifact (no {MANIFEST}); create one with `accelc compile RECIPE -o DIR`"
            )
        try:
            self.manifest = json.loads(manifest.read_text(encoding="utf-8"))
        except ValueError as exc:  # not JSON, or not UTF-8
            raise UsageError(f"{manifest}: corrupt manifest ({exc}); recompile the artifact") from None
        if not isinstance(self.manifest, dict):
            raise UsageError(f"{manifest}: corrupt manifest (not a JSON object); recompile the artifact")
        # every file read below is first checked against the manifest's size and sha256, once
        self.integrity = Integrity(self.dir, self.manifest.get("files"))

    @cached_property
    def plan(self) -> DecodePlan:
        """decode/plan.json, read once (an artifact does not change once written)."""
        self.integrity.require("decode/plan.json")
        return DecodePlan.read(self.dir / "decode" / "plan.json")

    @cached_property
    def family(self):
        """The model family (families/base.py) that says how this artifact is evaluated and benchmarked."""
        from accelc.families.base import get_family

        return get_family(self.manifest.get("model", {}).get("family", "causal_lm"))

    @property
    def trust_remote_code(self) -> bool:
        return bool(self.manifest.get("model", {}).get("trust_remote_code", False))

    def backends(self) -> dict[str, dict]:
        """Backend name -> {"target": kind, "dir": target dir, "runtime": config}; torch where the
        artifact carries the torch weights (the dev profile; a deploy-profile artifact does not)."""
        out = {"torch": {"target": "source", "runtime": {}}} if self.has_torch_weights() else {}
        for target in self.manifest.get("targets", []):
            for backend, cfg in target["runtime"].items():
                out.setdefault(backend, {"target": target["kind"], "dir": self.dir / target["dir"], "runtime": cfg})
        return out

    def has_torch_weights(self) -> bool:
        return any(f.endswith(WEIGHT_SUFFIXES) for f in self.integrity.entries([HF_DIR])) or (
            not self.integrity.recorded and any(p.name.endswith(WEIGHT_SUFFIXES) for p in (self.dir / HF_DIR).glob("*"))
        )

    def footprint(self, backend: str) -> dict[str, int]:
        """The bytes a deployment on `backend` reads: its models' files, and the files every
        backend shares (tokenizer, configs, decode plan). From the manifest, or from the disk for
        the provisional tree compile proves (its manifest has no file table yet)."""
        entry = self.backend(backend)
        paths = [p for role in entry.held_roles() for p in entry.files(role)]
        if self.integrity.recorded:
            sizes = {f: self.integrity.table[f]["bytes"] for f in self.integrity.entries(paths)}
        else:
            found = [q for p in paths for q in ([p] if Path(p).is_file() else Path(p).rglob("*")) if q.is_file()]
            sizes = {q.relative_to(self.dir).as_posix(): q.stat().st_size for q in found}
        if backend != "torch":  # the tokenizer and configs sit beside the torch weights: shared
            sizes = {f: n for f, n in sizes.items() if not f.startswith(HF_DIR + "/")}
        configs = [q for q in (self.dir / HF_DIR).glob("*") if q.is_file() and not q.name.endswith(WEIGHT_SUFFIXES)]
        shared = [q for q in [*configs, self.dir / "decode" / "plan.json"] if q.is_file()]
        return {
            "model_bytes": sum(sizes.values()),
            "shared_bytes": sum(q.stat().st_size for q in shared if q.relative_to(self.dir).as_posix() not in sizes),
        }

    def backend(self, name: str) -> Backend:
        """The registered runtime backend `name` over its share of this artifact."""
        available = self.backends()
        if name not in available:
            hint = ""
            if name == "torch" and self.manifest.get("profile") == "deploy":
                hint = " (a deploy-profile artifact ships no torch weights; compile with output.profile: dev)"
            raise UsageError(f"backend '{name}' is not in this artifact{hint}; available: {', '.join(available)}")
        entry = available[name]
        return get_backend(name)(Placement(self, entry.get("dir"), entry["runtime"]))

    @cached_property
    def tokenizer(self):
        from accelc.families.causal_lm import load_tokenizer

        self.integrity.require(*self._tokenizer_files())
        return load_tokenizer(self.dir / HF_DIR, self.trust_remote_code)

    def _tokenizer_files(self) -> list[str]:
        """The tokenizer and generation config, not the weights (ORT and TVM never read them)."""
        return [f for f in self.integrity.entries([HF_DIR]) if not f.endswith(WEIGHT_SUFFIXES)]

    @cached_property
    def eos_ids(self) -> tuple[int, ...]:
        from accelc.families.causal_lm import eos_ids

        return eos_ids(self.dir / HF_DIR, self.tokenizer)

    @cached_property
    def context_length(self) -> int | None:
        """The positions its models attend over, from their checkpoints' configs: what a prompt plus
        its generation, a bench length or an eval window is checked against (runtime/limits.py)."""
        from accelc.runtime.limits import context_length

        return context_length([self.dir / HF_DIRS[role] for role in self.roles()])

    @cached_property
    def vocab_size(self) -> int | None:
        """The target's vocabulary (its config's `vocab_size`): the token ids its models take."""
        self.integrity.require(f"{HF_DIR}/config.json")
        config = json.loads((self.dir / HF_DIR / "config.json").read_text())
        return config.get("vocab_size") if isinstance(config.get("vocab_size"), int) else None

    def roles(self) -> list[str]:
        """Decode roles this artifact carries: always "target", plus "draft" for speculative plans."""
        return [role for role, rel in HF_DIRS.items() if (self.dir / rel / "config.json").exists()]

    def torch_model(self, role: str = "target"):
        from accelc.families.causal_lm import load_model

        self.integrity.require(HF_DIRS[role])
        return load_model(self.dir / HF_DIRS[role], self.trust_remote_code)

    def step_model(self, backend: str, role: str = "target", threads: int | None = None, alone_session: bool = False):
        """`threads`: a model's own share of the cores instead of the artifact's (PEARL workers);
        `alone_session`: with them, the calls made alone run on the artifact's threads
        (StepModel.alone)."""
        return self.backend(backend).step_model(role, threads=threads, alone_session=alone_session)

    def batch_model(self, backend: str, *, slots: int, threads: int | None = None):
        """The target decoding up to `slots` sequences per call on `backend` (runtime/base.py
        BatchModel; what `accelc serve` batches with), or None where that backend cannot."""
        return self.backend(backend).open_batched("target", slots=slots, threads=threads)

    def check_backend(self, backend: str) -> None:
        """Refuse now, by name, what a run on `backend` would fail on: its models (Backend.check),
        the decode plan and the tokenizer files."""
        self.integrity.require("decode/plan.json", *self._tokenizer_files())
        entry = self.backend(backend)
        for role in entry.held_roles():
            entry.check(role)

    def has_draft(self, backend: str) -> bool:
        """Whether `backend` holds a draft model that differs from the target."""
        return backend in self.backends() and self.backend(backend).has_draft()

    def plan_for(self, backend: str) -> DecodePlan:
        """The decode plan as it runs on `backend`: a rewritten loop where the backend holds the
        plan's draft; elsewhere plain decoding (greedy, or sampling when the plan samples), with the
        planned strategy and the reason recorded."""
        plan = self.plan
        if not plan.needs_draft or self.has_draft(backend):
            return plan
        where = [b for b in self.backends() if self.has_draft(b)]
        return plan.model_copy(
            update={
                "strategy": "sample" if plan.sampling else "greedy",
                "planned_strategy": plan.strategy,
                "reason": f"backend '{backend}' has no draft for the '{plan.strategy}' plan (it runs on: "
                f"{', '.join(where) or 'no backend of this artifact'}), so it decodes autoregressively",
            }
        )

    def decode_pair(self, backend: str):
        """(target, draft or None) step models for `plan_for(backend)`."""
        plan = self.plan_for(backend)
        # a plan whose loop runs target and draft at once (PEARL) names each worker's share of the
        # cores: where a backend sizes each model's threads (ORT) each gets it, and the target its
        # all-core session too for the calls made alone, where planned
        workers = plan.worker_threads if plan.needs_draft and self.backend(backend).threads_per_model else None
        target = self.step_model(backend, threads=workers and workers.target, alone_session=plan.alone_session)
        draft = self.step_model(backend, "draft", threads=workers and workers.draft) if plan.needs_draft else None
        return target, draft
