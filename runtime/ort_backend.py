"""The ONNX Runtime backend: runs the exported decoder-with-past graph behind StepModel.

The graph takes input_ids [1, k], (for most families) attention_mask [1, P+k] and position_ids
[1, k], and past_key_values.{i}.key/value [1, kv_heads, P, head_dim]; it returns logits [1, k, V]
and present.{i}.key/value [1, kv_heads, P+k, head_dim]. Session options come from the artifact's
runtime config, so what was validated is what runs.

Graphs that declare `accelc.kv_cache: in_place` in their metadata (fused graphs, whose
GroupQueryAttention appends new keys/values into the past buffer when past and present are one
buffer) keep their cache in a preallocated arena bound to both through IO binding. A step then
writes only its k new positions instead of copying the whole cache into a fresh present: on
SmolLM2 at 1,000 cached tokens a decode step takes 29 instead of 38 ms, and truncation is free.
The protocol's value semantics stay: a state is a view (arena, length, when it was made), and
extending a state whose later positions another live state still needs copies the prefix into
a new arena first (batch speculative's branches); CPython's reference counting tells which
states are alive. The runtime option `kv_cache: copy` turns this off.

A model opened for one of PEARL's parallel workers (a share of the cores) can carry a second
session of the same graph (`alone_options`: all cores) for the calls made inside `alone()`,
when the other worker idles: the prompt's prefill and rounds of copied drafts. Both sessions
bind the same arena, so a state moves between them for free. ORT's Python API cannot share
prepacked weights between sessions, so the second one costs the weights once more in memory.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from accelc.errors import require
from accelc.runtime.backends import Dependency, GraphBackend, register_backend
from accelc.runtime.base import KVState, KVStepModel, kv_length

# graph metadata an exporter writes when the graph's past and present may share one buffer
IN_PLACE_KV = ("accelc.kv_cache", "in_place")
ORT = Dependency("onnxruntime", "pip install onnxruntime", "ONNX Runtime")
ARENA_START = 256  # positions; arenas double when a sequence outgrows them

OPT_LEVELS = {
    "disable": "ORT_DISABLE_ALL",
    "basic": "ORT_ENABLE_BASIC",
    "extended": "ORT_ENABLE_EXTENDED",
    "all": "ORT_ENABLE_ALL",
}


def session_options(cfg: Mapping[str, Any]):
    ort = require(ORT.module, ORT.install)
    so = ort.SessionOptions()
    so.intra_op_num_threads = int(cfg.get("intra_op_threads", 0))
    so.inter_op_num_threads = int(cfg.get("inter_op_threads", 0))
    so.graph_optimization_level = getattr(
        ort.GraphOptimizationLevel, OPT_LEVELS[cfg.get("graph_optimization_level", "all")]
    )
    # Spinning threads burn the core a busy neighbour needs; on small shared CPUs it makes
    # latency up to 50x worse, so it is off unless the artifact says otherwise.
    spin = "1" if cfg.get("allow_spinning", False) else "0"
    so.add_session_config_entry("session.intra_op.allow_spinning", spin)
    so.add_session_config_entry("session.inter_op.allow_spinning", spin)
    if cfg.get("allow_spinning", False) and cfg.get("spin_duration_us") is not None:
        so.add_session_config_entry("session.intra_op.spin_duration_us", str(int(cfg["spin_duration_us"])))
    so.log_severity_level = 3
    return so


class OrtStepModel(KVStepModel):
    name = "ort"

    def __init__(
        self, graph: Path, options: Mapping[str, Any] | None = None, alone_options: Mapping[str, Any] | None = None
    ):
        """`alone_options`: a second session of the same graph (all cores, say) for the calls made
        inside `alone()`; both share the KV cache. It costs the graph's weights once more in memory."""
        ort = require(ORT.module, ORT.install)

        def open_session(opts: Mapping[str, Any]):
            return ort.InferenceSession(
                str(graph), sess_options=session_options(opts), providers=["CPUExecutionProvider"]
            )

        self.session = open_session(options or {})
        self.alone_session = open_session(alone_options) if alone_options is not None else None
        self._alone = False
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.n_layers = sum(1 for n in self.inputs if n.startswith("past_key_values.") and n.endswith(".key"))
        shape = self.inputs["past_key_values.0.key"].shape  # [batch, kv_heads, past, head_dim]
        self.kv_heads, self.head_dim = int(shape[1]), int(shape[3])
        self.vocab_size = (
            int(self.session.get_outputs()[0].shape[-1])
            if isinstance(self.session.get_outputs()[0].shape[-1], int)
            else None
        )
        self._past_names = [f"past_key_values.{i}.{kind}" for i in range(self.n_layers) for kind in ("key", "value")]
        self._present_names = [f"present.{i}.{kind}" for i in range(self.n_layers) for kind in ("key", "value")]
        key, value = IN_PLACE_KV
        declared = self.session.get_modelmeta().custom_metadata_map.get(key) == value
        self.in_place = declared and (options or {}).get("kv_cache", "auto") == "auto"
        self._arena: _Arena | None = None
        self._arena_lock = threading.Lock()  # one model may serve two threads (PEARL with draft = target)
        self.kv_copies = 0  # in-place arenas filled by copying a prefix (growth, or a branch still in use)

    @contextlib.contextmanager
    def alone(self):
        if self.alone_session is None:
            yield
            return
        self._alone = True
        try:
            yield
        finally:
            self._alone = False

    def _session(self):
        """The session a call runs on now: the alone one inside `alone()`, where there is one."""
        return self.alone_session if self._alone else self.session

    def empty_state(self) -> KVState:
        if self.in_place:
            with self._arena_lock:
                if self._arena is None:
                    self._arena = _Arena(self, ARENA_START)
                return self._arena.state(0)
        empty = np.zeros((1, self.kv_heads, 0, self.head_dim), dtype=np.float32)
        return KVState(0, tuple(empty for _ in self._past_names))

    def _feed(self, length: int, ids: np.ndarray) -> dict[str, np.ndarray]:
        k = ids.shape[1]
        feed = {"input_ids": ids}
        if "attention_mask" in self.inputs:
            feed["attention_mask"] = np.ones((1, length + k), dtype=np.int64)
        if "position_ids" in self.inputs:
            feed["position_ids"] = np.arange(length, length + k, dtype=np.int64).reshape(1, k)
        return feed

    def extend(self, state: KVState, ids: np.ndarray):
        ids = np.asarray(ids, dtype=np.int64).reshape(1, -1)
        if ids.shape[1] == 0:
            raise ValueError("extend needs at least one token")
        if self.in_place:
            with self._arena_lock:
                logits, new = self._extend_in_place(state, ids)
        else:
            feed = self._feed(state.length, ids)
            feed.update(zip(self._past_names, state.tensors))
            out = self._session().run(["logits", *self._present_names], feed)
            logits, new = out[0][0], KVState(state.length + ids.shape[1], tuple(out[1:]))
        if self.vocab_size is None:
            self.vocab_size = logits.shape[-1]
        return logits, new

    def _extend_in_place(self, state: KVState, ids: np.ndarray):
        view = _view(state)
        arena, n, k = view.arena, state.length, ids.shape[1]
        arena.check(state)
        if n + k > arena.capacity or arena.needed_beyond(n):
            # outgrown (double it: amortised O(1) per token), or another live state still reads
            # positions >= n: continue in a copy of the prefix
            arena = arena.copy_prefix(n, arena.capacity if n + k <= arena.capacity else 2 * (n + k))
            if view.arena is self._arena:
                self._arena = arena
        session = self._session()
        binding = arena.binding(session)
        for name, value in self._feed(n, ids).items():
            binding.bind_cpu_input(name, value)
        step = arena.step_logits(session, self.vocab_size) if k == 1 else arena.unbind_step_logits(session)
        session.run_with_iobinding(binding)
        logits = step[0].copy() if step is not None else binding.get_outputs()[0].numpy()[0]
        return logits, arena.wrote(n, k)

    def truncate(self, state: KVState, n: int) -> KVState:
        if not self.in_place:
            return super().truncate(state, n)
        if not 0 <= n <= state.length:
            raise ValueError(f"cannot truncate a KV state of length {state.length} to {n}")
        view = _view(state)
        with self._arena_lock:
            view.arena.check(state)
            return view.arena.state(n, view.stamp)

    def state_from_kv(self, kv) -> KVState:
        n = kv_length(kv, self.n_layers, self.kv_heads, self.head_dim)
        if not self.in_place:
            return KVState(n, tuple(np.ascontiguousarray(t, dtype=np.float32) for t in kv))
        arena = _Arena(self, max(ARENA_START, 2 * n))
        for dst, src in zip(arena.buffers, kv):
            dst[:, :, :n] = src
        with self._arena_lock:
            self._arena = arena
            return arena.state(n)

    def kv_numpy(self, state: KVState) -> list[np.ndarray]:
        if self.in_place:
            arena = _view(state).arena
            with self._arena_lock:
                arena.check(state)
                return [b[:, :, : state.length].copy() for b in arena.buffers]
        return list(state.tensors)


