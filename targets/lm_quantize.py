"""int8 post-training quantisation of a causal LM's projections, calibrated on real text.

Power-of-two scales throughout, so the fabric requantises by shifts (Moreau et al., arXiv
1807.04188, section 5). Weights are symmetric int8 per output channel (exponent `w_exp[c]`).
Activations are int8 with a scale per token, chosen by the host when it quantises a
projection's input (runtime/lm_fabric.py): a transformer's activations vary by orders of
magnitude between tokens and layers, which one static exponent cannot follow. The stream
shifts output channel c by its own `shift[c]` (an ALU SHR by a vector), so a token whose input
exponent is e gets its output c at exponent e + w_exp[c] - shift[c]. Calibration on windows of
the recipe's calibration text (`data.calibration`, never the evaluation text) takes for each
channel the largest shift any token needs for its fp32 output to fit int8, so no calibration
token saturates; a shift past the SHR's range coarsens that channel's weights instead.
"""

from __future__ import annotations

import numpy as np

from accelc import progress
from accelc.errors import UsageError
from accelc.runtime.cnn_int8 import Int8Model, to_int8
from accelc.runtime.lm_fabric import projection_modules, token_exponents
from accelc.targets.vta_lower import SHIFT_MAX


def exponents(x: np.ndarray) -> np.ndarray:
    """Elementwise: the largest e with |x| * 2^e <= 127 (for nonzero x)."""
    return np.floor(np.log2(127.0 / np.maximum(np.abs(x), 1e-30))).astype(np.int64)


def needed_shifts(model, windows: list[np.ndarray], w_exps: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per projection and output channel: the largest shift e + w_exp[c] - out[t, c] over the
    calibration tokens t, where e is the token's input exponent and out[t, c] the exponent its
    fp32 output needs."""
    import torch

    needed: dict[str, np.ndarray] = {}

    def hook(name):
        def record(module, args, out):
            x = args[0].detach().reshape(-1, module.in_features).float().numpy()
            y = out.detach().reshape(-1, module.out_features).float().numpy()
            # a zero output fits at any exponent: it asks for no shift
            shift = np.where(y != 0, token_exponents(x)[:, None] - exponents(y) + w_exps[name], 0).max(axis=0)
            needed[name] = np.maximum(needed[name], shift) if name in needed else shift

        return record

    handles = [module.register_forward_hook(hook(name)) for name, module in projection_modules(model)]
    try:
        with torch.inference_mode():
            for ids in progress.bar(windows, desc="int8 calibration", unit="window"):
                model(torch.from_numpy(np.asarray(ids, dtype=np.int64))[None])
    finally:
        for h in handles:
            h.remove()
    return needed


def quantise(model, windows: list[np.ndarray]) -> Int8Model:
    """The int8 program of a causal LM's projections: one `linear` step per projection, with
    per-channel `w_exp` and `shift` lists."""
    modules = projection_modules(model)
    biased = [name for name, module in modules if module.bias is not None]
    if biased:
        raise UsageError(
            f"targets: fpga: projections with a bias ({biased[0]}, ...) are not lowered: the bias would be at "
            "each token's own exponent, which a stream's fixed int32 bias cannot follow"
        )
    weights_f = {name: module.weight.detach().float().numpy() for name, module in modules}
    w_exps = {name: token_exponents(w) for name, w in weights_f.items()}  # per output channel (row)
    needed = needed_shifts(model, windows, w_exps)
    steps, weights = [], {}
    for index, (name, _) in enumerate(modules):
        shift = needed[name]
        # past the SHR's range: coarser weights; below 0 (outputs larger than inputs): coarser weights, no shift
        w_exp = w_exps[name] - np.maximum(shift - SHIFT_MAX, 0) + np.minimum(shift, 0)
        shift = np.clip(shift, 0, SHIFT_MAX)
        w_q = to_int8(weights_f[name], w_exp[:, None])
        rounding = np.where(shift > 0, np.left_shift(1, np.maximum(shift - 1, 0)), 0).astype(np.int32)
        weights[index] = (w_q, rounding)
        steps.append(
            {"op": "linear", "layer": index, "name": name, "w_exp": w_exp.tolist(), "shift": shift.tolist(),
             "low": -128}
        )  # fmt: skip
    return Int8Model((modules[0][1].in_features,), 0, steps, weights)
