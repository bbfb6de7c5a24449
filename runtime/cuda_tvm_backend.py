"""The TVM paged-KV decoder (targets/tvm_nn_llm.py) behind StepModel, on CUDA or on its llvm twin.

One library per device, the same parameters (params.safetensors) and one description
(decoder.json) written by the cuda target. The KV cache is TVM's own `PagedKVCache` object:
sequences are ids inside it, so a `KVState` here is (length, cursor on a sequence id). The
protocol's value semantics hold the way the ORT arena's do (runtime/ort_backend.py): extending
a state behind its sequence's head pops the later positions (`kv_state_popn`), unless another
live state still reads them, in which case the prefix is forked into a new sequence
(`kv_state_fork_sequence`, which shares the full pages and copies the last partial one). A
sequence no live state points to is removed before the next call.

CUDA kernels: built on a machine without a driver, TVM keeps them as CUDA source in the
library, and its CUDA runtime compiles that source through the `tvm_callback_cuda_compile`
hook when the library is loaded. When the artifact ships an ahead-of-time fatbin
(targets/tvm_nn_build.py) this module registers a hook that returns it for exactly that source
(its sha256 is recorded), so nothing is compiled at load; a source that does not match is
refused rather than JIT-compiled in production. Before loading, every requirement is checked
and a missing one is exit 3 naming it: the driver, TVM's CUDA runtime, a GPU, and an
architecture the fatbin holds code for.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import weakref
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from accelc.errors import HostUnsupported, MissingDependency, UsageError
from accelc.runtime.backends import Backend, register_backend
from accelc.runtime.base import KVState, KVStepModel
from accelc.runtime.tvm_backend import TVM

META_FILE = "decoder.json"
SUPPORTED_META_SCHEMA = 1
BRANCH_POSITIONS = 256  # positions of its own a live branch may hold beyond the shared prefix
# library folder -> how many times its shipped fatbin was handed to TVM's CUDA loader (the GPU
# check reports it: kernels came from the fatbin, not from a compile at load)
FATBIN_SERVED: dict[str, int] = {}


class GpuUnavailable(HostUnsupported):
    """What a GPU backend needs of the machine is missing (exit 3, as a missing package is)."""

    def __init__(self, backend: str, why: str):
        super().__init__(f"the {backend} backend cannot run here: {why}")


@dataclass(frozen=True, eq=False)
class _Cursor:
    """Which sequence of the paged cache a state reads."""

    seq: int


def _tvm_runtime():
    """tvm and its VM, importable from a runtime-only TVM tree (no libtvm_compiler: `tvm.relax`
    does not import there, `tvm.runtime.vm` does)."""
    try:
        import tvm
        from tvm.runtime.vm import VirtualMachine
    except ImportError as exc:
        raise MissingDependency("Apache TVM", TVM.install) from exc
    return tvm, VirtualMachine


def driver_problem() -> str | None:
    """Why no CUDA program can run here, or None: the driver library is the first thing missing."""
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return "no NVIDIA driver (libcuda.so.1 cannot be loaded; it needs one of the R580 branch or newer, CUDA 13)"
    return None


def cuda_problem(meta: dict) -> str | None:
    """Why the CUDA library of `meta` cannot run here (one line naming what is missing), or None."""
    if driver_problem():
        return driver_problem()
    tvm, _ = _tvm_runtime()
    import tvm_ffi

    if tvm_ffi.get_global_func("ffi.Module.load_from_bytes.cuda", allow_missing=True) is None:
        return (
            "TVM's CUDA runtime did not load (tvm/lib/libtvm_runtime_cuda.so needs libcudart.so.13: "
            "`pip install nvidia-cuda-runtime`)"
        )
    device = tvm.cuda(0)
    if not device.exist:
        return "no CUDA GPU is visible (CUDA_VISIBLE_DEVICES, or the driver sees none)"
    have = int(device.compute_version.replace(".", ""))
    fatbin = meta.get("fatbin")
    if fatbin:
        sass = [int(a.removeprefix("sm_").removesuffix("a")) for a in fatbin["architectures"]]
        ptx = int(fatbin["ptx"].removeprefix("compute_"))
        if have not in sass and have < ptx:
            return (
                f"this GPU is sm_{have}, and the artifact's kernels are built for {', '.join(fatbin['architectures'])} "
                f"(PTX {fatbin['ptx']}): rebuild with sm_{have} in targets.cuda architectures"
            )
    return None


def _ship_fatbin(directory: Path, meta: dict) -> None:
    """Make TVM's CUDA loader take the shipped fatbin for the library's source instead of JIT."""
    import tvm_ffi

    fatbin = meta.get("fatbin")
    if not fatbin:
        return  # no AOT kernels: TVM's own hook (NVRTC or nvcc) compiles the source at load
    binary = (directory / fatbin["file"]).read_bytes()
    expected = fatbin["source_sha256"]

    def compile_hook(code):
        got = hashlib.sha256(str(code).encode()).hexdigest()
        if got != expected:
            raise UsageError(
                f"{directory}: the CUDA source in the library (sha256 {got[:12]}) is not the one the shipped "
                f"fatbin was compiled from ({expected[:12]}): rebuild the artifact"
            )
        FATBIN_SERVED[str(directory)] = FATBIN_SERVED.get(str(directory), 0) + 1
        return bytearray(binary)

    tvm_ffi.register_global_func("tvm_callback_cuda_compile", compile_hook, override=True)


class PagedKVStepModel(KVStepModel):
    """A StepModel over the decoder's library on `device` ("cuda" or "cpu", the llvm twin)."""

    def __init__(
        self, directory: Path, device: str = "cuda", *, max_sequences: int = 8, memory_limit_mb: int | None = None
    ):
        """`max_sequences`: live branches the cache holds at once (batch speculative's); `memory_limit_mb`:
        the weights plus the cache's pages must fit, so the context shrinks to what does."""
        self.directory = directory = Path(directory)
        meta_path = directory / META_FILE
        if not meta_path.is_file():
            raise UsageError(f"{directory} is not a TVM paged-KV decoder: {META_FILE} is missing")
        self.meta = meta = json.loads(meta_path.read_text())
        if meta.get("schema") != SUPPORTED_META_SCHEMA:
            raise UsageError(f"{meta_path}: unsupported schema {meta.get('schema')!r}")
        if device not in meta["libraries"]:
            raise UsageError(f"{meta_path}: no library for device {device!r}; built: {', '.join(meta['libraries'])}")
        self.name = "cuda-tvm" if device == "cuda" else "tvm-twin"
        if device == "cpu" and not (os.environ.get("TVM_NUM_THREADS") or os.environ.get("OMP_NUM_THREADS")):
            os.environ["TVM_NUM_THREADS"] = str(os.cpu_count() or 1)  # TVM alone would use half the cores
        tvm, VirtualMachine = _tvm_runtime()
        if device == "cuda":
            problem = cuda_problem(meta)
            if problem:
                raise GpuUnavailable("cuda-tvm", problem)
            _ship_fatbin(directory, meta)
        self._tvm = tvm
        self._dev = tvm.cuda(0) if device == "cuda" else tvm.cpu()
        config = meta["config"]
        self.vocab_size = int(config["vocab_size"])
        self.num_layers = int(config["num_layers"])
        self.kv_heads = int(config["num_kv_heads"])
        self.head_dim = int(config["head_dim"])
        cache = meta["kv_cache"]
        self.max_seq_len = int(cache["max_total_seq_len"])
        self.prefill_chunk = int(cache["prefill_chunk_size"])
        # the cache allocates its pages up front: one context, plus room for the branches' own
        # positions (forks share the full pages of their prefix)
        slack = BRANCH_POSITIONS * (max_sequences - 1)
        positions = self.max_seq_len + slack
        if memory_limit_mb:
            per_position = 2 * self.num_layers * self.kv_heads * self.head_dim * 4
            room = memory_limit_mb * 2**20 - (directory / meta["param_file"]).stat().st_size
            if room // per_position < slack + int(cache["page_size"]):
                raise UsageError(
                    f"memory_limit_mb {memory_limit_mb} holds the weights but not a KV cache "
                    f"({per_position} bytes a position): raise it in targets.cuda"
                )
            positions = min(positions, room // per_position)
            self.max_seq_len = positions - slack

        library = tvm.runtime.load_module(str(directory / meta["libraries"][device]))
        self._vm = VirtualMachine(library, self._dev)
        self._prefill, self._decode = self._vm["prefill"], self._vm["decode"]
        self._params = self._upload(directory / meta["param_file"], meta["params"])
        shape = tvm.runtime.ShapeTuple
        self._cache = self._vm["create_paged_kv_cache"](
            *[
                shape([v])
                for v in (
                    max_sequences,
                    positions,
                    self.prefill_chunk,
                    int(cache["page_size"]),
                    0,
                )
            ]
        )
        get = tvm.get_global_func
        self._add = get("vm.builtin.kv_state_add_sequence")
        self._remove = get("vm.builtin.kv_state_remove_sequence")
        self._fork = get("vm.builtin.kv_state_fork_sequence")
        self._popn = get("vm.builtin.kv_state_popn")
        self._begin = get("vm.builtin.kv_state_begin_forward")
        self._end = get("vm.builtin.kv_state_end_forward")
        self._get_kv = get("vm.builtin.attention_kv_cache_debug_get_kv")
        self._lengths: dict[int, int] = {}  # sequence id -> positions it holds in the cache
        self._live: dict[int, weakref.WeakSet] = {}  # sequence id -> the states that read it
        self._next_seq = 0
        self.max_sequences = max_sequences

    def _upload(self, path: Path, names: list[str]) -> list:
        from safetensors import safe_open

        with safe_open(str(path), framework="numpy") as weights:
            return [self._tvm.runtime.tensor(weights.get_tensor(name), self._dev) for name in names]

    # -- StepModel ---------------------------------------------------------------------------

    def empty_state(self) -> KVState:
        return KVState(0, (None,))

    def extend(self, state: KVState, ids: np.ndarray) -> tuple[np.ndarray, KVState]:
        ids = np.asarray(ids).reshape(-1)
        if ids.shape[0] == 0:
            raise UsageError("extend needs at least one token id; got an empty array")
        if not np.issubdtype(ids.dtype, np.integer) or ids.min() < 0 or ids.max() >= self.vocab_size:
            raise UsageError(f"token ids must be integers in [0, {self.vocab_size})")
        n, k = state.length, ids.shape[0]
        if n + k > self.max_seq_len:
            raise UsageError(f"sequence of {n + k} tokens exceeds the decoder's context of {self.max_seq_len}")
        self._collect()
        seq = self._sequence_at(state)
        logits = []
        for start in range(0, k, self.prefill_chunk):
            chunk = ids[start : start + self.prefill_chunk].astype(np.int32).reshape(1, -1)
            shape = self._tvm.runtime.ShapeTuple
            self._begin(self._cache, shape([seq]), shape([chunk.shape[1]]))
            run = self._decode if chunk.shape[1] == 1 else self._prefill
            out = run(self._tvm.runtime.tensor(chunk, self._dev), self._cache, self._params)
            self._end(self._cache)
            logits.append(out[0].numpy()[0])
        self._lengths[seq] = n + k
        return np.concatenate(logits).astype(np.float32, copy=False), self._state(seq, n + k)

    def truncate(self, state: KVState, n: int) -> KVState:
        if not 0 <= n <= state.length:
            raise ValueError(f"cannot truncate a KV state of length {state.length} to {n}")
        if n == state.length:
            return state
        cursor = state.tensors[0]
        return self._state(cursor.seq, n) if n else self.empty_state()  # positions are popped when extended

    def kv_numpy(self, state: KVState) -> list[np.ndarray]:
        if state.length == 0:
            empty = np.zeros((1, self.kv_heads, 0, self.head_dim), dtype=np.float32)
            return [empty] * (2 * self.num_layers)
        seq = self._cursor(state).seq
        shape = (self.num_layers, state.length, self.kv_heads, self.head_dim)
        keys = self._tvm.runtime.empty(shape, "float32", self._dev)
        values = self._tvm.runtime.empty(shape, "float32", self._dev)
        self._get_kv(self._cache, seq, 0, state.length, keys, values)
        k, v = keys.numpy().transpose(0, 2, 1, 3)[:, None], values.numpy().transpose(0, 2, 1, 3)[:, None]
        return [t for layer in range(self.num_layers) for t in (k[layer], v[layer])]

    # -- sequences ---------------------------------------------------------------------------

    def _cursor(self, state: KVState) -> _Cursor:
        cursor = state.tensors[0] if len(state.tensors) == 1 else None
        if not isinstance(cursor, _Cursor) or cursor.seq not in self._lengths:
            raise ValueError("this KV state does not belong to this paged-KV model")
        if state.length > self._lengths[cursor.seq]:
            raise ValueError("this KV state was overwritten: its sequence no longer holds its positions")
        return cursor

    def _state(self, seq: int, length: int) -> KVState:
        state = KVState(length, (_Cursor(seq),))
        self._live[seq].add(state)
        return state

    def _new_sequence(self) -> int:
        if len(self._lengths) >= self.max_sequences:
            raise UsageError(f"more than {self.max_sequences} live KV states branch apart; drop some first")
        seq, self._next_seq = self._next_seq, self._next_seq + 1
        self._lengths[seq], self._live[seq] = 0, weakref.WeakSet()
        return seq

    def _sequence_at(self, state: KVState) -> int:
        """The sequence to append to: `state`'s own, cut back to its length, or a fork of its prefix
        where another live state still reads the positions beyond it."""
        if state.length == 0:
            seq = self._new_sequence()
            self._add(self._cache, seq)
            return seq
        seq = self._cursor(state).seq
        held = self._lengths[seq]
        if held == state.length:
            return seq
        if any(s.length > state.length for s in list(self._live[seq])):
            child = self._new_sequence()
            self._fork(self._cache, seq, child, state.length)
            self._lengths[child] = state.length
            return child
        self._popn(self._cache, seq, held - state.length)
        self._lengths[seq] = state.length
        return seq

    def _collect(self) -> None:
        """Remove the sequences no live state reads any more."""
        for seq in [s for s, live in self._live.items() if not len(live)]:
            self._remove(self._cache, seq)
            del self._lengths[seq], self._live[seq]


@register_backend
class CudaTvmBackend(Backend):
    """TVM on an NVIDIA GPU: the paged-KV decoder the cuda target compiled, kernels ahead of time."""

    name = "cuda-tvm"
    dependency = TVM
    device = "cuda"

    def held_roles(self) -> dict[str, object]:
        return dict(self.placement.config.get("dirs", {}))

    def files(self, role: str) -> list[Path]:
        return [self.placement.directory / self.held_roles()[role]]

    def unavailable(self) -> str | None:
        if self.device == "cpu":
            return None
        directory = self.placement.directory / next(iter(self.held_roles().values()))
        return cuda_problem(json.loads((directory / META_FILE).read_text()))

    def open(self, role: str, *, threads: int | None = None, alone_session: bool = False) -> PagedKVStepModel:
        limit = self.placement.config.get("memory_limit_mb")
        return PagedKVStepModel(self.placement.directory / self.held_roles()[role], self.device, memory_limit_mb=limit)


@register_backend
class TvmTwinBackend(CudaTvmBackend):
    """The same paged-KV decoder built for llvm: the CPU twin that proves the CUDA graph here."""

    name = "tvm-twin"
    device = "cpu"
