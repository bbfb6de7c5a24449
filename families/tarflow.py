"""The TarFlow family: transformer autoregressive flows over image patches (arXiv 2412.06329).

Its model of record is a folder of `config.json` (model_type `tarflow`) and `model.safetensors`
(families/tarflow_model.py). Built-ins: `tarflow-tiny`, seeded random weights for tests, and
`tarflow-fmnist`, trained on Fashion-MNIST by `accelc train tarflow-fmnist`.

Its runtime protocol is the flow model of runtime/flow.py (blocks with a full call and a cached
step), which it opens through a backend's placement (`open_model`): the torch model of record,
or ONNX Runtime on the `export_flow` pass's graphs (the artifact's `model/onnx/flow.onnx/`
folder). The `jacobi` pass writes the sampling schedule into the decode plan; `accelc run`
samples an image grid with it, `prove` checks parity and records bits per dimension, `accelc
bench` times the schedules (families/tarflow_proof.py).
"""

from __future__ import annotations

from pathlib import Path

from accelc import assets
from accelc.errors import UsageError
from accelc.families import tarflow_config
from accelc.families.base import Family, register_family
from accelc.families.tarflow_config import TarFlowConfig
from accelc.runtime.flow import FlowModel

TINY = "tarflow-tiny"
FMNIST = "tarflow-fmnist"
TINY_CONFIG = TarFlowConfig(image_size=8, channels=1, patch=2, width=32, blocks=4, layers=1, heads=2, noise_std=0.1)
TINY_SEED = 0
FMNIST_CONFIG = TarFlowConfig(image_size=28, channels=1, patch=4, width=64, blocks=4, layers=2, heads=4, noise_std=0.1)


def tiny_model(config: TarFlowConfig = TINY_CONFIG, seed: int = TINY_SEED, scale: float = 0.3):
    """Seeded random weights whose output projections are scaled so each block's (a, b) are
    O(0.1-1), as a trained flow's are (a zero projection would make every block the identity)."""
    import torch

    from accelc.families.tarflow_model import TarFlow

    torch.manual_seed(seed)
    model = TarFlow(config)
    with torch.no_grad():
        for block in model.blocks:
            block.proj_out.weight.normal_(0.0, scale / config.width**0.5)
    return model.eval()


def builtin_dir(name: str) -> Path:
    models = assets.cache_dir("models")
    if name == TINY:
        final = models / f"{TINY}-seed{TINY_SEED}"
        if not final.exists():
            tmp = assets.temp_sibling_dir(final)
            from accelc.families import tarflow_model

            tarflow_model.save(tiny_model(), tmp)
            assets.publish_dir(tmp, final)
        return final
    if name == FMNIST:
        final = models / FMNIST
        if not final.exists():
            raise UsageError(f"built-in model '{FMNIST}' is not trained yet; run `accelc train {FMNIST}` first")
        return final
    raise UsageError(f"'{name}' is not a built-in TarFlow; allowed: {TINY}, {FMNIST}")


@register_family
class TarFlowFamily(Family):
    name = "tarflow"
    title = "TarFlow"
    inputs = "a TarFlow folder (config.json with model_type tarflow, model.safetensors)"
    protocol = FlowModel

    def builtins(self) -> list[str]:
        return [TINY, FMNIST]

    def recognises_path(self, path: Path) -> bool:
        return tarflow_config.is_tarflow_dir(path)

    def train(self, name: str, steps: int | None = None, fresh: bool = False) -> Path:
        from accelc.families.tarflow_train import TrainSpec, train

        if name != FMNIST:
            return super().train(name, steps, fresh)
        spec = TrainSpec(config=FMNIST_CONFIG, **({"steps": steps} if steps else {}))
        return train(spec, assets.cache_dir("models") / FMNIST, fresh=fresh)

    def check_input(self, spec, recipe=None) -> None:
        if spec.path is not None:
            tarflow_config.read_config(self._path(spec, recipe))

    def _path(self, spec, recipe) -> Path:
        from accelc.compiler.recipe import resolve_path

        if spec.path is None:
            return builtin_dir(spec.builtin)
        return resolve_path(recipe, spec.path) if recipe is not None else Path(spec.path)

    def ingest(self, spec, recipe=None):
        from accelc.compiler.bundle import Bundle, chain
        from accelc.families import tarflow_model
        from accelc.fileutil import sha256_file

        path = self._path(spec, recipe)
        tarflow_model.load(path)  # refuses weights that do not belong to the config, by name
        files = {name: sha256_file(path / name) for name in (tarflow_config.CONFIG_FILE, tarflow_config.WEIGHTS_FILE)}
        description = f"builtin:{spec.builtin}" if spec.path is None else f"tarflow:{path}"
        return Bundle(
            id=chain("", "source", {"files": files}),
            family=self.name,
            source={"description": description, "files": files},
            model_dir=path,
        )

    def graph_roles(self, bundle) -> dict[str, str]:
        from accelc.passes.export_flow import FLOW_GRAPH

        return {"target": FLOW_GRAPH}

    def decode_plan(self, recipe, bundle) -> dict:
        from accelc.families.tarflow_run import decode_plan

        return decode_plan(bundle)

    def open_model(self, backend, role: str, *, threads: int | None = None, alone_session: bool = False):
        from accelc.families.tarflow_run import open_flow

        return open_flow(backend, role, threads)

    def run(self, art, args) -> int:
        from accelc.families.tarflow_run import run

        return run(art, args)

    def prove(self, directory: Path, recipe, manifest: dict) -> tuple[dict, bool]:
        from accelc.families.tarflow_proof import prove

        return prove(directory, recipe, manifest)

    def bench(self, art, spec) -> dict:
        from accelc.families.tarflow_proof import bench

        return bench(art, spec)

    def report_bench(self, art, result: dict, figure: Path) -> None:
        from accelc.families.tarflow_proof import report_bench

        report_bench(art, result, figure)
