"""TVMStepModel: runs the step function that `accelc.targets.tvm_build` compiled.

The KV cache never leaves TVM: each extend passes the previous step's output tensors straight
back in, so only the ids go in and the logits come out through numpy. Truncation calls the
small `truncate_kv` function compiled into the same library (TVM tensors cannot be sliced along
an inner axis from Python). tvm is imported on first use, so importing this module is cheap.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from accelc.errors import HostUnsupported, MissingDependency, UsageError
from accelc.runtime.backends import Backend, Dependency, graph_files, register_backend
from accelc.runtime.base import KVState, KVStepModel, kv_length

TVM_INSTALL = "pip install apache-tvm==0.27.0.post1"
TVM = Dependency("tvm", TVM_INSTALL, "Apache TVM")
META_FILE = "tvm_meta.json"
SUPPORTED_META_SCHEMA = 1


def import_tvm():
    """tvm, or MissingDependency naming the pip command (exit 3)."""
    try:
        import tvm
        from tvm import relax  # noqa: F401
    except ImportError as exc:
        raise MissingDependency("Apache TVM", TVM_INSTALL) from exc
    return tvm


# Instruction sets that compiled numerical code uses (vector units, FMA, bit manipulation). LLVM's
# feature list for a CPU name also holds tuning flags no CPU reports (`fast-lzcnt`) and system
# instructions that generated kernels never emit and VMs hide (`mwaitx`, `pku`): comparing those
# would refuse a library on a machine that runs it.
CODEGEN_FEATURE_PREFIXES = ("sse", "ssse", "avx", "fma", "f16c", "bmi", "popcnt", "lzcnt", "movbe", "amx", "xop")


def missing_cpu_features(target: dict) -> list[str]:
    """The instruction-set features the code for `target` (an llvm target dict naming its `mcpu`)
    may use and this machine's CPU lacks."""
    mcpu = target.get("mcpu")
    tvm = import_tvm()
    if not mcpu or mcpu == tvm.get_global_func("tvm.codegen.llvm.GetHostCPUName")():
        return []
    needed = tvm.get_global_func("target.llvm_get_cpu_features")(tvm.target.Target(dict(target)))
    have = dict(tvm.get_global_func("tvm.codegen.llvm.GetHostCPUFeatures")())
    needed = [str(f) for f in needed if str(f).startswith(CODEGEN_FEATURE_PREFIXES)]
    return sorted(f for f in needed if f in have and not have[f])


def check_host_cpu(target: dict) -> None:
    """Refuse (exit 3) a library compiled for a CPU whose instructions this one lacks: it would
    die of SIGILL mid-decode instead of saying why."""
    missing = missing_cpu_features(target)
    if missing:
        raise HostUnsupported(
            f"the TVM library was compiled for CPU '{target['mcpu']}', and this machine's CPU lacks "
            f"{', '.join(missing)}; recompile the artifact on this machine (or set the cpu target's "
            f"tvm.mcpu to a CPU both machines support)"
        )


