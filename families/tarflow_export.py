"""TarFlow blocks to ONNX: each block's two calls of the flow-block protocol (runtime/flow.py).

Per block, `block{i}.full.onnx` (x: N x T x D -> a, b: the cache-free call Jacobi makes) and
`block{i}.step.onnx` (x: N x k x D after past.{j}.key/value: N x H x P x hd per layer -> a, b of
the next k tokens and present.{j}.key/value: the cached call of sequential and GS-Jacobi
decoding), with N, k and P dynamic. `flow.json` beside them lists the blocks in density order,
their permutation and graphs, and the cache layout, which is all runtime/flow_ort.py reads.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from accelc.families.tarflow_model import TarFlow

OPSET = 17
LAYOUT_FILE = "flow.json"


class _Full(nn.Module):
    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, x):
        return self.block.params(x)


class _Step(nn.Module):
    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, x, *past):
        a, b, present = self.block.extend(x, list(past))
        return (a, b, *present)


def cache_names(layers: int, prefix: str) -> list[str]:
    return [f"{prefix}.{j}.{kind}" for j in range(layers) for kind in ("key", "value")]


def export_blocks(model: TarFlow, directory: Path) -> Path:
    """Write every block's two graphs and flow.json into `directory`; returns flow.json."""
    config = model.config
    directory.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    x = torch.randn(2, config.tokens, config.token_dim)
    past_names, present_names = cache_names(config.layers, "past"), cache_names(config.layers, "present")
    past = tuple(torch.randn(2, config.heads, 3, config.head_dim) for _ in past_names)
    cache_axes = {name: {0: "batch", 2: "past"} for name in past_names}
    cache_axes |= {name: {0: "batch", 2: "length"} for name in present_names}
    blocks = []
    for i, block in enumerate(model.blocks):
        full, step = f"block{i}.full.onnx", f"block{i}.step.onnx"
        with torch.no_grad():
            torch.onnx.export(
                _Full(block), (x,), str(directory / full), input_names=["x"], output_names=["a", "b"],
                dynamic_axes={n: {0: "batch"} for n in ("x", "a", "b")}, opset_version=OPSET, dynamo=False,
            )  # fmt: skip
            torch.onnx.export(
                _Step(block), (x[:, :4], *past), str(directory / step),
                input_names=["x", *past_names], output_names=["a", "b", *present_names],
                dynamic_axes={n: {0: "batch", 1: "tokens"} for n in ("x", "a", "b")} | cache_axes,
                opset_version=OPSET, dynamo=False,
            )  # fmt: skip
        blocks.append({"flip": block.flip, "full": full, "step": step})
    layout = {
        "tokens": config.tokens,
        "token_dim": config.token_dim,
        "heads": config.heads,
        "head_dim": config.head_dim,
        "layers": config.layers,
        "past": past_names,
        "present": present_names,
        "blocks": blocks,
    }
    path = directory / LAYOUT_FILE
    path.write_text(json.dumps(layout, indent=2) + "\n")
    return path
