"""An int8 CNN with power-of-two scales, and its int32 numpy reference executor.

Every real value is `q * 2^-exp` for an int8 `q` and a per-tensor exponent: the input, each
layer's weights and each layer's output. A conv2d or linear layer then computes, exactly as the
fabric's datapath does (docs/fpga.md): int32 accumulation of int8 products (wrapping), plus an
int32 bias at exponent in+w that already holds the rounding constant 2^(shift-1), an arithmetic
shift right by `shift` = in + w - out, and a clip to [low, 127] (low = 0 fuses the ReLU,
-128 otherwise). Max pooling and flatten act on int8 values and are exact. This executor is the
oracle the simulator must match bit for bit, and the "int8 host" mode of `accelc run`.

Files: `model.json` (steps, exponents) and `weights.safetensors` (`w<i>` int8, `b<i>` int32).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from accelc.errors import UsageError

MODEL = "model.json"
WEIGHTS = "weights.safetensors"


@dataclass
class Int8Model:
    input_shape: tuple[int, int, int]
    input_exp: int
    steps: list[dict]  # {"op", "layer", ...}; conv2d/linear: kernel, padding, shift, low, exp
    weights: dict[int, tuple[np.ndarray, np.ndarray]]  # layer -> (int8 weight, int32 bias)

    @property
    def output_exp(self) -> int:
        return [s for s in self.steps if "exp" in s][-1]["exp"]

    def save(self, directory: Path) -> None:
        from safetensors.numpy import save_file

        directory.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for layer, (w, b) in self.weights.items():
            tensors[f"w{layer}"], tensors[f"b{layer}"] = np.ascontiguousarray(w), np.ascontiguousarray(b)
        save_file(tensors, str(directory / WEIGHTS))
        data = {"input_shape": list(self.input_shape), "input_exp": self.input_exp, "steps": self.steps}
        (directory / MODEL).write_text(json.dumps(data, indent=1))

    @classmethod
    def load(cls, directory: Path) -> Int8Model:
        from safetensors.numpy import load_file

        try:
            data = json.loads((directory / MODEL).read_text())
            tensors = load_file(str(directory / WEIGHTS))
        except (OSError, ValueError) as exc:
            raise UsageError(f"{directory}: cannot read the int8 model ({exc})") from None
        weights = {
            s["layer"]: (tensors[f"w{s['layer']}"], tensors[f"b{s['layer']}"])
            for s in data["steps"]
            if s["op"] in ("conv2d", "linear")
        }
        return cls(tuple(data["input_shape"]), data["input_exp"], data["steps"], weights)

    def quantise_input(self, x: np.ndarray) -> np.ndarray:
        """float N x C x H x W -> int8 at the input exponent."""
        return to_int8(x, self.input_exp)


def to_int8(x: np.ndarray, exp: int | np.ndarray) -> np.ndarray:
    """float -> int8 `q` with `q * 2^-exp` nearest (round half up, saturate); `exp` broadcasts."""
    return np.clip(np.floor(x * 2.0**exp + 0.5), -128, 127).astype(np.int8)


def wrap32(x: np.ndarray) -> np.ndarray:
    return ((x + (1 << 31)) & 0xFFFFFFFF) - (1 << 31)


def im2col(x: np.ndarray, kernel: int, padding: int) -> np.ndarray:
    """N x C x H x W -> N x Ho x Wo x (C * k * k), in the weight's (C, kh, kw) order."""
    if padding:
        x = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    win = np.lib.stride_tricks.sliding_window_view(x, (kernel, kernel), axis=(2, 3))  # N C Ho Wo k k
    n, c, ho, wo = win.shape[:4]
    return win.transpose(0, 2, 3, 1, 4, 5).reshape(n, ho, wo, c * kernel * kernel)


def requantise(acc: np.ndarray, bias: np.ndarray, shift, low: int) -> np.ndarray:
    """int32 accumulators (channels last) -> int8: ADD bias (wrapping), SHR by one shift or one
    per channel, MAX low, MIN 127."""
    x = wrap32(wrap32(acc) + bias.astype(np.int64))
    return np.minimum(np.maximum(x >> np.asarray(shift, dtype=np.int64), low), 127).astype(np.int8)


def gemm_int32(a: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Exact int8 x int8 -> int64 products summed over the last axis: every partial sum is an
    integer below K * 2^14, which float32 holds exactly below 2^24 (K <= 1024) and float64 beyond."""
    dtype = np.float32 if a.shape[-1] << 14 <= 1 << 24 else np.float64
    return (a.astype(dtype) @ w.astype(dtype).T).astype(np.int64)


def run_step(step: dict, weights, x: np.ndarray) -> np.ndarray:
    """One step of the int8 program on a batch of int8 activations."""
    op = step["op"]
    if op == "conv2d":
        w, b = weights[step["layer"]]
        cols = im2col(x, step["kernel"], step["padding"])
        acc = gemm_int32(cols, w.reshape(w.shape[0], -1))  # N Ho Wo Cout
        return requantise(acc, b, step["shift"], step["low"]).transpose(0, 3, 1, 2)
    if op == "linear":
        w, b = weights[step["layer"]]
        return requantise(gemm_int32(x, w), b, step["shift"], step["low"])
    if op == "max_pool2d":
        k = step["kernel"]
        n, c, h, wd = x.shape
        x = x[:, :, : h // k * k, : wd // k * k]
        return x.reshape(n, c, h // k, k, wd // k, k).max(axis=(3, 5))
    if op == "relu":
        return np.maximum(x, 0)
    if op == "flatten":
        return x.reshape(len(x), -1)
    raise UsageError(f"int8 step {op!r} is not one the executor runs")


def reference(model: Int8Model, x_q: np.ndarray) -> np.ndarray:
    """int8 logits of int8 inputs, every step on the host."""
    for step in model.steps:
        x_q = run_step(step, model.weights, x_q)
    return x_q
