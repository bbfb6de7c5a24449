"""Compile the paged-KV decoder (`targets/tvm_nn_llm.py`) for CUDA or, as its CPU twin, for llvm.

The CUDA pipeline is TVM's own (relax/backend/cuda/pipeline.py) with two changes that MLC-LLM
also makes: `FuseTransposeMatmul` runs first, because dlight's GEMV rule only recognises a
weight stored [N, K] (without it every decode matmul falls to the Reduction rule), and the
dlight rules are applied by `RecordedSchedule`, which is `dl.ApplyDefaultSchedule` plus a record
of which rule scheduled which kernel, so the artifact (and its tests) can say that every matmul
got Matmul (prefill) or GEMV (decode) and none the untuned Fallback.

Without a GPU driver TVM keeps the CUDA kernels as source in the library (its runtime cannot
load `libtvm_runtime_cuda.so`); `compile_fatbin` compiles that source ahead of time with nvcc,
for several architectures at once, so a server loads machine code instead of JIT-compiling.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

from accelc.errors import MissingDependency, PassFailed, UsageError

# CUDA 13 (the runtime TVM 0.27's wheel links: libcudart.so.13) dropped every architecture below
# Turing: nvcc 13 refuses sm_50 .. sm_72 as "Unsupported gpu architecture".
MIN_ARCH = 75
KNOWN_ARCHS = ("sm_75", "sm_80", "sm_86", "sm_87", "sm_89", "sm_90", "sm_100", "sm_103", "sm_110", "sm_120", "sm_121")
DEFAULT_ARCHS = ("sm_80", "sm_86", "sm_89", "sm_90")
# dlight's GPU rules in the order TVM's CUDA pipeline and MLC-LLM apply them: the first that
# matches a kernel schedules it.
GPU_RULES = ("Matmul", "GEMV", "Reduction", "GeneralReduction", "Fallback")
PRESCHEDULED = "prescheduled"  # kernels written already scheduled (the KV cache's attention, RoPE, paging)
NVCC_INSTALL = 'pip install "accelc[cuda-build]"  (nvidia-cuda-nvcc: nvcc from PyPI)'
_KERNEL = re.compile(r'extern "C" __global__ void (?:__launch_bounds__\(\d+\) )?(\w+)\(')


def arch_error(name: str) -> str | None:
    """Why `name` is not a CUDA architecture this target builds for, or None."""
    match = re.fullmatch(r"sm_(\d+)a?", str(name))
    if match is not None and int(match.group(1)) < MIN_ARCH:
        return (
            f"{name} is below sm_{MIN_ARCH}: CUDA 13, which TVM 0.27 and onnxruntime-gpu 1.31 run on, "
            f"dropped it (nvcc: unsupported gpu architecture); use sm_{MIN_ARCH} or newer"
        )
    if match is None or str(name).removesuffix("a") not in KNOWN_ARCHS:
        return f"unknown CUDA architecture {name!r}; known: {', '.join(KNOWN_ARCHS)}"
    return None


def arch_number(name: str) -> int:
    return int(name.removeprefix("sm_").removesuffix("a"))


def cuda_target(arch: str) -> dict:
    """The full target dict for one architecture. The arch is always explicit (TVM's bare "cuda"
    means sm_50, which CUDA 13 rejects), and the limits dlight reads are named so it does not
    guess them (it warns and assumes 48 KiB otherwise)."""
    return {
        "kind": "cuda",
        "arch": arch,
        "max_shared_memory_per_block": 49152,  # the static limit on every sm_75+ part (more needs opt-in)
        "max_threads_per_block": 1024,
        "thread_warp_size": 32,
        "host": {"kind": "llvm"},
    }


def llvm_target() -> dict:
    from accelc.targets.tvm_build import host_llvm_target

    return host_llvm_target()


def _recorded_schedule(rules, record: dict):
    import tvm
    from tvm import tirx

    @tvm.transform.module_pass(opt_level=0, name="RecordedSchedule")
    def schedule(mod, _ctx):
        target = tvm.target.Target.current(allow_none=False)
        updated = {}
        for gvar, func in mod.functions_items():
            if not isinstance(func, tirx.PrimFunc):
                continue
            if func.attrs is not None and "tirx.is_scheduled" in func.attrs and func.attrs["tirx.is_scheduled"]:
                record[gvar.name_hint] = PRESCHEDULED
                continue
            for rule in rules:
                space = rule.apply(func, target, False)
                if space is None:
                    continue
                sch = space[0] if isinstance(space, list) else space
                updated[gvar] = sch.mod["main"].with_attr("tirx.is_scheduled", True)
                record[gvar.name_hint] = type(rule).__name__
                break
            else:
                record[gvar.name_hint] = "unscheduled"
        for gvar, func in updated.items():
            mod[gvar] = func
        return mod

    return schedule


def _cuda_pipeline(target, record: dict):
    import tvm
    from tvm import relax
    from tvm.relax.backend.cuda import pipeline as cuda
    from tvm.s_tir import dlight as dl

    rules = [getattr(dl.gpu, name)() for name in GPU_RULES]
    legalize = [p for p in cuda.legalize_passes(target) if "ApplyDefaultSchedule" not in str(p.info.name)]

    @tvm.transform.module_pass(opt_level=0, name="AccelcCudaPipeline")
    def pipeline(mod, _ctx):
        with target:
            seq = tvm.transform.Sequential(
                [relax.transform.FuseTransposeMatmul()]
                + cuda.library_dispatch_passes(target)
                + legalize
                + [_recorded_schedule(rules, record)]
                + cuda.dataflow_lower_passes(target)
                + cuda.finalize_passes(target)
            )
            return seq(mod)

    return pipeline


def compile_decoder(config, target: dict, *, cuda_graph: bool = False):
    """(executable, parameter names, schedule record) of the decoder built for `target`.

    The record maps every kernel to the dlight rule that scheduled it (CUDA) and is empty for
    llvm; `cuda_graph` captures decode's kernel launches as one CUDA graph on first run.
    """
    import tvm

    from accelc.targets import tvm_nn_llm

    target_obj = tvm.target.Target(target)
    mod, names = tvm_nn_llm.export(config, target_obj)
    record: dict[str, str] = {}
    if target["kind"] == "cuda":
        pipeline = _cuda_pipeline(target_obj, record)
    else:
        from accelc.targets.tvm_schedules import cpu_pipeline  # accelc's CPU schedules (FuseTransposeMatmul first)

        pipeline = cpu_pipeline(target_obj)
    try:
        with tvm.transform.PassContext(config={"relax.backend.use_cuda_graph": bool(cuda_graph)}):
            executable = tvm.compile(mod, target_obj, relax_pipeline=pipeline)
    except Exception as exc:
        raise PassFailed("tvm.compile", f"tvm.compile of the paged-KV decoder for {target} failed: {exc}") from exc
    return executable, names, record


def cuda_source(executable) -> str:
    """The CUDA C source TVM generated (the device module sits below the VM and host modules)."""
    stack = [executable.mod]
    while stack:
        module = stack.pop()
        if module.kind == "cuda":
            return module.inspect_source()
        stack.extend(module.imports)
    raise PassFailed("tvm.compile", "the CUDA build holds no CUDA module")


def kernel_names(source: str) -> list[str]:
    return sorted(set(_KERNEL.findall(source)))


def find_nvcc() -> Path | None:
    """nvcc from the `nvidia-cuda-nvcc` wheel (site-packages/nvidia/cu13/bin) if installed, else PATH's."""
    try:
        import nvidia

        for root in nvidia.__path__:
            candidate = Path(root) / "cu13" / "bin" / "nvcc"
            if candidate.is_file():
                return candidate
    except ImportError:
        pass
    found = shutil.which("nvcc")
    return Path(found) if found else None


