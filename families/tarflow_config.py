"""A TarFlow's configuration and its folder's files, without torch: recognising a folder, checking a
recipe or reading an artifact's plan must not pay for importing torch (families/tarflow_model.py
holds the model itself)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from accelc.errors import UsageError

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
MODEL_TYPE = "tarflow"


@dataclass(frozen=True)
class TarFlowConfig:
    image_size: int = 28
    channels: int = 1
    patch: int = 4
    width: int = 64
    blocks: int = 4
    layers: int = 2
    heads: int = 4
    noise_std: float = 0.1

    @property
    def tokens(self) -> int:
        return (self.image_size // self.patch) ** 2

    @property
    def token_dim(self) -> int:
        return self.channels * self.patch**2

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    def check(self, where: str) -> None:
        ints = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "noise_std"}
        for name, value in ints.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise UsageError(f"{where}: {name} must be a positive integer, not {value!r}")
        if self.image_size % self.patch:
            raise UsageError(f"{where}: patch {self.patch} does not divide image_size {self.image_size}")
        if self.width % self.heads:
            raise UsageError(f"{where}: heads {self.heads} does not divide width {self.width}")
        if self.tokens < 2:
            raise UsageError(f"{where}: an image of {self.tokens} patch(es) has nothing to model autoregressively")
        if not isinstance(self.noise_std, (int, float)) or not 0 < self.noise_std < 1:
            raise UsageError(f"{where}: noise_std must be a number in (0, 1), not {self.noise_std!r}")

    def to_json(self) -> dict:
        return {"model_type": MODEL_TYPE, **asdict(self)}

    @classmethod
    def from_json(cls, data: dict, where: str) -> TarFlowConfig:
        if not isinstance(data, dict) or data.get("model_type") != MODEL_TYPE:
            raise UsageError(f"{where}: not a TarFlow config (model_type must be '{MODEL_TYPE}')")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known - {"model_type"})
        if unknown:
            raise UsageError(f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(known))}")
        config = cls(**{k: v for k, v in data.items() if k in known})
        config.check(where)
        return config


def is_tarflow_dir(path: Path) -> bool:
    config = path / CONFIG_FILE
    if not (path.is_dir() and config.is_file()):
        return False
    try:
        return json.loads(config.read_text()).get("model_type") == MODEL_TYPE
    except (OSError, ValueError, AttributeError):
        return False


def read_config(directory: Path) -> TarFlowConfig:
    path = directory / CONFIG_FILE
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UsageError(f"{path}: cannot read a TarFlow config ({exc})") from None
    if isinstance(data, dict):
        data = {k: v for k, v in data.items() if not k.startswith("accelc_")}
    return TarFlowConfig.from_json(data, str(path))
