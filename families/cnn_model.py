"""Convolutional classifiers as a plain list of layers: the CNN family's model of record.

A model is a `config.json` (`{"accelc_cnn": 1, "input": [C, H, W], "classes": N, "layers": [...]}`)
and a `model.safetensors` of its weights. Each layer is one dict with an `op`:

- `conv2d` (`in`, `out`, `kernel`, `padding`; stride 1), `linear` (`in`, `out`): the layers with weights,
  named `layers.<index>.weight` / `.bias` in the safetensors file;
- `relu`, `max_pool2d` (`kernel`, stride = kernel), `flatten`, `dropout` (identity at inference).

Everything that reads a CNN (training, int8 quantisation, lowering to the fabric) walks this list,
so a new consumer needs no torch module surgery. The built-ins: `fmnist-cnn`, a VGG-style network
(Simonyan & Zisserman, arXiv 1409.1556) for 28x28 Fashion-MNIST that `accelc train fmnist-cnn`
trains; `vgg16`, configuration D of that paper with torchvision's layer layout and seeded weights
(224x224x3, for shape and speed work); `tiny-cnn`, a small seeded network for tests.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from accelc.errors import UsageError

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
MARKER = "accelc_cnn"
OPS = {
    "conv2d": ("in", "out", "kernel", "padding"),
    "linear": ("in", "out"),
    "relu": (),
    "max_pool2d": ("kernel",),
    "flatten": (),
    "dropout": (),
}
SEED = 0


@dataclass(frozen=True)
class CNNConfig:
    input: tuple[int, int, int]  # C, H, W
    classes: int
    layers: tuple[dict, ...]

    def to_json(self) -> dict:
        return {MARKER: 1, "input": list(self.input), "classes": self.classes, "layers": [dict(x) for x in self.layers]}

    @classmethod
    def from_json(cls, data, where: str) -> CNNConfig:
        """Validate a config (exit 2 naming the key) and check that the layer shapes chain."""
        if not isinstance(data, dict) or data.get(MARKER) != 1:
            raise UsageError(f'{where}: not an accelc CNN config (no "{MARKER}": 1)')
        shape = data.get("input")
        if not (isinstance(shape, list) and len(shape) == 3 and all(isinstance(v, int) and v > 0 for v in shape)):
            raise UsageError(f"{where}: input must be [channels, height, width] of positive integers, not {shape!r}")
        layers = data.get("layers")
        if not isinstance(layers, list) or not layers:
            raise UsageError(f"{where}: layers must be a non-empty list")
        for i, layer in enumerate(layers):
            op = layer.get("op") if isinstance(layer, dict) else None
            if op not in OPS:
                raise UsageError(f"{where}: layers[{i}].op is {op!r}; allowed: {', '.join(OPS)}")
            for key in OPS[op]:
                if not isinstance(layer.get(key), int) or layer[key] < 0 or (key != "padding" and layer[key] == 0):
                    raise UsageError(f"{where}: layers[{i}] ({op}) needs a positive integer '{key}'")
        config = cls(tuple(shape), data.get("classes"), tuple(layers))
        out = config.shapes()[-1]
        if out != (config.classes,):
            raise UsageError(f"{where}: the last layer gives shape {out}, not ({config.classes},) classes")
        return config

    def shapes(self) -> list[tuple[int, ...]]:
        """The activation shape after each layer (index 0: the input), or exit 2 where they do not chain."""
        shape: tuple[int, ...] = self.input
        shapes = [shape]
        for i, layer in enumerate(self.layers):
            op = layer["op"]
            if op == "conv2d":
                if len(shape) != 3 or shape[0] != layer["in"]:
                    raise UsageError(f"layers[{i}] conv2d expects {layer['in']} input channels, gets shape {shape}")
                pad, k = layer["padding"], layer["kernel"]
                shape = (layer["out"], shape[1] + 2 * pad - k + 1, shape[2] + 2 * pad - k + 1)
            elif op == "max_pool2d":
                if len(shape) != 3:
                    raise UsageError(f"layers[{i}] max_pool2d needs a C x H x W input, gets shape {shape}")
                shape = (shape[0], shape[1] // layer["kernel"], shape[2] // layer["kernel"])
            elif op == "flatten":
                shape = (int(np.prod(shape)),)
            elif op == "linear":
                if shape != (layer["in"],):
                    raise UsageError(f"layers[{i}] linear expects {layer['in']} features, gets shape {shape}")
                shape = (layer["out"],)
            if min(shape) <= 0:
                raise UsageError(f"layers[{i}] {op} leaves an empty activation of shape {shape}")
            shapes.append(shape)
        return shapes

    def macs(self) -> list[int]:
        """Multiply-accumulates of each layer for one image (0 for layers without weights)."""
        shapes = self.shapes()
        out = []
        for i, layer in enumerate(self.layers):
            after = shapes[i + 1]
            if layer["op"] == "conv2d":
                out.append(int(np.prod(after)) * layer["in"] * layer["kernel"] ** 2)
            elif layer["op"] == "linear":
                out.append(layer["in"] * layer["out"])
            else:
                out.append(0)
        return out


def _vgg_features(channels: int, widths: list) -> list[dict]:
    layers = []
    for width in widths:
        if width == "M":
            layers.append({"op": "max_pool2d", "kernel": 2})
        else:
            layers += [{"op": "conv2d", "in": channels, "out": width, "kernel": 3, "padding": 1}, {"op": "relu"}]
            channels = width
    return layers


def _classifier(features: int, hidden: list[int], classes: int, dropout: bool) -> list[dict]:
    layers = [{"op": "flatten"}]
    for width in hidden:
        layers += [{"op": "linear", "in": features, "out": width}, {"op": "relu"}]
        layers += [{"op": "dropout"}] if dropout else []
        features = width
    return layers + [{"op": "linear", "in": features, "out": classes}]


# torchvision's vgg16: configuration D, then the 7x7x512 classifier (its adaptive average pool is
# the identity at 224x224, so it is not a layer here)
VGG16_WIDTHS = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]
BUILTINS = {
    "fmnist-cnn": CNNConfig(
        (1, 28, 28),
        10,
        tuple(_vgg_features(1, [32, 32, "M", 64, 64, "M"]) + _classifier(64 * 7 * 7, [128], 10, dropout=False)),
    ),
    "vgg16": CNNConfig(
        (3, 224, 224), 1000, tuple(_vgg_features(3, VGG16_WIDTHS) + _classifier(512 * 7 * 7, [4096, 4096], 1000, True))
    ),
    "tiny-cnn": CNNConfig(
        (1, 12, 12),
        10,
        tuple(_vgg_features(1, [16, "M", 32, "M"]) + _classifier(32 * 3 * 3, [32], 10, dropout=False)),
    ),
}
TRAINED = ("fmnist-cnn",)


def build_torch(config: CNNConfig):
    """The torch module of a config: `layers` is an nn.Sequential in list order."""
    from torch import nn

    def module(layer: dict):
        op = layer["op"]
        if op == "conv2d":
            return nn.Conv2d(layer["in"], layer["out"], layer["kernel"], padding=layer["padding"])
        if op == "linear":
            return nn.Linear(layer["in"], layer["out"])
        if op == "max_pool2d":
            return nn.MaxPool2d(layer["kernel"])
        return {"relu": nn.ReLU, "flatten": nn.Flatten, "dropout": nn.Dropout}[op]()

    class CNN(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.Sequential(*(module(layer) for layer in config.layers))

        def forward(self, x):
            return self.layers(x)

    return CNN()


def seeded(config: CNNConfig, seed: int = SEED):
    """A model with torch's default initialisation under a fixed seed."""
    import torch

    torch.manual_seed(seed)
    return build_torch(config).eval()


