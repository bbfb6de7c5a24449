"""The CNN family: image classifiers given as a plain list of layers (families/cnn_model.py).

Ingest normalises a model to its folder of record (config.json + model.safetensors): a user's
folder as is, a seeded built-in materialised once, the trained Fashion-MNIST network from the
asset cache (`accelc train fmnist-cnn` builds it). Its artifacts are classifiers, lowered by the
`fpga` target (targets/fpga.py) and proved by the fabric simulator against the int32 reference.
"""

from __future__ import annotations

from pathlib import Path

from accelc.compiler.bundle import Bundle, chain
from accelc.errors import UsageError
from accelc.families import cnn_model
from accelc.families.base import Family, register_family
from accelc.fileutil import sha256_file


def builtin_dir(name: str) -> Path:
    """The model folder of a built-in: trained ones must have been trained, seeded ones are made once."""
    from accelc import assets
    from accelc.families import cnn_train

    if name in cnn_model.TRAINED:
        final = cnn_train.trained_dir(name)
        if not (final / cnn_train.REPORT).exists():
            raise UsageError(f"built-in model '{name}' is not trained yet: run `accelc train {name}` first")
        return final
    final = assets.cache_root() / "models" / f"{name}-seed{cnn_model.SEED}"
    if (final / cnn_model.CONFIG).exists():
        return final
    config = cnn_model.BUILTINS[name]
    tmp = cnn_model.save(cnn_model.seeded(config), config, assets.temp_sibling_dir(final))
    return assets.publish_dir(tmp, final)


def is_cnn_dir(path: Path) -> bool:
    import json

    try:
        return path.is_dir() and json.loads((path / cnn_model.CONFIG).read_text()).get(cnn_model.MARKER) == 1
    except (OSError, ValueError, AttributeError):
        return False


@register_family
class CNN(Family):
    """Image classifiers (conv2d, relu, max_pool2d, flatten, linear)."""

    name = "cnn"
    title = "CNN classifier"
    inputs = f'a CNN folder (config.json with "{cnn_model.MARKER}": 1 and model.safetensors)'

    def builtins(self) -> list[str]:
        return list(cnn_model.BUILTINS)

    def train(self, name: str, steps: int | None = None, fresh: bool = False) -> Path:
        from accelc.families import cnn_train

        if name not in cnn_model.TRAINED:
            return super().train(name, steps, fresh)
        return cnn_train.train(name, steps=steps, fresh=fresh)

    def recognises_path(self, path: Path) -> bool:
        return is_cnn_dir(path)

    def _dir(self, spec, recipe) -> Path:
        from accelc.compiler.recipe import resolve_path

        if spec.path is None:
            return builtin_dir(spec.builtin)
        return resolve_path(recipe, spec.path) if recipe is not None else Path(spec.path)

    def check_input(self, spec, recipe=None) -> None:
        if spec.path is not None:
            cnn_model.read_config(self._dir(spec, recipe))

    def ingest(self, spec, recipe=None) -> Bundle:
        directory = self._dir(spec, recipe)
        cnn_model.load(directory)  # refuse weights that do not match the config before any work
        files = {p.name: sha256_file(p) for p in sorted(directory.iterdir()) if p.is_file()}
        description = f"builtin:{spec.builtin}" if spec.builtin else f"cnn:{directory}"
        ident = {"files": files}
        return Bundle(
            id=chain("", "source", ident),
            family=self.name,
            source={"description": description, **ident},
            model_dir=directory,
        )

    def graph_roles(self, bundle) -> dict[str, str]:
        return {}

    def decode_plan(self, recipe, bundle) -> dict | None:
        return dict(bundle.plan) or None  # the partition pass's HALP plan (families/cnn_halp.py)

    def prove(self, directory: Path, recipe, manifest: dict) -> tuple[dict, bool]:
        from accelc.families import cnn_halp, cnn_hls4ml, cnn_proof

        metrics, ok = {}, True
        if cnn_halp.plan_of(manifest) is not None:
            metrics["halp"], ok = cnn_halp.prove(directory, manifest)
        fpga = next((t for t in manifest["targets"] if t["kind"] == "fpga"), None)
        if fpga is not None:  # the fabric's proof: the VTA simulator, or hls4ml's C simulation
            prove = cnn_hls4ml.prove if fpga["params"]["flavour"] == "hls4ml" else cnn_proof.prove
            found, fpga_ok = prove(directory, manifest)
            metrics, ok = {**metrics, **found}, ok and fpga_ok
        if not ok and "failure" not in metrics:
            metrics["failure"] = metrics["halp"]["failure"]
        return metrics, ok

    def bench(self, art, spec) -> dict:
        from accelc.families import cnn_halp

        if cnn_halp.plan_of(art.manifest) is None:
            return super().bench(art, spec)
        return cnn_halp.bench(art, spec)

    def run(self, art, args) -> int:
        from accelc.families import cnn_halp
        from accelc.families.cnn_run import run

        if cnn_halp.plan_of(art.manifest) is not None and args.backend is None:
            return cnn_halp.run(art, args)
        return run(art, args)
