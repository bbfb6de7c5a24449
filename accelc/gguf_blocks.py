"""A GGUF file's block-quantised rows (Q4_0, Q4_1, Q8_0), found by the weights they dequantise to.

Q4_1 stores each block of 32 consecutive input weights of a row as a scale d and a minimum m
(fp16) and 32 codes q in 0..15: w = d*q + m. Q4_0 has no minimum: w = d*(q - 8), the same form
with m = -8d (in float32 d*q and -8d are exact: d has an 11-bit significand, q four bits).
Q8_0 is the 8-bit symmetric form: w = d*q with q in -128..127, kept here as u = q + 128 in
0..255, w = d*(u - 128) (MatMulNBits' default zero point for 8 bits).

The torch model of record holds these weights dequantised by gguf's own dequantiser (the one
transformers calls), then rearranged: llama's q/k rows un-permuted for rotary, q|k|v or
gate|up concatenated by an exporter, transposed into MatMul initializers. Rather than re-derive
each layout, every 4-bit row of the file is indexed by a digest of its dequantised bytes, and a
MatMul weight whose every output column is such a row gets those rows' blocks: blocks run along
the input dimension, so any rearrangement of rows moves whole blocks. Each match is checked
value for value, so the blocks found reproduce the weight bit for bit.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from accelc.errors import UsageError, require

BLOCK = 32  # weights per Q4_0/Q4_1/Q8_0 block
BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}  # fp16 scale [+ fp16 minimum] + the codes
FOUR_BIT = ("Q4_0", "Q4_1")


@dataclass(frozen=True)
class Blocks:
    """Rows of blocks: row r, block b holds weights scale[r, b] * codes[r, b] + minimum[r, b]."""

    scale: np.ndarray  # [rows, blocks] float32
    minimum: np.ndarray  # [rows, blocks] float32 (-2^(bits-1) * scale for symmetric rows)
    codes: np.ndarray  # [rows, blocks, 32] uint8 in 0..2^bits - 1
    symmetric: bool  # every row is Q4_0 or Q8_0: the minimum is -2^(bits-1) * scale throughout
    bits: int = 4

    def dequantise(self) -> np.ndarray:
        """[rows, blocks * 32] float32, computed as gguf's dequantiser does (Q4_0's d*(q - 8) is
        -0.0 where d < 0 and q = 8, which d*q - 8d is not: the same value, other bits)."""
        codes = self.codes.astype(np.float32)
        if self.symmetric:
            w = self.scale[..., None] * (codes - np.float32(2 ** (self.bits - 1)))
        else:
            w = self.scale[..., None] * codes + self.minimum[..., None]
        return w.reshape(self.codes.shape[0], -1)


def _decode(raw: np.ndarray, kind: str) -> Blocks:
    """Blocks of raw GGUF rows [rows, bytes] of one block type."""
    rows = raw.shape[0]
    size = BLOCK_BYTES[kind]
    raw = np.asarray(raw).reshape(rows, -1, size)
    scale = raw[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    if kind == "Q8_0":
        codes = (raw[..., 2:].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
        return Blocks(scale, np.float32(-128) * scale, codes, symmetric=True, bits=8)
    packed = raw[..., size - 16 :]
    # the first 16 weights of a block are the low nibbles, the last 16 the high ones
    codes = np.concatenate([packed & 0x0F, packed >> 4], axis=-1).astype(np.uint8)
    if kind == "Q4_1":
        minimum = raw[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
    else:
        minimum = np.float32(-8) * scale
    return Blocks(scale, minimum, codes, symmetric=kind == "Q4_0")


def _digest(row: np.ndarray) -> bytes:
    return hashlib.blake2b(np.ascontiguousarray(row, dtype=np.float32).tobytes(), digest_size=16).digest()


class GGUFBlocks:
    """Every Q4_0/Q4_1/Q8_0 row of a GGUF file, indexed by its dequantised values."""

    def __init__(self, path: Path):
        gguf = require("gguf", "pip install gguf")
        from gguf.quants import dequantize

        self.path = Path(path)
        try:
            reader = gguf.GGUFReader(self.path)
        except Exception as exc:  # any parse failure means "not a GGUF file"
            raise UsageError(f"{self.path} is not a valid GGUF file ({exc})") from exc
        self.types: dict[str, str] = {}  # tensor name -> GGML type name, every tensor
        self._raw: dict[str, tuple[np.ndarray, str]] = {}  # block-quantised tensors: raw rows and type
        self._rows: dict[bytes, tuple[str, int]] = {}  # digest of a dequantised row -> (tensor, row)
        for tensor in reader.tensors:
            kind = tensor.tensor_type.name
            self.types[tensor.name] = kind
            if kind not in BLOCK_BYTES or tensor.data.ndim != 2:
                continue
            self._raw[tensor.name] = (tensor.data, kind)
            values = dequantize(tensor.data, tensor.tensor_type)
            for r in range(values.shape[0]):
                self._rows.setdefault(_digest(values[r]), (tensor.name, r))
        if not self.four_bit_tensors:
            kinds = sorted(set(self.types.values()))
            raise UsageError(
                f"{self.path}: no Q4_0 or Q4_1 tensors to carry over (its tensor types: {', '.join(kinds)}); "
                "only those 4-bit block formats map onto MatMulNBits exactly"
            )

    @property
    def four_bit_tensors(self) -> list[str]:
        return sorted(name for name, (_, kind) in self._raw.items() if kind in FOUR_BIT)

    def find(self, rows: np.ndarray) -> Blocks | None:
        """The blocks of `rows` ([n, k] float32, one weight row per output), or None unless every
        row is a block-quantised row of this file with exactly these values, all of one bit width."""
        rows = np.ascontiguousarray(rows, dtype=np.float32)
        if rows.ndim != 2 or rows.shape[1] % BLOCK:
            return None
        where = [self._rows.get(_digest(row)) for row in rows]
        if any(w is None for w in where):
            return None
        scale = np.empty((len(rows), rows.shape[1] // BLOCK), np.float32)
        minimum, codes, symmetric = np.empty_like(scale), np.empty((*scale.shape, BLOCK), np.uint8), True
        names = np.array([name for name, _ in where])
        indices = np.array([r for _, r in where])
        widths = {8 if self._raw[name][1] == "Q8_0" else 4 for name in np.unique(names)}
        if len(widths) > 1:
            return None  # one MatMulNBits has one bit width
        for name in np.unique(names):
            raw, kind = self._raw[name]
            if raw.shape[1] // BLOCK_BYTES[kind] * BLOCK != rows.shape[1]:
                return None  # a digest collision with a row of another width
            mine = names == name
            part = _decode(raw[indices[mine]], kind)
            scale[mine], minimum[mine], codes[mine] = part.scale, part.minimum, part.codes
            symmetric &= part.symmetric
        found = Blocks(scale, minimum, codes, symmetric, bits=widths.pop())
        if not np.array_equal(found.dequantise().view(np.uint32), rows.view(np.uint32)):
            return None  # a digest collision
        return found