def save(model, config: CNNConfig, directory: Path) -> Path:
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(directory / WEIGHTS))
    (directory / CONFIG).write_text(json.dumps(config.to_json(), indent=1))
    return directory


def read_config(directory: Path) -> CNNConfig:
    path = directory / CONFIG
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UsageError(f"{path}: cannot read the CNN config ({exc})") from None
    return CNNConfig.from_json(data, str(path))


def load(directory: Path):
    """(config, torch model in eval mode) of a model folder; weights through safetensors only."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    config = read_config(directory)
    model = build_torch(config)
    try:
        state = load_file(str(directory / WEIGHTS))
    except (OSError, SafetensorError) as exc:
        raise UsageError(f"{directory / WEIGHTS}: cannot read the weights ({exc})") from None
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise UsageError(
            f"{directory / WEIGHTS}: weights do not match {CONFIG} (missing {missing}, extra {unexpected})"
        )
    return config, model.eval()


def weights(model) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Layer index -> (weight, bias) as float32 numpy arrays, for the layers that have them."""
    out = {}
    for i, module in enumerate(model.layers):
        if hasattr(module, "weight"):
            out[i] = (module.weight.detach().float().numpy(), module.bias.detach().float().numpy())
    return out


def images_to_input(images: np.ndarray) -> np.ndarray:
    """uint8 N x H x W grey images -> float32 N x 1 x H x W in [0, 1], the networks' input scale."""
    return (images.astype(np.float32) / 255.0)[:, None]


def fashion_mnist_inputs(shape: tuple[int, int, int], split: str, count: int | None = None, seed: int = SEED):
    """(float inputs N x C x H x W, labels) of real Fashion-MNIST images fitted to a model's input:
    resized (bilinear) to H x W and repeated over C channels; `count` images drawn with `seed`."""
    from accelc.images import fashion_mnist

    images, labels = fashion_mnist(split)
    if count is not None and count < len(images):
        pick = np.sort(np.random.default_rng(seed).choice(len(images), count, replace=False))
        images, labels = images[pick], labels[pick]
    x = images_to_input(images)
    channels, height, width = shape
    if (height, width) != x.shape[2:]:
        import torch

        x = torch.nn.functional.interpolate(torch.from_numpy(x), size=(height, width), mode="bilinear").numpy()
    return np.ascontiguousarray(np.repeat(x, channels, axis=1)), labels.astype(np.int64)
