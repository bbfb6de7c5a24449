"""Several sequences in one call of a fused decoder graph: the model continuous batching runs.

The fused graph (compiler/fused_decoder.py) already has a batch dimension, and its
GroupQueryAttention reads each sequence's length from that sequence's attention-mask row
(seqlens_k = sum(mask) - 1): it attends over that row's own positions and appends the new key and
value at that row's own end. So sequences of different lengths decode one token each in a single
call, with no padding of the cache and no change to the graph: the mask row of a sequence of
length L holds L + 1 ones, the rest zeros (`total_sequence_length` is the longest row).

The cache is one arena of `slots` rows, bound as both past and present (the graph declares
`accelc.kv_cache: in_place`, as for the batch-1 backend in ort_backend.py). A new sequence is
prefilled alone, at batch 1, into a free row, exactly as `OrtStepModel.prefill` runs it; then it
decodes with the others. The active sequences always fill rows 0..n-1, so a call binds a
contiguous leading slice of the arena: when one finishes, the last row's cache moves into its row
(a `Row` handle follows its sequence, so callers never see the move).
Each row's arithmetic is its own (MLAS computes a GEMM row by row in the same order at any M), so a
sequence decodes the same tokens in any batch as alone (tests/test_serve_batching.py checks it).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from accelc.errors import require
from accelc.runtime.ort_backend import IN_PLACE_KV, ORT, session_options

CAPACITY_START = 256  # positions per row; the arena doubles when an admitted sequence needs more


@dataclass(eq=False)
class Row:
    """One sequence in the batch: the arena row holding its cache and how many positions it holds."""

    index: int
    length: int = 0


class BatchedOrtModel:
    """A fused decoder graph decoding up to `slots` sequences per call."""

    def __init__(self, session, slots: int):
        self.session = session
        inputs = {i.name: i for i in self.session.get_inputs()}
        self.layers = sum(1 for n in inputs if n.startswith("past_key_values.") and n.endswith(".key"))
        shape = inputs["past_key_values.0.key"].shape  # [batch, kv_heads, positions, head_dim]
        self.kv_heads, self.head_dim = int(shape[1]), int(shape[3])
        self.slots = slots
        self._past = [f"past_key_values.{i}.{kind}" for i in range(self.layers) for kind in ("key", "value")]
        self._present = [f"present.{i}.{kind}" for i in range(self.layers) for kind in ("key", "value")]
        self.rows: list[Row] = []  # active sequences; rows[i].index == i
        self._allocate(CAPACITY_START)

    @classmethod
    def open(cls, graph: Path, options: Mapping[str, Any] | None, slots: int) -> BatchedOrtModel | None:
        """The graph's batched model, or None where it does not keep one cache row per sequence
        (a traced graph: no `accelc.kv_cache: in_place` in its metadata)."""
        ort = require(ORT.module, ORT.install)
        session = ort.InferenceSession(
            str(graph), sess_options=session_options(options or {}), providers=["CPUExecutionProvider"]
        )
        key, value = IN_PLACE_KV
        if session.get_modelmeta().custom_metadata_map.get(key) != value:
            return None
        return cls(session, slots)

    def _allocate(self, capacity: int) -> None:
        """(Re)allocate the arena with `capacity` positions per row, keeping every active row's cache."""
        shape = (self.slots, self.kv_heads, capacity, self.head_dim)
        buffers = [np.zeros(shape, dtype=np.float32) for _ in self._past]
        for row in self.rows:
            for dst, src in zip(buffers, self.buffers):
                dst[row.index, :, : row.length] = src[row.index, :, : row.length]
        self.buffers, self.capacity = buffers, capacity
        self._bindings: dict[tuple[int, int], Any] = {}  # (first row, row count) -> IO binding

    def _binding(self, first: int, count: int):
        """An IO binding of arena rows [first, first + count) as past and present (shared memory)."""
        binding = self._bindings.get((first, count))
        if binding is None:
            import onnxruntime as ort

            binding = self.session.io_binding()
            binding.bind_output("logits")  # first: get_outputs() lists outputs in binding order
            views = [buffer[first : first + count] for buffer in self.buffers]  # leading-axis slices: contiguous
            for past, present, view in zip(self._past, self._present, views):
                value = ort.OrtValue.ortvalue_from_numpy(view)
                binding.bind_ortvalue_input(past, value)
                binding.bind_ortvalue_output(present, value)
            self._bindings[(first, count)] = binding
        return binding

    def _run(self, first: int, rows: Sequence[Row], ids: np.ndarray) -> np.ndarray:
        """Feed ids [len(rows), k] after each row's cache; logits [len(rows), k, vocab]."""
        k = ids.shape[1]
        mask = np.zeros((len(rows), max(r.length for r in rows) + k), dtype=np.int64)
        for i, row in enumerate(rows):
            mask[i, : row.length + k] = 1
        binding = self._binding(first, len(rows))
        binding.bind_cpu_input("input_ids", ids)
        binding.bind_cpu_input("attention_mask", mask)
        binding.bind_output("logits")  # unallocated: its shape changes with the batch and k
        self.session.run_with_iobinding(binding)
        for row in rows:
            row.length += k
        return binding.get_outputs()[0].numpy()

    @property
    def free(self) -> int:
        return self.slots - len(self.rows)

    def admit(self, ids: Sequence[int], positions: int) -> tuple[Row, np.ndarray]:
        """Prefill a new sequence alone in the next free row, with room for `positions` in all;
        return its row and the logits of its last token."""
        if not self.free:
            raise ValueError(f"all {self.slots} rows are decoding; release one first")
        if len(ids) < 1 or positions < len(ids):
            raise ValueError(f"a sequence of {len(ids)} prompt tokens cannot fit in {positions} positions")
        if positions > self.capacity:
            self._allocate(max(positions, 2 * self.capacity))
        row = Row(len(self.rows))
        logits = self._run(row.index, [row], np.asarray(ids, dtype=np.int64).reshape(1, -1))
        self.rows.append(row)
        return row, logits[0, -1]

    def decode(self, rows: Sequence[Row], tokens: Sequence[int]) -> np.ndarray:
        """The next token of every active row (tokens[i] for rows[i], in any order); logits
        [len(rows), vocab] in that order."""
        if len(rows) != len(self.rows) or {id(r) for r in rows} != {id(r) for r in self.rows}:
            raise ValueError(f"decode needs one token for each of the {len(self.rows)} active rows")
        ids = np.empty((len(rows), 1), dtype=np.int64)
        for row, token in zip(rows, tokens):
            ids[row.index, 0] = token
        logits = self._run(0, self.rows, ids)[:, -1]
        return logits[[row.index for row in rows]]

    def release(self, row: Row) -> None:
        """Free a finished sequence's row: the last active row's cache moves into it."""
        if row.index >= len(self.rows) or self.rows[row.index] is not row:
            raise ValueError("this row is not active in this model")
        last = self.rows.pop()
        if last is not row:
            for buffer in self.buffers:
                buffer[row.index, :, : last.length] = buffer[last.index, :, : last.length]
            last.index = row.index
            self.rows[row.index] = last
