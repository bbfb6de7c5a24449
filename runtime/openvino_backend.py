"""The OpenVINO backend: the design card's "CPU (oneDNN threads)", on the artifact's ONNX graphs.

OpenVINO's CPU plugin (built on oneDNN) reads the exported decoder-with-past graph directly,
fused GroupQueryAttention included, so it shares the graph ORT runs: no second export, and no
compiled blob in the artifact (`export_model` output is specific to the host that made it).
The graph is the same contract as ORT's (runtime/ort_backend.py): input_ids, attention_mask,
optional position_ids and past_key_values.{i}.key/value in, logits and present.* out.

The model is compiled stateless, and the KV tensors go back in as numpy arrays each step, so a
state is a value (KVStepModel's slicing truncation) with no bookkeeping: OpenVINO's stateful
transformation, which would keep the cache inside the plugin, fails on the graph's default
state initialiser.

Properties come from the artifact's runtime config (targets/cpu.py) and are OpenVINO's own
names (INFERENCE_NUM_THREADS, NUM_STREAMS, PERFORMANCE_HINT, ENABLE_CPU_PINNING,
INFERENCE_PRECISION_HINT, ...). The precision is pinned: on a CPU with bf16 instructions the
plugin otherwise computes in bf16, and logits move by ~7e-3 instead of ~4e-7.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from accelc.errors import UsageError, require
from accelc.runtime.backends import Dependency, GraphBackend, register_backend
from accelc.runtime.base import KVState, KVStepModel, kv_length

OPENVINO = Dependency("openvino", "pip install openvino==2026.4.1", "OpenVINO")
DEVICE = "CPU"
THREADS = "INFERENCE_NUM_THREADS"


def core():
    """One OpenVINO Core per process: it owns the plugin and its thread pools."""
    global _CORE
    if _CORE is None:
        ov = require(OPENVINO.module, OPENVINO.install)
        _CORE = ov.Core()
    return _CORE


_CORE = None


def check_properties(properties: Mapping[str, Any], where: str) -> None:
    """UsageError naming the keys the CPU plugin does not know or whose values it refuses: a typo
    would otherwise be a RuntimeError deep inside compile_model."""
    supported = set(core().get_property(DEVICE, "SUPPORTED_PROPERTIES"))
    unknown = sorted(set(properties) - supported)
    if unknown:
        raise UsageError(
            f"{where}: unknown OpenVINO CPU propert{'y' if len(unknown) == 1 else 'ies'} {', '.join(unknown)}; "
            "fix the name (see `openvino.properties`: e.g. INFERENCE_NUM_THREADS, NUM_STREAMS, "
            "PERFORMANCE_HINT, ENABLE_CPU_PINNING, INFERENCE_PRECISION_HINT, EXECUTION_MODE_HINT, KV_CACHE_PRECISION)"
        )
    scratch = require(OPENVINO.module, OPENVINO.install).Core()  # not core(): set_property changes its defaults
    for key, value in properties.items():
        try:
            scratch.set_property(DEVICE, {key: value})
        except RuntimeError as exc:
            reason = str(exc).strip().splitlines()[-1][:160] if str(exc).strip() else "refused"
            raise UsageError(f"{where}: OpenVINO refuses {key}={value!r} ({reason}); use a value it accepts") from exc


def compile_graph(graph: Path, properties: Mapping[str, Any], model=None):
    """`graph` compiled for the CPU with `properties`; a refused property is a UsageError by name."""
    try:
        return core().compile_model(model if model is not None else str(graph), DEVICE, dict(properties))
    except RuntimeError as exc:
        where = f"the openvino properties for {graph.name}"
        check_properties(properties, where)
        reason = str(exc).strip().splitlines()[-1][:160] if str(exc).strip() else "refused"
        raise UsageError(f"{where}: OpenVINO refuses {dict(properties)} ({reason}); fix the values") from exc


class OpenVinoStepModel(KVStepModel):
    name = "openvino"

    def __init__(
        self,
        graph: Path,
        properties: Mapping[str, Any] | None = None,
        alone_properties: Mapping[str, Any] | None = None,
    ):
        """`alone_properties`: a second compilation of the same graph (the artifact's threads) for
        the calls made inside `alone()`, as ORT's alone session (PEARL's prefill, copied rounds)."""
        model = core().read_model(str(graph))
        self.compiled = compile_graph(graph, properties or {}, model)
        self.alone_compiled = compile_graph(graph, alone_properties, model) if alone_properties is not None else None
        self._alone = False
        self._requests = threading.local()  # one infer request per thread and compilation
        self.inputs = {port.get_any_name() for port in self.compiled.inputs}
        self.n_layers = sum(1 for n in self.inputs if n.startswith("past_key_values.") and n.endswith(".key"))
        past = self.compiled.input("past_key_values.0.key").get_partial_shape()  # [1, kv_heads, P, head_dim]
        self.kv_heads, self.head_dim = past[1].get_length(), past[3].get_length()
        vocab = self.compiled.output("logits").get_partial_shape()[-1]
        self.vocab_size = vocab.get_length() if vocab.is_static else None
        self._past_names = [f"past_key_values.{i}.{kind}" for i in range(self.n_layers) for kind in ("key", "value")]
        self._present_names = [f"present.{i}.{kind}" for i in range(self.n_layers) for kind in ("key", "value")]

    @contextlib.contextmanager
    def alone(self):
        if self.alone_compiled is None:
            yield
            return
        self._alone = True
        try:
            yield
        finally:
            self._alone = False

    def _request(self):
        compiled = self.alone_compiled if self._alone else self.compiled
        requests = self._requests.__dict__.setdefault("by_model", {})
        if id(compiled) not in requests:
            requests[id(compiled)] = compiled.create_infer_request()
        return requests[id(compiled)]

    def empty_state(self) -> KVState:
        empty = np.zeros((1, self.kv_heads, 0, self.head_dim), dtype=np.float32)
        return KVState(0, tuple(empty for _ in self._past_names))

    def extend(self, state: KVState, ids: np.ndarray):
        ids = np.asarray(ids, dtype=np.int64).reshape(1, -1)
        k = ids.shape[1]
        if k == 0:
            raise ValueError("extend needs at least one token")
        n = state.length
        feed: dict[str, np.ndarray] = {"input_ids": ids}
        if "attention_mask" in self.inputs:
            feed["attention_mask"] = np.ones((1, n + k), dtype=np.int64)
        if "position_ids" in self.inputs:
            feed["position_ids"] = np.arange(n, n + k, dtype=np.int64).reshape(1, k)
        # truncated states are strided views; the plugin wants dense tensors
        feed.update((name, np.ascontiguousarray(t)) for name, t in zip(self._past_names, state.tensors))
        out = self._request().infer(feed, share_outputs=False)  # copies: the request reuses its buffers
        logits = out["logits"][0]
        if self.vocab_size is None:
            self.vocab_size = logits.shape[-1]
        return logits, KVState(n + k, tuple(out[name] for name in self._present_names))

    def state_from_kv(self, kv) -> KVState:
        n = kv_length(kv, self.n_layers, self.kv_heads, self.head_dim)
        return KVState(n, tuple(np.ascontiguousarray(t, dtype=np.float32) for t in kv))


@register_backend
class OpenVinoBackend(GraphBackend):
    """OpenVINO (CPU plugin, oneDNN) on the artifact's exported ONNX graphs, with the properties it was validated with."""

    name = "openvino"
    dependency = OPENVINO
    # causal LMs only: an opaque ONNX graph's proof compares ORT against itself (families/onnx_graph.py)
    families = ("causal_lm",)
    threads_per_model = True  # INFERENCE_NUM_THREADS sizes each compiled model's pool

    def open(self, role: str, *, threads: int | None = None, alone_session: bool = False) -> OpenVinoStepModel:
        properties = dict(self.placement.config["properties"])
        graph = self.graph(role)
        if threads is None:
            return OpenVinoStepModel(graph, properties)
        return OpenVinoStepModel(
            graph, {**properties, THREADS: threads}, alone_properties=properties if alone_session else None
        )