def nvcc_version(nvcc: Path) -> str:
    out = subprocess.run([str(nvcc), "--version"], capture_output=True, text=True, check=False).stdout
    match = re.search(r"release [\d.]+, V([\d.]+)", out)
    return match.group(1) if match else out.strip().splitlines()[-1] if out.strip() else "unknown"


def compile_fatbin(source: str, archs: list[str], out: Path, nvcc: Path | None = None) -> dict:
    """Compile `source` once into a fatbin holding SASS for each of `archs` plus PTX of the
    newest (which later GPUs JIT from). Returns what the artifact records about it."""
    nvcc = nvcc or find_nvcc()
    if nvcc is None:
        raise MissingDependency("nvcc (the CUDA compiler, for ahead-of-time kernels)", NVCC_INSTALL)
    import tvm
    from tvm.support import nvcc as tvm_nvcc

    gencode = []
    for arch in archs:
        number = arch.removeprefix("sm_")
        gencode += ["-gencode", f"arch=compute_{number},code=sm_{number}"]
    newest = max(archs, key=arch_number).removeprefix("sm_")
    gencode += ["-gencode", f"arch=compute_{newest},code=compute_{newest}"]
    env_path = os.environ.get("PATH", "")
    # TVM runs "nvcc" from PATH and finds the CUDA root (headers) from it
    os.environ["PATH"] = f"{nvcc.parent}{os.pathsep}{env_path}"
    try:
        with tvm.target.Target(cuda_target(archs[0])):  # TVM reads the major version from the scope
            binary = tvm_nvcc.compile_cuda(source, target_format="fatbin", arch=gencode, compiler="nvcc")
    except Exception as exc:
        raise PassFailed("nvcc", f"{nvcc} could not compile the kernels for {', '.join(archs)}: {exc}") from exc
    finally:
        os.environ["PATH"] = env_path
    Path(out).write_bytes(bytes(binary))
    return {
        "file": Path(out).name,
        "architectures": list(archs),
        "ptx": f"compute_{newest}",
        "nvcc": nvcc_version(nvcc),
        "bytes": len(binary),
        "source_sha256": hashlib.sha256(source.encode()).hexdigest(),
    }


