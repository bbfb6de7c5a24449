"""A causal LM whose q/k/v/o and MLP projections run as int8 layers of the VTA fabric.

The `fpga` target (targets/fpga_lm.py) writes an LM's int8 program as the CNN's is written
(runtime/cnn_int8.py), but its steps are the projections only: each a `linear` step with the
module it replaces (`name`) and, per output channel, its weight exponent (`w_exp`) and shift.
Everything between them (embeddings, RMS norms, rotary embeddings, attention scores and softmax,
SiLU gating, residual adds, the head) stays in fp32 on the host. The host quantises a
projection's input to int8 with a power-of-two scale per token (the largest `e` with
max |x| * 2^e <= 127), has the fabric (or its int32 reference) compute the int8 output, whose
channel c is then at exponent e + w_exp[c] - shift[c], and dequantises it
(targets/lm_quantize.py). `Offload` installs that on a transformers model in place, so the
model's own forward, KV cache and generation loop run unchanged around the offloaded projections.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from accelc.errors import UsageError
from accelc.runtime.cnn_int8 import Int8Model, run_step, to_int8

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

Runner = Callable[[dict, np.ndarray], np.ndarray]  # (step, int8 N x in) -> int8 N x out


def projection_modules(model) -> list[tuple[str, object]]:
    """The model's q/k/v/o and MLP projections (torch Linear modules), in forward order."""
    import torch

    found = [
        (name, module)
        for name, module in model.named_modules()
        if name.rsplit(".", 1)[-1] in PROJECTIONS and isinstance(module, torch.nn.Linear)
    ]
    if not found:
        raise UsageError(
            f"targets: fpga: {type(model).__name__} has no Linear modules named {', '.join(PROJECTIONS)} "
            "(the fabric takes Llama-style attention and MLP projections)"
        )
    return found


def token_exponents(x: np.ndarray) -> np.ndarray:
    """Per row of `x`, the largest e with max |row| * 2^e <= 127 (0 for a zero row)."""
    peak = np.abs(x).max(axis=-1)
    safe = np.where(peak > 0, peak, 127.0)
    return np.where(peak > 0, np.floor(np.log2(127.0 / safe)), 0).astype(np.int64)


def reference(model: Int8Model) -> Runner:
    """The int32 numpy reference of every projection (what the simulator is proved equal to)."""
    return lambda step, x_q: run_step(step, model.weights, x_q)


class Offload:
    """`with Offload(torch_model, int8, run):` the model's projections compute through `run` on
    int8 activations; on exit they are its own fp32 Linear layers again."""

    def __init__(self, torch_model, int8: Int8Model, run: Runner):
        modules = dict(projection_modules(torch_model))
        missing = [s["name"] for s in int8.steps if s["name"] not in modules]
        if missing:
            raise UsageError(f"the int8 program names projections the model lacks: {missing[:3]}")
        self.patched = [(modules[s["name"]], s) for s in int8.steps]
        # output channel c of a token at input exponent e is at e + w_exp[c] - shift[c]
        self.out_shift = {m: np.asarray(s["shift"]) - np.asarray(s["w_exp"]) for m, s in self.patched}
        self.run = run

    def _forward(self, module, step):
        import torch

        def forward(x):
            flat = x.detach().reshape(-1, module.in_features).float().numpy()
            e = token_exponents(flat)[:, None]
            y_q = self.run(step, to_int8(flat, e))
            y = torch.from_numpy((y_q * 2.0 ** (self.out_shift[module] - e)).astype(np.float32))
            return y.reshape(*x.shape[:-1], module.out_features).to(x.dtype)

        return forward

    def __enter__(self):
        for module, step in self.patched:
            module.forward = self._forward(module, step)
        return self

    def __exit__(self, *exc):
        for module, _ in self.patched:
            del module.forward  # the class's own forward again
