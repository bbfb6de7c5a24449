"""Lower a Hugging Face causal LM to an Apache TVM Relax VM library with an explicit KV cache.

Three steps, each its own module: export the step function and its parameters
(`targets/tvm_export.py`), compile it with accelc's CPU schedules (`targets/tvm_schedules.py`),
and write the files the runtime (`accelc.runtime.tvm_backend`) opens.

Files written to `out_dir`:
    model.so           the compiled Relax VM library (step + truncate_kv)
    params.safetensors the weights, deduplicated (tied embeddings are stored once), unless
                       the artifact's fused ONNX graph already holds every one of them
    tvm_meta.json      names, shapes, target and TVM version; see `lower_causal_lm`

An artifact lowered for both ONNX Runtime and TVM would otherwise ship the weights twice. The
fused graph records where each parameter sits in it (compiler/fused_decoder.py, `view_arrays`),
so TVM reads its weights from that graph when every one is there bit for bit, checked here.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from accelc.errors import PassFailed, UsageError
from accelc.runtime.tvm_backend import import_tvm
from accelc.targets.tvm_export import (
    STEP_FUNC,
    SUPPORTED_DTYPE,
    TRUNCATE_FUNC,
    architecture_shapes,
    export_step,
    to_relax,
)

LIBRARY_FILE = "model.so"
PARAMS_FILE = "params.safetensors"
META_FILE = "tvm_meta.json"
META_SCHEMA = 1


def _graph_holds(graph: Path, stored: dict) -> bool:
    """Whether the ONNX graph at `graph` holds every stored tensor bit for bit."""
    import numpy as np

    from accelc.compiler.fused_decoder import view_arrays

    held = view_arrays(graph, stored)
    return held is not None and all(np.array_equal(held[k], v) for k, v in stored.items())


def host_llvm_target(num_threads: int | None = None) -> dict:
    """An LLVM target dict for this machine's CPU.

    TVM 0.27 rejects CLI target strings ("llvm -mcpu=..."), and {"mcpu": "native"} silently
    falls back to generic code, so the host CPU is named explicitly (e.g. "znver1",
    "rocketlake"), which is what turns on AVX2/AVX-512 code generation. "num-cores" is what
    TVM's tuners read for the thread count; the runtime thread pool itself follows
    TVM_NUM_THREADS (TVMStepModel sets it to all cores; TVM alone would use half).
    """
    tvm = import_tvm()
    cpu = tvm.get_global_func("tvm.codegen.llvm.GetHostCPUName")()
    return {"kind": "llvm", "mcpu": cpu, "num-cores": int(num_threads or os.cpu_count() or 1)}


def lower_causal_lm(
    model, out_dir: Path, target: dict, *, max_seq_len: int | None = None, weights_graph: Path | None = None
) -> dict:
    """Lower `model` (a loaded transformers causal LM) to `out_dir`; return the metadata written.

    `max_seq_len` bounds P + k (default: the model's max_position_embeddings); TVM uses it as the
    upper bound of the dynamic dims. `weights_graph`: a fused ONNX graph of the same model that
    ships beside the library; where it holds every parameter exactly, no params file is written
    and the metadata says `params_in_graph` (the runtime is then handed that graph).
    """
    tvm = import_tvm()
    from safetensors.numpy import save_file

    from accelc.targets.tvm_schedules import cpu_pipeline

    shapes = architecture_shapes(model)
    limit = max_seq_len or getattr(model.config, "max_position_embeddings", None)
    if not limit or limit < 1:
        raise UsageError("max_seq_len must be a positive integer (the model config names none)")
    dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    if dtype != SUPPORTED_DTYPE:
        # The runtime hands logits and KV tensors across numpy, which has no bfloat16, and the
        # CPU schedules (tvm_schedules.py) are written for fp32 vectors.
        raise UsageError(f"the TVM target lowers {SUPPORTED_DTYPE} models; got {dtype} (call model.float())")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    timings = {}
    t0 = time.perf_counter()
    try:
        exported = export_step(model, shapes, limit)
    except Exception as exc:  # torch.export errors are long; keep the first line
        raise PassFailed("tvm.export", f"torch.export of the step function failed: {exc}") from exc
    timings["export_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    try:
        mod, input_names, slots, stored = to_relax(exported, shapes, dtype)
    except Exception as exc:  # an op TVM's torch frontend does not convert, typically
        raise PassFailed("tvm.import", f"TVM's torch frontend failed: {exc}") from exc
    timings["import_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    target_obj = tvm.target.Target(target)
    try:
        executable = tvm.compile(mod, target_obj, relax_pipeline=cpu_pipeline(target_obj))
        executable.export_library(str(out_dir / LIBRARY_FILE))
    except Exception as exc:
        raise PassFailed("tvm.compile", f"tvm.compile for {target} failed: {exc}") from exc
    timings["compile_s"] = time.perf_counter() - t0

    in_graph = weights_graph is not None and _graph_holds(weights_graph, stored)
    if not in_graph:
        # safetensors, not .npz: no pickle, tensors are read one at a time without loading the
        # whole file (the runtime uploads them one by one), and it is the format HF checkpoints
        # use, so a stored weight can be diffed against its source by name.
        save_file(stored, str(out_dir / PARAMS_FILE))

    num_layers = shapes["num_layers"]
    meta = {
        "schema": META_SCHEMA,
        "family": shapes["family"],
        "function": STEP_FUNC,
        "truncate_function": TRUNCATE_FUNC,
        "inputs": input_names,  # input_ids, then past_0 .. past_{2L-1}
        "outputs": ["logits"] + [f"present_{i}" for i in range(2 * num_layers)],
        "kv_layout": "[k_0, v_0, k_1, v_1, ...] each [1, kv_heads, length, head_dim]",
        "params": slots,  # one stored tensor name per parameter slot, in call order
        "param_file": None if in_graph else PARAMS_FILE,
        "params_in_graph": in_graph,
        "library": LIBRARY_FILE,
        "num_layers": num_layers,
        "kv_heads": shapes["kv_heads"],
        "head_dim": shapes["head_dim"],
        "vocab_size": shapes["vocab_size"],
        "dtype": dtype,
        "max_seq_len": int(limit),
        "target": dict(target),
        "tvm_version": tvm.__version__,
        "timings": {k: round(v, 3) for k, v in timings.items()},
    }
    (out_dir / META_FILE).write_text(json.dumps(meta, indent=2))
    return meta
