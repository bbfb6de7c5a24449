"""The flow-block protocol (runtime/flow.py) on ONNX Runtime, over families/tarflow_export.py's graphs.

Each block is two sessions: the cache-free full call and the cached step. A state is the tuple
of the step's present tensors (numpy values ORT returned), so extending the same state twice,
GS-Jacobi's rollback, is free and never sees a later write.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from accelc.runtime.flow import FlowModel

LAYOUT_FILE = "flow.json"


class OrtFlowBlock:
    def __init__(self, directory: Path, entry: Mapping[str, Any], layout: Mapping[str, Any], options):
        import onnxruntime as ort

        providers = ["CPUExecutionProvider"]
        self.flip = bool(entry["flip"])
        self._full = ort.InferenceSession(str(directory / entry["full"]), options, providers=providers)
        self._step = ort.InferenceSession(str(directory / entry["step"]), options, providers=providers)
        self._past, self._present = layout["past"], layout["present"]
        self._cache_shape = (layout["heads"], layout["head_dim"])

    def params(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        a, b = self._full.run(["a", "b"], {"x": np.ascontiguousarray(x, dtype=np.float32)})
        return a, b

    def empty(self, batch: int) -> tuple[np.ndarray, ...]:
        heads, head_dim = self._cache_shape
        return tuple(np.zeros((batch, heads, 0, head_dim), np.float32) for _ in self._past)

    def extend(self, state, x: np.ndarray):
        feed = {"x": np.ascontiguousarray(x, dtype=np.float32), **dict(zip(self._past, state))}
        a, b, *present = self._step.run(["a", "b", *self._present], feed)
        return tuple(present), a, b


def ort_flow_model(directory: Path, session: Mapping[str, Any], name: str = "ort") -> FlowModel:
    """The blocks that `directory/flow.json` lists, each on ORT sessions with `session`'s options
    (runtime/ort_backend.session_options: threads, no spinning)."""
    from accelc.runtime.ort_backend import session_options

    layout = json.loads((directory / LAYOUT_FILE).read_text())
    options = session_options(session)
    blocks = tuple(OrtFlowBlock(directory, entry, layout, options) for entry in layout["blocks"])
    return FlowModel(blocks, int(layout["tokens"]), int(layout["token_dim"]), name)
