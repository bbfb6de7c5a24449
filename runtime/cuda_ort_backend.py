"""ONNX Runtime's CUDA execution provider on the artifact's exported decoder graph.

The GPU build of ONNX Runtime is another package, `onnxruntime-gpu`, which installs into the
same `onnxruntime/` directory as the CPU build: both can be installed at once with pip
reporting nothing wrong, and whichever came last wins (uninstalling either breaks the other).
So a GPU environment replaces the CPU package (`ORT_GPU_INSTALL`), and accelc never installs it
beside `onnxruntime`.

That package silently runs a session that asks for CUDA on the CPU when CUDA cannot start (no
GPU, no libcublas, a driver too old): `get_providers()` then lists only the CPU provider. This
backend refuses that: by default every node must run on CUDA (`session.disable_cpu_ep_fallback`),
and whatever the setting the session's first provider must be CUDA; otherwise it is exit 3
with the reason.

The KV cache stays on the GPU: each step binds the previous step's `present.*` outputs, which
ONNX Runtime allocated on the device, as the next step's `past_key_values.*` inputs (IO binding),
so only the ids go in and the logits come out. A state is the tuple of those device values,
so states are values and speculative decoding can keep several.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from accelc.errors import MissingDependency, UsageError
from accelc.runtime.backends import Dependency, GraphBackend, register_backend
from accelc.runtime.base import KVState, KVStepModel, kv_length
from accelc.runtime.cuda_tvm_backend import GpuUnavailable, driver_problem
from accelc.runtime.ort_backend import ORT, OrtStepModel, session_options

CUDA_PROVIDER = "CUDAExecutionProvider"
ORT_GPU_VERSION = "1.31.1"  # the newest onnxruntime-gpu: a CUDA 13 / cuDNN 9 build
ORT_GPU_INSTALL = f'pip uninstall -y onnxruntime && pip install "onnxruntime-gpu[cuda,cudnn]=={ORT_GPU_VERSION}"'
ORT_GPU = Dependency(ORT.module, ORT_GPU_INSTALL, "ONNX Runtime with its CUDA provider (onnxruntime-gpu)")


# ONNX Runtime can replay a CUDA graph only when every input keeps its shape and address; the
# exported graphs take an attention mask [1, P + k] that grows every step, so none qualifies.
CUDA_GRAPH_REFUSED = (
    "ONNX Runtime replays a CUDA graph only for fixed input shapes; the decoder's attention_mask "
    "[1, P+k] grows every step (CUDA graphs apply to the tvm backend's decode)"
)


def runtime_config(
    graphs: Mapping[str, str],
    *,
    device_id: int,
    arena_extend_strategy: str,
    cudnn_conv_algo_search: str,
    cpu_fallback: str,
    intra_op_threads: int,
    graph_optimization_level: str,
    memory_limit_mb: int | None,
    cuda_graph_asked: bool,
) -> dict:
    """The runtime config of a cuda-ort artifact (what the cuda target records and `cuda_session` opens)."""
    provider = {
        "device_id": device_id,
        "arena_extend_strategy": arena_extend_strategy,  # kSameAsRequested: KV growth does not double the arena
        "cudnn_conv_algo_search": cudnn_conv_algo_search,
        "do_copy_in_default_stream": 1,
        "enable_cuda_graph": 0,
    }
    if memory_limit_mb:
        provider["gpu_mem_limit"] = memory_limit_mb * 2**20
    return {
        "graphs": dict(graphs),
        "session": {
            "intra_op_threads": intra_op_threads,
            "inter_op_threads": 1,
            "graph_optimization_level": graph_optimization_level,
            "allow_spinning": False,
        },
        "cuda_provider": provider,
        "cpu_fallback": cpu_fallback,
        "kv_cache": "device (IO binding: present outputs bound as the next step's past inputs)",
        "cuda_graph": {"enabled": False, "reason": CUDA_GRAPH_REFUSED} if cuda_graph_asked else None,
        "install": ORT_GPU_INSTALL,
        "onnxruntime_gpu": ORT_GPU_VERSION,
    }


def provider_list(cfg: Mapping[str, Any]) -> list:
    """The providers a session is opened with, from the runtime config the cuda target wrote."""
    providers: list = [(CUDA_PROVIDER, {k: str(v) for k, v in cfg["cuda_provider"].items()})]
    if cfg.get("cpu_fallback") == "shape_ops":
        providers.append("CPUExecutionProvider")
    return providers


def check_active(session, why: str = "") -> None:
    """Exit 3 unless `session` really runs on CUDA (onnxruntime-gpu falls back to CPU silently)."""
    active = session.get_providers()
    if not active or active[0] != CUDA_PROVIDER:
        raise MissingDependency(
            f"ONNX Runtime's CUDA provider (the session runs on {', '.join(active) or 'nothing'} instead"
            f"{': ' + why if why else ''})",
            ORT_GPU_INSTALL,
        )


def cuda_session(graph: Path, cfg: Mapping[str, Any]):
    """An InferenceSession of `graph` on the GPU, or exit 3 naming what is missing."""
    ORT_GPU.check()
    import onnxruntime as ort

    available = ort.get_available_providers()
    if CUDA_PROVIDER not in available:
        raise MissingDependency(
            f"ONNX Runtime's CUDA provider (this onnxruntime {ort.__version__} has only {', '.join(available)})",
            ORT_GPU_INSTALL,
        )
    if driver_problem():
        raise GpuUnavailable("cuda-ort", driver_problem())
    options = session_options(cfg.get("session", {}))
    if cfg.get("cpu_fallback", "refuse") == "refuse":
        options.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    try:
        session = ort.InferenceSession(str(graph), sess_options=options, providers=provider_list(cfg))
    except Exception as exc:  # the CUDA libraries or a GPU missing, or a node CUDA cannot run
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise MissingDependency(
            f"ONNX Runtime's CUDA provider (session creation failed: {reason})", ORT_GPU_INSTALL
        ) from exc
    check_active(session)
    return session


class DeviceKVStepModel(KVStepModel):
    """A decoder-with-past session whose KV cache stays on `device` through IO binding."""

    name = "cuda-ort"

    def __init__(self, session, device: str = "cuda", device_id: int = 0):
        import onnxruntime as ort

        self._ort, self.session, self.device, self.device_id = ort, session, device, device_id
        # the graph's I/O names and shapes, read the way the CPU backend reads them
        self.inputs = {i.name: i for i in session.get_inputs()}
        self.n_layers = sum(1 for n in self.inputs if n.startswith("past_key_values.") and n.endswith(".key"))
        shape = self.inputs["past_key_values.0.key"].shape
        self.kv_heads, self.head_dim = int(shape[1]), int(shape[3])
        vocab = session.get_outputs()[0].shape[-1]
        self.vocab_size = int(vocab) if isinstance(vocab, int) else None
        self._past = [f"past_key_values.{i}.{kind}" for i in range(self.n_layers) for kind in ("key", "value")]
        self._present = [f"present.{i}.{kind}" for i in range(self.n_layers) for kind in ("key", "value")]

    _feed = OrtStepModel._feed  # input_ids, attention_mask, position_ids: the same graph contract

    def _upload(self, array: np.ndarray):
        return self._ort.OrtValue.ortvalue_from_numpy(
            np.ascontiguousarray(array, dtype=np.float32), self.device, self.device_id
        )

    def empty_state(self) -> KVState:
        empty = np.zeros((1, self.kv_heads, 0, self.head_dim), dtype=np.float32)
        return KVState(0, tuple(self._upload(empty) for _ in self._past))

    def extend(self, state: KVState, ids: np.ndarray):
        ids = np.asarray(ids, dtype=np.int64).reshape(1, -1)
        if ids.shape[1] == 0:
            raise UsageError("extend needs at least one token id; got an empty array")
        binding = self.session.io_binding()
        for name, value in self._feed(state.length, ids).items():
            binding.bind_cpu_input(name, value)
        for name, value in zip(self._past, state.tensors):
            binding.bind_ortvalue_input(name, value)
        binding.bind_output("logits", "cpu")  # the loops sample on the host
        for name in self._present:
            binding.bind_output(name, self.device, self.device_id)  # stays on the device for the next step
        self.session.run_with_iobinding(binding)
        out = binding.get_outputs()
        logits = out[0].numpy()[0]
        if self.vocab_size is None:
            self.vocab_size = logits.shape[-1]
        return logits, KVState(state.length + ids.shape[1], tuple(out[1:]))

    def truncate(self, state: KVState, n: int) -> KVState:
        """Through the host: ORT's Python API cannot slice a device tensor. Only rejected drafts
        are truncated, a few times per generation."""
        if not 0 <= n <= state.length:
            raise ValueError(f"cannot truncate a KV state of length {state.length} to {n}")
        if n == state.length:
            return state
        return KVState(n, tuple(self._upload(t.numpy()[:, :, :n]) for t in state.tensors))

    def kv_numpy(self, state: KVState) -> list[np.ndarray]:
        return [t.numpy() for t in state.tensors]

    def state_from_kv(self, kv) -> KVState:
        n = kv_length(kv, self.n_layers, self.kv_heads, self.head_dim)
        return KVState(n, tuple(self._upload(t) for t in kv))


@register_backend
class CudaOrtBackend(GraphBackend):
    """ONNX Runtime's CUDA provider on the exported graphs, KV cache kept on the GPU (onnxruntime-gpu)."""

    name = "cuda-ort"
    dependency = ORT_GPU

    def unavailable(self) -> str | None:
        import onnxruntime as ort

        if CUDA_PROVIDER not in ort.get_available_providers():
            return f"onnxruntime {ort.__version__} has no CUDA provider (install: {ORT_GPU_INSTALL})"
        return driver_problem()

    def open(self, role: str, *, threads: int | None = None, alone_session: bool = False) -> DeviceKVStepModel:
        cfg = self.placement.config
        session = cuda_session(self.graph(role), cfg)
        return DeviceKVStepModel(session, "cuda", int(cfg["cuda_provider"].get("device_id", 0)))
