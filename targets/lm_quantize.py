"""int8 post-training quantisation of a causal LM's projections, calibrated on real text.

As for a CNN (targets/cnn_quantize.py) and VTA's own flow (Moreau et al., arXiv 1807.04188,
section 5): symmetric per-tensor int8 with power-of-two scales, so the fabric requantises by a
shift. Each projection's input and output exponents come from the fp32 model's activation maxima
on windows of the recipe's calibration text (`data.calibration`, never the evaluation text), its
weight exponent from the weights; a bias (Qwen2's q/k/v) is folded into the int32 bias with the
rounding constant.
"""

from __future__ import annotations

import numpy as np

from accelc import progress
from accelc.runtime.cnn_int8 import Int8Model
from accelc.runtime.lm_fabric import projection_modules
from accelc.targets.cnn_quantize import exponent, quantise_linear


def activation_peaks(model, windows: list[np.ndarray]) -> dict[str, tuple[float, float]]:
    """Per projection: max |input| and max |output| of the fp32 model over the windows."""
    import torch

    peaks: dict[str, list[float]] = {}

    def hook(name):
        def record(module, args, out):
            seen = peaks.setdefault(name, [0.0, 0.0])
            seen[0] = max(seen[0], float(args[0].abs().max()))
            seen[1] = max(seen[1], float(out.abs().max()))

        return record

    handles = [module.register_forward_hook(hook(name)) for name, module in projection_modules(model)]
    try:
        with torch.inference_mode():
            for ids in progress.bar(windows, desc="int8 calibration", unit="window"):
                model(torch.from_numpy(np.asarray(ids, dtype=np.int64))[None])
    finally:
        for h in handles:
            h.remove()
    return {name: (a, b) for name, (a, b) in peaks.items()}


def quantise(model, windows: list[np.ndarray]) -> Int8Model:
    """The int8 program of a causal LM's projections: one `linear` step per projection."""
    peaks = activation_peaks(model, windows)
    steps, weights = [], {}
    for index, (name, module) in enumerate(projection_modules(model)):
        in_peak, out_peak = peaks[name]
        in_exp = exponent(in_peak)
        w = module.weight.detach().float().numpy()
        b = None if module.bias is None else module.bias.detach().float().numpy()
        w_q, b_q, shift, out_exp = quantise_linear(w, b, in_exp, out_peak)
        weights[index] = (w_q, b_q)
        steps.append(
            {
                "op": "linear",
                "layer": index,
                "name": name,
                "in_exp": in_exp,
                "shift": shift,
                "low": -128,
                "exp": out_exp,
            }
        )
    hidden = projection_modules(model)[0][1].in_features
    return Int8Model((hidden,), steps[0]["in_exp"], steps, weights)