def lower_decoder(
    model_dir: Path,
    out_dir: Path,
    *,
    architectures: list[str] | None,
    twin: bool = True,
    cuda_graph: bool = False,
    aot: str = "auto",
    prefill_chunk_size: int = 512,
    page_size: int = 16,
    twin_target: dict | None = None,
    write_params: bool = True,
) -> dict:
    """Write the decoder of the checkpoint in `model_dir` to `out_dir`; return decoder.json's content.

    `architectures`: build the CUDA library for these (None: no CUDA library); `twin`: also the
    llvm library (the CPU twin); `aot`: "auto" compiles a fatbin when nvcc is found, "require"
    fails (exit 3) without it, "off" ships the CUDA source only (JIT-compiled at load).
    `twin_target`: the llvm target of the twin (default: this machine's CPU); `write_params`: False
    leaves the weights out (benchmarks/gpu_check.py carries the libraries to a GPU machine and
    fills them there).

    Files: model_cuda.so, kernels.cu (the CUDA source, for review), kernels.fatbin, model_llvm.so,
    params.safetensors (fused, float32) and decoder.json.
    """
    import time

    import tvm
    from safetensors.numpy import save_file

    from accelc import progress
    from accelc.runtime.cuda_tvm_backend import META_FILE, SUPPORTED_META_SCHEMA
    from accelc.targets import tvm_nn_llm

    config = tvm_nn_llm.read_config(model_dir)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta: dict = {
        "schema": SUPPORTED_META_SCHEMA,
        "config": dict(config.__dict__),
        "libraries": {},
        "param_file": "params.safetensors",
        "kv_cache": {
            "max_total_seq_len": config.max_position_embeddings,
            "prefill_chunk_size": prefill_chunk_size,
            "page_size": page_size,
        },
        "cuda_graph": bool(cuda_graph),
        "tvm_version": tvm.__version__,
        "timings": {},
    }
    names = None
    if architectures:
        oldest = min(architectures, key=arch_number)
        target = cuda_target(oldest)  # one source for every arch: nvcc compiles it for each below
        t0 = time.perf_counter()
        with progress.step(f"cuda: compile the paged-KV decoder for {oldest}"):
            executable, names, record = compile_decoder(config, target, cuda_graph=cuda_graph)
            executable.export_library(str(out_dir / "model_cuda.so"))
        meta["timings"]["cuda_compile_s"] = round(time.perf_counter() - t0, 3)
        source = cuda_source(executable)
        (out_dir / "kernels.cu").write_text(source)
        meta.update(
            libraries={"cuda": "model_cuda.so"},
            target=target,
            architectures=list(architectures),
            kernels=record,
            cuda_kernels=kernel_names(source),
            source_sha256=hashlib.sha256(source.encode()).hexdigest(),
            fatbin=None,
            nvcc=None,
        )
        nvcc = find_nvcc() if aot != "off" else None
        if nvcc is None and aot == "require":
            raise MissingDependency("nvcc (the CUDA compiler, for ahead-of-time kernels)", NVCC_INSTALL)
        if nvcc is not None:
            t0 = time.perf_counter()
            with progress.step(f"cuda: nvcc fatbin for {', '.join(architectures)}"):
                meta["fatbin"] = compile_fatbin(source, list(architectures), out_dir / "kernels.fatbin", nvcc)
            meta["nvcc"] = meta["fatbin"]["nvcc"]
            meta["timings"]["nvcc_s"] = round(time.perf_counter() - t0, 3)
    if twin:
        target = twin_target or llvm_target()
        t0 = time.perf_counter()
        with progress.step("cuda: compile the llvm twin of the decoder"):
            executable, names, _ = compile_decoder(config, target)
            executable.export_library(str(out_dir / "model_llvm.so"))
        meta["libraries"]["cpu"] = "model_llvm.so"
        meta["twin_target"] = target
        meta["timings"]["llvm_compile_s"] = round(time.perf_counter() - t0, 3)
    if names is None:
        raise UsageError("lower_decoder needs architectures or twin (nothing to build)")
    meta["params"] = names
    if write_params:
        save_file(tvm_nn_llm.fused_weights(model_dir, config, names), str(out_dir / meta["param_file"]))
    (out_dir / META_FILE).write_text(json.dumps(meta, indent=2))
    return meta
