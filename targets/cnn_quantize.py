"""int8 post-training quantisation of a CNN with power-of-two scales, calibrated on real images.

Symmetric and per tensor, as VTA's own flow does (Moreau et al., arXiv 1807.04188, section 5:
8-bit weights and activations, requantisation by shifts): each tensor's exponent is the largest
`e` with `max|x| * 2^e <= 127`, from the fp32 model's activations on calibration images (the
maximum over them, so nothing saturates on data like it) and from the weights themselves.
Requantisation is then a shift by in + w - out; a shift past what the fabric's SHR does is
brought back by coarsening the weights (fewer fractional bits) rather than refused. A ReLU after a
conv2d/linear is fused into its clip (low = 0); dropout is the identity and disappears.
"""

from __future__ import annotations

import math

import numpy as np

from accelc.runtime.cnn_int8 import Int8Model
from accelc.targets.vta_lower import SHIFT_MAX


def exponent(peak: float) -> int:
    """The largest e with peak * 2^e <= 127 (a zero tensor gets a neutral 0)."""
    return 0 if peak <= 0 else math.floor(math.log2(127.0 / peak))


def quantise_linear(w: np.ndarray, b: np.ndarray | None, in_exp: int, out_peak: float):
    """int8 weights, the int32 bias (with the rounding constant), the shift and the output exponent
    of a conv2d/linear layer whose input is at `in_exp` and whose fp32 output reaches `out_peak`."""
    out_exp = exponent(out_peak)
    w_exp = exponent(float(np.abs(w).max()))
    shift = in_exp + w_exp - out_exp
    if shift > SHIFT_MAX:
        w_exp -= shift - SHIFT_MAX
        shift = SHIFT_MAX
    if shift < 0:  # the output gets the accumulator's exponent: no shift, coarser values
        out_exp, shift = in_exp + w_exp, 0
    w_q = np.clip(np.round(w * 2.0**w_exp), -128, 127).astype(np.int8)
    rounding = (1 << (shift - 1)) if shift else 0
    b_q = np.zeros(len(w), dtype=np.int64) if b is None else np.round(b * 2.0 ** (in_exp + w_exp)).astype(np.int64)
    b_q = np.clip(b_q + rounding, -(1 << 31), (1 << 31) - 1).astype(np.int32)
    return w_q, b_q, shift, out_exp


def activation_peaks(config, model, images: np.ndarray) -> tuple[float, dict[int, float]]:
    """max |input| and, per layer index, max |output| of the fp32 model on `images` (N x C x H x W)."""
    import torch

    peaks: dict[int, float] = {}
    x = torch.from_numpy(images)
    with torch.inference_mode():
        for start in range(0, len(x), 256):
            h = x[start : start + 256]
            for i, module in enumerate(model.layers):
                h = module(h)
                peaks[i] = max(peaks.get(i, 0.0), float(h.abs().max()))
    return float(np.abs(images).max()), peaks


def quantise(config, model, calibration: np.ndarray) -> Int8Model:
    """The int8 program of a CNN (families/cnn_model.py) calibrated on float images."""
    from accelc.families.cnn_model import weights as float_weights

    input_peak, peaks = activation_peaks(config, model, calibration)
    fw = float_weights(model)
    in_exp = exponent(input_peak)
    exp = in_exp
    steps: list[dict] = []
    weights = {}
    layers = config.layers
    for i, layer in enumerate(layers):
        op = layer["op"]
        if op in ("conv2d", "linear"):
            fused = i + 1 < len(layers) and layers[i + 1]["op"] == "relu"
            w, b = fw[i]
            w_q, b_q, shift, out_exp = quantise_linear(w, b, exp, peaks[i + 1] if fused else peaks[i])
            weights[i] = (w_q, b_q)
            step = {"op": op, "layer": i, "shift": shift, "low": 0 if fused else -128, "exp": out_exp}
            if op == "conv2d":
                step.update(kernel=layer["kernel"], padding=layer["padding"])
            steps.append(step)
            exp = out_exp
        elif op == "relu":
            if not (steps and steps[-1]["op"] in ("conv2d", "linear") and steps[-1]["layer"] == i - 1):
                steps.append({"op": "relu", "layer": i})
        elif op in ("max_pool2d", "flatten"):
            steps.append({"op": op, "layer": i, **({"kernel": layer["kernel"]} if op == "max_pool2d" else {})})
    return Int8Model(tuple(config.input), in_exp, steps, weights)