class TVMStepModel(KVStepModel):
    """A StepModel over a TVM Relax VM artifact directory (model.so, params, tvm_meta.json)."""

    name = "tvm"

    def __init__(
        self,
        artifact_dir: Path,
        device: str = "cpu",
        *,
        num_threads: int | None = None,
        weights_graph: Path | None = None,
    ):
        """weights_graph: the fused ONNX graph holding the weights, for a library lowered with
        `params_in_graph` (targets/tvm_build.py); its backend passes the artifact's graph."""
        # TVM sizes its (per calling thread) worker pool once, on the first parallel kernel, from
        # TVM_NUM_THREADS, else OMP_NUM_THREADS, else hardware_concurrency() / 2 on x86 (it
        # assumes hyper-threading): on a 2-core VM without SMT that is ONE thread, and decode
        # runs ~1.8x slower. So name the count before the first run unless the user already did.
        # (Once a thread's pool exists, later values cannot raise its size.)
        if num_threads is not None or not (os.environ.get("TVM_NUM_THREADS") or os.environ.get("OMP_NUM_THREADS")):
            os.environ["TVM_NUM_THREADS"] = str(num_threads or os.cpu_count() or 1)
        tvm = import_tvm()
        from safetensors import safe_open
        from tvm import relax

        self.artifact_dir = artifact_dir = Path(artifact_dir)
        meta_path = artifact_dir / META_FILE
        if not meta_path.is_file():
            raise UsageError(f"{artifact_dir} is not a TVM artifact: {META_FILE} is missing")
        self.meta = meta = json.loads(meta_path.read_text())
        if meta.get("schema") != SUPPORTED_META_SCHEMA:
            raise UsageError(f"{meta_path}: unsupported schema {meta.get('schema')!r}")
        if device != "cpu":
            raise UsageError(f"the TVM runtime supports device 'cpu' only, got {device!r}")

        self._tvm = tvm
        self._dev = tvm.cpu()
        self.vocab_size = int(meta["vocab_size"])
        self.num_layers = int(meta["num_layers"])
        self.kv_heads = int(meta["kv_heads"])
        self.head_dim = int(meta["head_dim"])
        self.max_seq_len = int(meta["max_seq_len"])
        self._dtype = meta["dtype"]

        lib = tvm.runtime.load_module(str(artifact_dir / meta["library"]))
        self._vm = relax.VirtualMachine(lib, self._dev)
        self._step = self._vm[meta["function"]]
        self._truncate = self._vm[meta["truncate_function"]]
        uploaded = {}
        if meta.get("params_in_graph"):
            uploaded = self._weights_from_graph(weights_graph, meta["params"])
        else:
            # Copy each stored tensor into TVM once, as it is read (no second full copy of the
            # weights in numpy); tied weights then fill several parameter slots with one tensor.
            with safe_open(str(artifact_dir / meta["param_file"]), framework="numpy") as weights:
                for key in weights.keys():  # noqa: SIM118 (safe_open is not iterable)
                    uploaded[key] = tvm.runtime.tensor(weights.get_tensor(key), self._dev)
        self._params = [uploaded[key] for key in meta["params"]]

    def _weights_from_graph(self, graph: Path | None, names: list[str]) -> dict:
        from accelc.compiler.fused_decoder import view_arrays

        if graph is None:
            raise UsageError(
                f"{self.artifact_dir}: this TVM library reads its weights from the artifact's ONNX graph; "
                "open it through the artifact (accelc run/bench), which passes the graph"
            )
        arrays = view_arrays(graph, dict.fromkeys(names))
        if arrays is None:
            raise UsageError(f"{graph} does not hold the weights this TVM library was built against")
        return {key: self._tvm.runtime.tensor(array, self._dev) for key, array in arrays.items()}

    # -- StepModel ---------------------------------------------------------------------------

    def empty_state(self) -> KVState:
        empty = np.zeros((1, self.kv_heads, 0, self.head_dim), dtype=self._dtype)
        tensor = self._tvm.runtime.tensor(empty, self._dev)
        # Inputs are never written by the VM, so one zero-length tensor can fill every slot.
        return KVState(0, (tensor,) * (2 * self.num_layers))

    def extend(self, state: KVState, ids: np.ndarray) -> tuple[np.ndarray, KVState]:
        ids = self._check_ids(ids)
        new = ids.shape[0]
        if state.length + new > self.max_seq_len:
            raise UsageError(
                f"sequence of {state.length + new} tokens exceeds the compiled max_seq_len {self.max_seq_len}"
            )
        tokens = self._tvm.runtime.tensor(ids.reshape(1, new), self._dev)
        out = self._step(tokens, *state.tensors, *self._params)
        logits = out[0].numpy()[0]  # [k, V]
        present = tuple(out[i] for i in range(1, 1 + 2 * self.num_layers))
        return logits.astype(np.float32, copy=False), KVState(state.length + new, present)

    def truncate(self, state: KVState, n: int) -> KVState:
        if not 0 <= n <= state.length:
            raise ValueError(f"cannot truncate a KV state of length {state.length} to {n}")
        if n == state.length:
            return state
        out = self._truncate(*state.tensors, self._tvm.runtime.ShapeTuple([n]))
        return KVState(n, tuple(out[i] for i in range(len(state.tensors))))

    def kv_numpy(self, state: KVState) -> list[np.ndarray]:
        """The KV tensors copied to numpy (TVM tensors do not implement the array protocol)."""
        return [t.numpy() for t in state.tensors]

    def state_from_kv(self, kv) -> KVState:
        n = kv_length(kv, self.num_layers, self.kv_heads, self.head_dim)
        return KVState(
            n, tuple(self._tvm.runtime.tensor(np.ascontiguousarray(t, dtype=self._dtype), self._dev) for t in kv)
        )

    # -- helpers -----------------------------------------------------------------------------

    def _check_ids(self, ids) -> np.ndarray:
        ids = np.asarray(ids)
        if ids.ndim == 2 and ids.shape[0] == 1:
            ids = ids[0]
        if ids.ndim != 1:
            raise UsageError(f"token ids must be a 1-D array (or [1, k]), got shape {ids.shape}")
        if ids.shape[0] == 0:
            raise UsageError("extend needs at least one token id; got an empty array")
        if not np.issubdtype(ids.dtype, np.integer):
            raise UsageError(f"token ids must be integers, got dtype {ids.dtype}")
        # Not just hygiene: the embedding lookup is compiled as take(mode="fast"), which does no
        # bounds check, so an out-of-range id would read (or crash on) arbitrary memory.
        if ids.min() < 0 or ids.max() >= self.vocab_size:
            raise UsageError(f"token ids must lie in [0, {self.vocab_size}); got {ids.min()}..{ids.max()}")
        return ids.astype(np.int64, copy=False)


@register_backend
class TvmBackend(Backend):
    """Apache TVM: the Relax VM library the cpu target compiled, one per decode role."""

    name = "tvm"
    dependency = TVM

    def held_roles(self) -> dict[str, object]:
        return dict(self.placement.config.get("dirs", {}))

    def check(self, role: str) -> None:
        super().check(role)
        check_host_cpu(self.placement.config.get("target") or {})

    def weights_graph(self, role: str) -> Path | None:
        """The artifact's ONNX graph that holds this role's weights, or None (its own params file)."""
        graph_role = self.placement.config.get("weights_graph", {}).get(role)
        if graph_role is None:
            return None
        art = self.placement.artifact
        return art.dir / art.manifest["graphs"][graph_role]

    def files(self, role: str) -> list[Path]:
        graph = self.weights_graph(role)
        library = self.placement.directory / self.held_roles()[role]  # library, params and tvm_meta.json
        return [library] if graph is None else [library, *graph_files(graph)]

    def open(self, role: str, *, threads: int | None = None, alone_session: bool = False) -> TVMStepModel:
        # TVM reads its thread count from the environment when its pool starts; one pool serves
        # every model of a process, so a per-model share (`threads`) cannot apply
        os.environ.setdefault("TVM_NUM_THREADS", str(self.placement.config.get("num_threads") or os.cpu_count()))
        return TVMStepModel(self.placement.directory / self.held_roles()[role], weights_graph=self.weights_graph(role))
