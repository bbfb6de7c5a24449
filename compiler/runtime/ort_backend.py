"""The ONNX Runtime backend: runs the exported decoder-with-past graph behind StepModel.

The graph takes input_ids [1, k], (for most families) attention_mask [1, P+k] and position_ids
[1, k], and past_key_values.{i}.key/value [1, kv_heads, P, head_dim]; it returns logits [1, k, V]
and present.{i}.key/value [1, kv_heads, P+k, head_dim]. Session options come from the artifact's
runtime config, so what was validated is what runs.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np

from accelc.errors import require
from accelc.runtime.base import KVState, KVStepModel

OPT_LEVELS = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC",
              "extended": "ORT_ENABLE_EXTENDED", "all": "ORT_ENABLE_ALL"}


def session_options(cfg: Mapping[str, Any]):
    ort = require("onnxruntime", "pip install onnxruntime")
    so = ort.SessionOptions()
    so.intra_op_num_threads = int(cfg.get("intra_op_threads", 0))
    so.inter_op_num_threads = int(cfg.get("inter_op_threads", 0))
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, OPT_LEVELS[cfg.get("graph_optimization_level", "all")])
    # Spinning threads burn the core a busy neighbour needs; on small shared CPUs it makes
    # latency up to 50x worse, so it is off unless the artifact says otherwise.
    spin = "1" if cfg.get("allow_spinning", False) else "0"
    so.add_session_config_entry("session.intra_op.allow_spinning", spin)
    so.add_session_config_entry("session.inter_op.allow_spinning", spin)
    so.log_severity_level = 3
    return so


class OrtStepModel(KVStepModel):
    name = "ort"

    def __init__(self, graph: Path, options: Mapping[str, Any] | None = None):
        ort = require("onnxruntime", "pip install onnxruntime")
        self.session = ort.InferenceSession(str(graph), sess_options=session_options(options or {}),
                                            providers=["CPUExecutionProvider"])
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.n_layers = sum(1 for n in self.inputs if n.startswith("past_key_values.") and n.endswith(".key"))
        shape = self.inputs["past_key_values.0.key"].shape  # [batch, kv_heads, past, head_dim]
        self.kv_heads, self.head_dim = int(shape[1]), int(shape[3])
        self.vocab_size = int(self.session.get_outputs()[0].shape[-1]) if isinstance(
            self.session.get_outputs()[0].shape[-1], int) else None
        self._past_names = [f"past_key_values.{i}.{kind}" for i in range(self.n_layers) for kind in ("key", "value")]
        self._present_names = [f"present.{i}.{kind}" for i in range(self.n_layers) for kind in ("key", "value")]

    def empty_state(self) -> KVState:
        empty = np.zeros((1, self.kv_heads, 0, self.head_dim), dtype=np.float32)
        return KVState(0, tuple(empty for _ in self._past_names))

    def extend(self, state: KVState, ids: np.ndarray):
        ids = np.asarray(ids, dtype=np.int64).reshape(1, -1)
        k = ids.shape[1]
        if k == 0:
            raise ValueError("extend needs at least one token")
        feed = {"input_ids": ids}
        if "attention_mask" in self.inputs:
            feed["attention_mask"] = np.ones((1, state.length + k), dtype=np.int64)
        if "position_ids" in self.inputs:
            feed["position_ids"] = np.arange(state.length, state.length + k, dtype=np.int64).reshape(1, k)
        feed.update(zip(self._past_names, state.tensors))
        out = self.session.run(["logits", *self._present_names], feed)
        logits = out[0][0]
        if self.vocab_size is None:
            self.vocab_size = logits.shape[-1]
        return logits, KVState(state.length + k, tuple(out[1:]))

    def kv_numpy(self, state: KVState) -> list[np.ndarray]:
        return list(state.tensors)