@dataclass(frozen=True, eq=False)
class _View:
    """An in-place state's tensors: its arena and the arena's clock when the state was made."""

    arena: _Arena
    stamp: int


def _view(state: KVState) -> _View:
    if len(state.tensors) != 1 or not isinstance(state.tensors[0], _View):
        raise ValueError("this KV state does not belong to an in-place ONNX Runtime model")
    return state.tensors[0]


class _Arena:
    """Preallocated past/present buffers of one model, bound to both through an IO binding per
    session (a model with an `alone` session runs both on the same cache).

    `written[p]` is the clock value of the call that last wrote position p; a state made at
    clock t owns positions [0, length) as long as none was written after t.
    """

    def __init__(self, model: OrtStepModel, capacity: int):
        self.model, self.capacity = model, capacity
        shape = (1, model.kv_heads, capacity, model.head_dim)
        self.buffers = [np.zeros(shape, dtype=np.float32) for _ in model._past_names]
        self.written = np.zeros(capacity, dtype=np.int64)
        self.clock = 0
        self.live: weakref.WeakSet[KVState] = weakref.WeakSet()
        self._bindings: dict[int, Any] = {}
        self._step_logits: dict[int, np.ndarray] = {}

    def binding(self, session):
        """`session`'s IO binding of these buffers, made on its first call."""
        binding = self._bindings.get(id(session))
        if binding is None:
            import onnxruntime as ort

            binding = self._bindings[id(session)] = session.io_binding()
            binding.bind_output("logits")  # first: get_outputs() lists outputs in binding order
            for past, present, buffer in zip(self.model._past_names, self.model._present_names, self.buffers):
                value = ort.OrtValue.ortvalue_from_numpy(buffer)  # shares the numpy memory
                binding.bind_ortvalue_input(past, value)
                binding.bind_ortvalue_output(present, value)
        return binding

    def step_logits(self, session, vocab_size: int | None) -> np.ndarray | None:
        """The buffer a one-token call of `session` writes its logits into (None until the vocabulary
        size is known). Reading a binding's outputs wraps every present tensor as well: 0.17 ms per
        decode step for SmolLM2's 60 caches, 3% of a 4-bit step."""
        buffer = self._step_logits.get(id(session))
        if buffer is None and vocab_size:
            import onnxruntime as ort

            buffer = self._step_logits[id(session)] = np.empty((1, 1, vocab_size), dtype=np.float32)
            self.binding(session).bind_ortvalue_output("logits", ort.OrtValue.ortvalue_from_numpy(buffer))
        elif buffer is None:
            self.binding(session).bind_output("logits")
        return buffer

    def unbind_step_logits(self, session) -> None:
        """Let ORT allocate the logits of a call of several tokens (their shape changes with k)."""
        self._step_logits.pop(id(session), None)
        self.binding(session).bind_output("logits")

    def state(self, length: int, stamp: int | None = None) -> KVState:
        state = KVState(length, (_View(self, self.clock if stamp is None else stamp),))
        self.live.add(state)
        return state

    def valid(self, state: KVState) -> bool:
        return state.length == 0 or int(self.written[: state.length].max()) <= _view(state).stamp

    def check(self, state: KVState) -> None:
        if not self.valid(state):
            raise ValueError(
                "this KV state was overwritten: it was rebuilt outside the model (KVState(...)) "
                "instead of coming from prefill/extend/truncate"
            )

    def needed_beyond(self, n: int) -> bool:
        """Whether a live state still reads a position >= n (extending at n would overwrite it)."""
        return any(s.length > n and self.valid(s) for s in list(self.live))

    def wrote(self, n: int, k: int) -> KVState:
        self.clock += 1
        self.written[n : n + k] = self.clock
        return self.state(n + k)

    def copy_prefix(self, n: int, capacity: int) -> _Arena:
        self.model.kv_copies += 1
        arena = _Arena(self.model, capacity)
        for dst, src in zip(arena.buffers, self.buffers):
            dst[:, :, :n] = src[:, :, :n]
        return arena


