"""Run an int8 CNN with its fabric layers through the VTA simulator and the rest on the host.

Reads what the `fpga` target wrote (targets/fpga.py): `vta_config.json`, the int8 model
(runtime/cnn_int8.py), `placement.json` (each step on the fabric or the host, and why) and for
every fabric layer its binary stream and DRAM images (`layers/L<i>.insn.bin`, `.uop.bin`,
`.wgt.bin`, `.acc.bin`). The host packs each fabric layer's int8 input into VTA's blocked layout
(16 channels per element, zero-padded), the simulator executes the stream from its bits, and the
host unpacks the output image; so the result is what a board would return for the same files.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from accelc.runtime import vta_isa, vta_sim
from accelc.runtime.cnn_int8 import Int8Model, run_step
from accelc.runtime.vta_config import VTAConfig

PLACEMENT = "placement.json"
CONFIG = "vta_config.json"
INT8_DIR = "int8"
LAYER_DIR = "layers"
SUFFIXES = ("insn", "uop", "wgt", "acc")


def layer_files(step: dict) -> dict[str, str]:
    """Artifact-relative names of a fabric step's stream and DRAM images."""
    return {s: f"{LAYER_DIR}/L{step['layer']}.{s}.bin" for s in SUFFIXES}


def pack(x: np.ndarray, block: int) -> np.ndarray:
    """int8 N x C x H x W (or N x C) -> the DRAM input image N x (C/16 * H * W) x 1 x 16."""
    if x.ndim == 2:
        x = x[:, :, None, None]
    n, c, h, w = x.shape
    cb = -(-c // block)
    padded = np.zeros((n, cb * block, h, w), dtype=np.int8)
    padded[:, :c] = x
    return np.ascontiguousarray(padded.reshape(n, cb, block, h, w).transpose(0, 1, 3, 4, 2)).reshape(n, -1, 1, block)


def unpack(image: np.ndarray, channels: int, height: int, width: int, flat: bool) -> np.ndarray:
    n, block = image.shape[0], image.shape[-1]
    cb = -(-channels // block)
    x = image.reshape(n, cb, height, width, block).transpose(0, 1, 4, 2, 3).reshape(n, cb * block, height, width)
    x = x[:, :channels]
    return x.reshape(n, channels) if flat else x


class FabricModel:
    """The artifact's int8 program with its fabric steps simulated."""

    def __init__(self, directory: Path):
        self.dir = Path(directory)
        self.config = VTAConfig.read(self.dir / CONFIG)
        self.model = Int8Model.load(self.dir / INT8_DIR)
        self.placement = json.loads((self.dir / PLACEMENT).read_text())
        self._streams: dict[int, tuple] = {}

    def _stream(self, entry: dict):
        layer = entry["layer"]
        if layer not in self._streams:
            files = {k: (self.dir / v).read_bytes() for k, v in layer_files(entry).items()}
            block = self.config.block
            self._streams[layer] = (
                files["insn"],
                vta_isa.decode_uops(files["uop"], self.config),
                np.frombuffer(files["wgt"], dtype=np.int8).reshape(-1, block, block),
                np.frombuffer(files["acc"], dtype="<i4").astype(np.int32).reshape(-1, self.config.batch, block),
            )
        return self._streams[layer]

    def run_fabric(self, entry: dict, x: np.ndarray) -> tuple[np.ndarray, vta_sim.Stats]:
        insns, uops, wgt, acc = self._stream(entry)
        out_c, out_h, out_w = entry["out_shape"] if len(entry["out_shape"]) == 3 else (entry["out_shape"][0], 1, 1)
        block = self.config.block
        dram = vta_sim.Dram(
            uop=uops,
            inp=pack(x, block),
            wgt=wgt,
            acc=acc,
            out=np.zeros((len(x), -(-out_c // block) * out_h * out_w, self.config.batch, block), dtype=np.int8),
        )
        stats = vta_sim.simulate(self.config, insns, dram)
        return unpack(dram.out, out_c, out_h, out_w, flat=len(entry["out_shape"]) == 1), stats

    def forward(self, x_q: np.ndarray, trace: dict | None = None) -> tuple[np.ndarray, dict[int, dict]]:
        """int8 logits of int8 inputs, and per fabric layer the simulator's statistics (per image).
        `trace`, when given, receives the int8 output of each step the host or a stream completes,
        by layer index (a conv2d with fused pooling completes the pooling step, not its own)."""
        stats: dict[int, dict] = {}
        for step, entry in zip(self.model.steps, self.placement["steps"]):
            if "fused_into" in entry:  # done by the stream of the layer it is fused into
                continue
            if entry["where"] == "fabric":
                x_q, s = self.run_fabric(entry, x_q)
                stats[step["layer"]] = s.to_json()
            else:
                x_q = run_step(step, self.model.weights, x_q)
            if trace is not None:  # a stream with fused pooling completes the pooling step
                trace[entry.get("pool_layer", step["layer"])] = x_q
        return x_q, stats
