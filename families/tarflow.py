"""The TarFlow family: transformer autoregressive flows over image patches (arXiv 2412.06329).

Its model of record is a folder of `config.json` (model_type `tarflow`) and `model.safetensors`
(families/tarflow_model.py). Built-ins: `tarflow-tiny`, seeded random weights for tests, and
`tarflow-fmnist`, trained on Fashion-MNIST by `accelc train tarflow-fmnist`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from accelc import assets
from accelc.errors import UsageError
from accelc.families import tarflow_model
from accelc.families.base import Family, register_family
from accelc.families.tarflow_model import TarFlow, TarFlowConfig

TINY = "tarflow-tiny"
FMNIST = "tarflow-fmnist"
TINY_CONFIG = TarFlowConfig(image_size=8, channels=1, patch=2, width=32, blocks=4, layers=1, heads=2, noise_std=0.1)
TINY_SEED = 0
FMNIST_CONFIG = TarFlowConfig(image_size=28, channels=1, patch=4, width=64, blocks=4, layers=2, heads=4, noise_std=0.1)


def tiny_model(config: TarFlowConfig = TINY_CONFIG, seed: int = TINY_SEED, scale: float = 0.3) -> TarFlow:
    """Seeded random weights whose output projections are scaled so each block's (a, b) are
    O(0.1-1), as a trained flow's are (a zero projection would make every block the identity)."""
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

    def builtins(self) -> list[str]:
        return [TINY, FMNIST]

    def recognises_path(self, path: Path) -> bool:
        return tarflow_model.is_tarflow_dir(path)

    def train(self, name: str, steps: int | None = None, fresh: bool = False) -> Path:
        from accelc.families.tarflow_train import TrainSpec, train

        if name != FMNIST:
            return super().train(name, steps, fresh)
        spec = TrainSpec(config=FMNIST_CONFIG, **({"steps": steps} if steps else {}))
        return train(spec, assets.cache_dir("models") / FMNIST, fresh=fresh)