@register_backend
class OrtBackend(GraphBackend):
    """ONNX Runtime (CPU) on the artifact's exported graphs, with the session options it was validated with."""

    name = "ort"
    # an opaque ONNX graph runs here as it is; a flow's blocks and a diffusion LM's denoiser through their family
    families = ("causal_lm", "onnx", "tarflow", "diffusion_lm")
    dependency = ORT
    threads_per_model = True  # one session per model, each with its own intra-op pool

    def open_batched(self, role: str, *, slots: int, threads: int | None = None):
        """The role's fused graph over a cache of `slots` rows (runtime/ort_batch.py); None for a
        traced graph, whose Concat-built cache has no per-sequence lengths."""
        from accelc.runtime.ort_batch import BatchedOrtModel

        self.check(role)
        session = self.placement.config["session"]
        if session.get("kv_cache", "auto") != "auto":  # `kv_cache: copy` asked for the copying cache
            return None
        options = session if threads is None else {**session, "intra_op_threads": threads}
        return BatchedOrtModel.open(self.graph(role), options, slots)

    def open(self, role: str, *, threads: int | None = None, alone_session: bool = False) -> OrtStepModel:
        session = self.placement.config["session"]
        graph = self.graph(role)
        if threads is None:
            return OrtStepModel(graph, session)
        return OrtStepModel(
            graph, {**session, "intra_op_threads": threads}, alone_options=session if alone_session else None
        )
