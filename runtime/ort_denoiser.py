"""The denoiser protocol (runtime/denoiser.py) on ONNX Runtime, over the graph export_denoiser writes."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from accelc.runtime.denoiser import KV


class OrtDenoiser:
    name = "ort"

    def __init__(self, graph: Path, session: Mapping[str, Any], *, mask_id: int, shift: int, eos_id: int | None):
        import onnxruntime as ort

        from accelc.runtime.ort_backend import session_options

        self.session = ort.InferenceSession(str(graph), session_options(session), providers=["CPUExecutionProvider"])
        self.mask_id, self.shift, self.eos_id = mask_id, shift, eos_id
        inputs = {i.name: i for i in self.session.get_inputs()}
        self.layers = sum(1 for name in inputs if name.startswith("past_key."))
        key = inputs["past_key.0"].shape
        self._empty = np.zeros((1, key[1], 0, key[3]), dtype=np.float32)
        self.vocab_size = self.session.get_outputs()[0].shape[-1]

    def __call__(self, ids: np.ndarray, start: int = 0, context: KV | None = None) -> tuple[np.ndarray, KV]:
        ids = np.asarray(ids, dtype=np.int64).reshape(1, -1)
        feed = {"input_ids": ids, "position_ids": np.arange(start, start + ids.shape[1], dtype=np.int64)[None]}
        for i in range(self.layers):
            k, v = context[i] if context is not None else (self._empty, self._empty)
            feed[f"past_key.{i}"], feed[f"past_value.{i}"] = k, v
        out = self.session.run(None, feed)
        return out[0][0], [(out[1 + 2 * i], out[2 + 2 * i]) for i in range(self.layers)]
