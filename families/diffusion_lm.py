"""The masked-diffusion LM family: LLaDA- and Dream-style checkpoint folders and built-ins.

A folder is this family's when its config.json names a LLaDA or Dream architecture
(`LLaDAModelLM`, `DreamModel`); the torch modules and the published layouts' weight names are in
diffusion_lm_model.py, so no `trust_remote_code` is needed. Its artifacts serve the denoiser
protocol (runtime/denoiser.py), not the causal LM's StepModel: `open_denoiser` hands one out for
a backend, and decode/plan.json holds a sampler configuration (loops/diffusion.py), which the
`diffusion_sampling` pass chooses. Built-ins: the tiny seeded test models of both architectures
and `smollm2-dream`, trained by `accelc train smollm2-dream` (diffusion_lm_train.py).
"""

from __future__ import annotations

import json
from pathlib import Path

from accelc import progress
from accelc.compiler.bundle import Bundle, chain
from accelc.errors import UsageError
from accelc.families.base import Family, register_family
from accelc.families.diffusion_lm_train import BUILTINS as TRAINED  # name -> stage; imports no torch
from accelc.fileutil import sha256_file
from accelc.runtime.denoiser import Denoiser

GRAPH_ROLE = "denoiser"  # the bundle's and the manifest's name of the exported graph


def builtin_dir(name: str) -> Path:
    from accelc import assets
    from accelc.families import diffusion_lm_tiny as tiny

    if name in TRAINED:
        from accelc.families.diffusion_lm_train import model_dir

        final = model_dir(TRAINED[name])
        if not final.is_dir():
            raise UsageError(f"built-in model '{name}' is not trained yet: run `accelc train {name}` first")
        return final
    final = assets.cache_root() / "models" / f"{name}-seed{tiny.SEED}"
    if (final / "config.json").exists():
        return final
    return assets.publish_dir(tiny.build(name, assets.temp_sibling_dir(final)), final)


def is_diffusion_folder(path: Path) -> bool:
    from accelc.families.diffusion_lm_model import architecture_of

    config = path / "config.json"
    if not (path.is_dir() and config.is_file()):
        return False
    try:
        raw = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(raw, dict) and architecture_of(raw) is not None


def plan_of(directory: Path):
    """The artifact's sampler configuration (decode/plan.json)."""
    from accelc.loops.diffusion import SamplerOptions

    path = directory / "decode" / "plan.json"
    try:
        raw = json.loads(path.read_text()) if path.exists() else {}
        # the pass's figures and reason sit beside the sampler's fields
        return SamplerOptions.model_validate({k: v for k, v in raw.items() if k in SamplerOptions.model_fields})
    except (ValueError, AttributeError) as exc:
        raise UsageError(f"{path}: not a diffusion sampler plan ({str(exc).splitlines()[0]}); recompile") from None


def open_denoiser(art, backend: str) -> Denoiser:
    """The artifact's denoiser on `backend`: torch from its checkpoint, ort from its exported graph.
    A graph backend hands out the denoiser its runtime config names, with the model's mask token
    and logit shift read from the checkpoint's config (the graph does not carry them)."""
    from accelc.families import diffusion_lm_model as dm
    from accelc.runtime.artifact import HF_DIR
    from accelc.runtime.denoiser import TorchDenoiser

    entry = art.backend(backend)
    cfg = dm.DiffusionConfig.read(art.dir / HF_DIR)
    if backend == "torch":
        art.integrity.require(HF_DIR)
        return TorchDenoiser(dm.load(art.dir / HF_DIR))
    if backend == "ort":
        from accelc.runtime.ort_denoiser import OrtDenoiser

        entry.check("target")
        return OrtDenoiser(
            entry.graph("target"),
            entry.placement.config["session"],
            mask_id=cfg.mask_token_id,
            shift=cfg.shift,
            eos_id=cfg.eos_token_id,
        )
    raise UsageError(f"backend '{backend}' does not run masked-diffusion denoisers; use torch or ort")


@register_family
class DiffusionLM(Family):
    """Masked-diffusion LMs (LLaDA, Dream), sampled by a diffusion sampler."""

    name = "diffusion_lm"
    title = "masked-diffusion LM"
    inputs = "a LLaDA or Dream checkpoint folder (config.json architectures LLaDAModelLM or DreamModel)"
    protocol = Denoiser

    def builtins(self) -> list[str]:
        from accelc.families.diffusion_lm_tiny import TINY

        return [*TINY, *TRAINED]

    def train(self, name: str, steps: int | None = None, fresh: bool = False) -> Path:
        if name not in TRAINED:
            return super().train(name, steps, fresh)
        from accelc.families.diffusion_lm_train import train

        return train(name, steps, fresh)

    def recognises_path(self, path: Path) -> bool:
        return is_diffusion_folder(path)

    def check_input(self, spec, recipe=None) -> None:
        from accelc.compiler.recipe import resolve_path
        from accelc.families.diffusion_lm_model import DiffusionConfig

        if spec.path is not None:
            DiffusionConfig.read(resolve_path(recipe, spec.path) if recipe is not None else Path(spec.path))

    def ingest(self, spec, recipe=None) -> Bundle:
        from accelc.compiler.recipe import resolve_path
        from accelc.families.diffusion_lm_model import load

        if spec.builtin is not None:
            with progress.step(f"model: builtin {spec.builtin}"):
                directory = builtin_dir(spec.builtin)
            description = f"builtin:{spec.builtin}"
        else:
            directory = resolve_path(recipe, spec.path) if recipe is not None else Path(spec.path)
            description = f"hf:{directory}"
        load(directory)  # config, weight names and shapes, before any pass runs
        with progress.step("model: hashing weights"):
            files = [p for p in directory.iterdir() if p.suffix == ".safetensors" or p.name == "config.json"]
            ident = {"files": {p.name: sha256_file(p) for p in sorted(files)}}
        return Bundle(
            id=chain("", "source", ident),
            family=self.name,
            source={"description": description, "model_dir": str(directory), **ident},
            model_dir=directory,
        )

    def graph_roles(self, bundle) -> dict[str, str]:
        return {"target": GRAPH_ROLE}

    def decode_plan(self, recipe, bundle) -> dict:
        from accelc.loops.diffusion import SamplerOptions

        plan = SamplerOptions.model_validate(dict(bundle.plan.get("sampler", {})))
        return {**plan.model_dump(mode="json"), **{k: v for k, v in bundle.plan.items() if k != "sampler"}}

    def run(self, art, args) -> int:
        from accelc.families.diffusion_lm_proof import run

        return run(art, args)

    def prove(self, directory: Path, recipe, manifest: dict) -> tuple[dict, bool]:
        from accelc.families.diffusion_lm_proof import prove

        return prove(directory, recipe, manifest)

    def bench(self, art, spec) -> dict:
        from accelc.families.diffusion_lm_bench import bench

        return bench(art, spec)

    def report_bench(self, art, result: dict, figure: Path) -> None:
        from accelc.families.diffusion_lm_bench import report

        report(result, figure)
