"""Lower a Hugging Face causal LM to an Apache TVM Relax VM library with an explicit KV cache.

The artifact is one step function over the whole model,

    step(input_ids[1, k], past_0 .. past_{2L-1}, *params)
        -> (logits[1, k, V], present_0 .. present_{2L-1})

where past_{2i}/past_{2i+1} are layer i's keys/values, each [1, kv_heads, P, head_dim], and the
presents are the same tensors grown to P + k. Both k >= 1 and P >= 0 are dynamic, so one
function serves prefill (P = 0), single-token decode (k = 1) and k-token verification. The
position ids are P .. P+k-1, derived inside the graph from the past's length: a caller cannot
pass positions that disagree with the cache it passes.

Route: torch.export of a thin wrapper around the *unmodified* HF module (its own attention, RoPE,
masking and cache code), then TVM's `from_exported_program`. The wrapper seeds a DynamicCache
with the past tensors; that is the whole family-specific surface, which is why Llama, Qwen2,
GPT-2 and OPT all lower through the same code and match HF to float32 rounding.

Files written to `out_dir`:
    model.so           the compiled Relax VM library (step + truncate_kv)
    params.safetensors the weights, deduplicated (tied embeddings are stored once)
    tvm_meta.json      names, shapes, target and TVM version; see `lower_causal_lm`
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from accelc.errors import PassFailed, UsageError
from accelc.runtime.tvm_backend import import_tvm

STEP_FUNC = "step"  # the Relax function the runtime calls for prefill / decode / verify
TRUNCATE_FUNC = "truncate_kv"  # slices every past tensor to its first n positions
LIBRARY_FILE = "model.so"
PARAMS_FILE = "params.safetensors"
META_FILE = "tvm_meta.json"
META_SCHEMA = 1

# Families whose HF modules take a DynamicCache and explicit position ids, and which the tests
# check against HF. Others may lower too, but we refuse what we have not verified.
SUPPORTED_FAMILIES = ("llama", "qwen2", "gpt2", "opt")
SUPPORTED_DTYPE = "float32"

# The traced example: small enough to export fast, > 1 so torch.export cannot specialise k or P
# to the value 1 (it specialises sizes 0 and 1).
EXAMPLE_NEW_TOKENS = 3
EXAMPLE_PAST_LEN = 5


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


# --------------------------------------------------------------------------------------------
# Step 1: an exportable step function around the HF module
# --------------------------------------------------------------------------------------------


def _family_shapes(model) -> dict[str, int]:
    """Layer count, KV heads, head_dim and vocab of a supported causal LM (UsageError otherwise)."""
    config = model.config
    family = getattr(config, "model_type", None)
    if family not in SUPPORTED_FAMILIES:
        raise UsageError(
            f"TVM lowering supports the causal LM families {', '.join(SUPPORTED_FAMILIES)}; got model_type={family!r}"
        )
    if getattr(config, "use_sliding_window", False) and getattr(config, "sliding_window", None):
        # The wrapper builds a full-attention DynamicCache; sliding layers would need their own.
        raise UsageError(f"{family} with sliding-window attention is not supported by the TVM target")
    heads = config.num_attention_heads
    return {
        "family": family,
        "num_layers": config.num_hidden_layers,
        "kv_heads": getattr(config, "num_key_value_heads", None) or heads,
        "head_dim": getattr(config, "head_dim", None) or config.hidden_size // heads,
        "vocab_size": model.get_output_embeddings().weight.shape[0],
    }


def _step_wrapper(model, num_layers: int):
    """A torch module with the flat step signature, delegating all maths to `model`."""
    import torch
    from transformers import DynamicCache

    class StepWrapper(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, *past):
            # input_ids [1, k]; past[2i], past[2i+1]: [1, kv_heads, P, head_dim]
            cache = DynamicCache()
            for i in range(num_layers):
                # Seed each layer directly: DynamicLayer's lazy init concatenates onto a 1-D
                # empty tensor, which torch allows and TVM's concat rejects ("Concat expects all
                # input tensors to have same ndim"). update() on a zero-length slice initialises
                # the layer with the right dtype/device; then the past replaces its contents.
                cache.update(past[2 * i][:, :, :0], past[2 * i + 1][:, :, :0], i)
                cache.layers[i].keys, cache.layers[i].values = past[2 * i], past[2 * i + 1]
            past_len, new_len = past[0].shape[2], input_ids.shape[1]
            positions = torch.arange(past_len, past_len + new_len, device=input_ids.device)
            out = self.model(
                input_ids=input_ids,
                past_key_values=cache,
                position_ids=positions.unsqueeze(0),
                cache_position=positions,
                use_cache=True,
            )
            present = out.past_key_values
            flat = []
            for i in range(num_layers):
                flat += [present.layers[i].keys, present.layers[i].values]
            # logits [1, k, V]; presents [1, kv_heads, P + k, head_dim]
            return (out.logits, *flat)

    return StepWrapper()


def _export(model, shapes: dict[str, int], max_seq_len: int):
    """torch.export the step wrapper with dynamic k (new tokens) and P (past length)."""
    import torch
    from torch.export import Dim, export

    num_layers, kv_heads, head_dim = shapes["num_layers"], shapes["kv_heads"], shapes["head_dim"]
    wrapper = _step_wrapper(model, num_layers)
    dtype = next(model.parameters()).dtype
    ids = torch.zeros(1, EXAMPLE_NEW_TOKENS, dtype=torch.long)
    past = tuple(torch.zeros(1, kv_heads, EXAMPLE_PAST_LEN, head_dim, dtype=dtype) for _ in range(2 * num_layers))
    new_len = Dim("new_len", min=1, max=max_seq_len)
    past_len = Dim("past_len", min=0, max=max_seq_len)
    dynamic = ({1: new_len}, tuple({2: past_len} for _ in past))
    was_training = model.training
    try:
        with torch.no_grad():
            return export(wrapper.eval(), (ids, *past), dynamic_shapes=dynamic)
    finally:
        model.train(was_training)  # eval() above must not leak into the caller's model


# --------------------------------------------------------------------------------------------
# Step 2: Relax module, parameters kept out of the IR
# --------------------------------------------------------------------------------------------


def _param_sources(exported) -> dict[str, str]:
    """Relax/FX placeholder name -> storage key, so tied weights map to one stored tensor."""
    sig = exported.graph_signature
    state = exported.state_dict
    by_storage: dict[int, str] = {}
    keys: dict[str, str] = {}
    for placeholder, fqn in sig.inputs_to_parameters.items():
        tensor = state[fqn]
        storage = tensor.untyped_storage().data_ptr()
        # Store under the HF state_dict name (drop the wrapper's "model." prefix).
        keys[placeholder] = by_storage.setdefault(storage, fqn.removeprefix("model."))
    return keys


def _truncate_function(num_tensors: int, kv_heads: int, head_dim: int, dtype: str):
    """truncate_kv(past_0 .. past_{n-1}, R.Shape([n])) -> tuple of past_i[:, :, :n, :].

    TVM tensors cannot be sliced along an inner axis from Python, so the runtime calls this
    compiled slice instead of copying the whole cache through numpy.
    """
    from tvm import relax, tirx

    past_len = tirx.Var("past_len", "int64")
    keep = tirx.Var("keep", "int64")
    bb = relax.BlockBuilder()
    tensors = [
        relax.Var(f"past_{i}", relax.TensorType([1, kv_heads, past_len, head_dim], dtype)) for i in range(num_tensors)
    ]
    new_len = relax.Var("new_len", relax.ShapeType([keep]))
    with bb.function(TRUNCATE_FUNC, [*tensors, new_len]):
        with bb.dataflow():
            sliced = [
                bb.emit(relax.op.strided_slice(t, axes=[2], begin=[0], end=[keep], assume_inbound=True))
                for t in tensors
            ]
            out = bb.emit_output(relax.Tuple(sliced))
        bb.emit_func_output(out)
    return bb.get()[TRUNCATE_FUNC]


def _to_relax(exported, shapes: dict[str, int], dtype: str):
    """(IRModule with step + truncate_kv, input names, the stored-tensor name of each parameter
    slot in call order, {stored name: numpy array})."""
    tvm = import_tvm()
    from tvm import relax
    from tvm.relax.frontend.torch import from_exported_program

    mod = from_exported_program(exported, keep_params_as_input=True)
    mod, params = relax.frontend.detach_params(mod)
    step = mod["main"]
    num_inputs = int(step.attrs["num_input"])
    param_vars = step.params[num_inputs:]
    param_names = [v.name for v in param_vars]
    sources = _param_sources(exported)
    stored: dict[str, Any] = {}
    slots = []
    for name, value in zip(param_names, params["main"]):
        key = sources.get(name, name)
        slots.append(key)
        if key not in stored:
            stored[key] = value.numpy()
    trunc = _truncate_function(2 * shapes["num_layers"], shapes["kv_heads"], shapes["head_dim"], dtype)
    out = tvm.IRModule(
        {
            STEP_FUNC: step.with_attr("global_symbol", STEP_FUNC),
            TRUNCATE_FUNC: trunc.with_attr("global_symbol", TRUNCATE_FUNC),
        }
    )
    input_names = [v.name for v in step.params[:num_inputs]]
    return out, input_names, slots, stored


# --------------------------------------------------------------------------------------------
# Step 3: compile
# --------------------------------------------------------------------------------------------


# Why hand-written rules: the default Relax CPU pipeline emits naive single-threaded loops, and
# MetaSchedule (the tuner) segfaults in this wheel (tvm::ffi::ToJSONGraph). dlight's CPU GEMV
# rule matched none of our kernels (checked): with a dynamic token count k every linear is a
# [k, K] x [N, K]^T "NT" matmul, not a GEMV. dlight's CPU Reduction rule does match softmax and
# RMSNorm but was not faster than the plain parallel rule below in one (noisy) 512-token
# prefill measurement, so it is left out.

NT_SPLIT_OUT = 4  # outputs computed together: 4 independent FMA chains hide the FMA latency


def _loops_by_iter(sch, block) -> dict[str, list]:
    """Block iter var name -> the loops its binding uses (outermost first)."""
    from tvm import tirx
    from tvm.s_tir.dlight.analysis.common_analysis import get_sblockrealize

    realize = get_sblockrealize(sch, block)
    loops = sch.get_loops(block)
    found: dict[str, list] = {}
    for iter_var, binding in zip(realize.block.iter_vars, realize.iter_values):
        used = tirx.analysis.undefined_vars(binding)
        found[iter_var.var.name] = [lp for lp in loops if any(sch.get(lp).loop_var.same_as(u) for u in used)]
    return found


def _point_indices(region) -> list | None:
    """The index vars of a single-element buffer access A[v0, v1, ...]; None if not that form."""
    from tvm import tirx

    mins = []
    for rng in region.region:
        if not (isinstance(rng.min, tirx.Var) and isinstance(rng.extent, tirx.IntImm) and int(rng.extent) == 1):
            return None
        mins.append(rng.min)
    return mins


def _same_vars(found: list | None, expected: list) -> bool:
    return found is not None and len(found) == len(expected) and all(a.same_as(b) for a, b in zip(found, expected))


def _vector_lanes(target, dtype_bits: int = 32) -> int:
    from tvm.target.codegen import llvm_get_vector_width

    bits = llvm_get_vector_width(target)
    return max((bits if bits > 0 else 128) // dtype_bits, 1)


def _nt_matmul_rule():
    """Schedule C[i, n] = sum_j A[i, j] * W[n, j] (every nn.Linear, lm_head included).

    Loop nest produced, for one thread's slice of outputs (the outer n loop is parallel):

        for n_o in parallel(N / NT_SPLIT_OUT):
          for i in range(k):                        # token rows (dynamic)
            acc[NT_SPLIT_OUT, lanes] = 0
            for j_o in range(K / lanes):            # walk the weight rows once per token
              for n_i in unroll(NT_SPLIT_OUT):
                acc[n_i, :] += A[i, j_o*lanes:+lanes] * W[n, j_o*lanes:+lanes]   # one FMA
            C[i, n_o*NT_SPLIT_OUT + n_i] = sum(acc[n_i, :])                      # rfactor

    W keeps its PyTorch [N, K] layout (contiguous along j), so the tied embedding serves both
    the lookup and the lm_head without a transposed copy. For k = 1 this streams every weight
    once, which is the bound for decode.
    """
    from tvm import s_tir, tirx
    from tvm.s_tir import dlight
    from tvm.s_tir.dlight.analysis import normalize_prim_func
    from tvm.s_tir.dlight.base import get_extent

    class NTMatmul(dlight.ScheduleRule):
        def apply(self, func, target, _tunable):
            if target.kind.name != "llvm":
                return None
            sch = s_tir.Schedule(func)
            infos = normalize_prim_func(sch)
            if not infos or len(infos) != 1 or infos[0].dom_kind() != "SSR":
                return None
            block = infos[0].block_rv
            stmt = sch.get(block)
            i_var, n_var, j_var = (it.var for it in stmt.iter_vars)
            # Exactly C[i, n] = sum_j A[i, j] * W[n, j]: both operands contiguous along j.
            reads = [_point_indices(r) for r in stmt.reads]
            if not (
                len(stmt.writes) == 1
                and _same_vars(_point_indices(stmt.writes[0]), [i_var, n_var])
                and len(reads) == 2
                and any(_same_vars(r, [i_var, j_var]) for r in reads)
                and any(_same_vars(r, [n_var, j_var]) for r in reads)
            ):
                return None
            lanes = _vector_lanes(target)
            i, n, j = sch.get_loops(block)
            n_ext, j_ext = get_extent(sch, n), get_extent(sch, j)
            if not (isinstance(n_ext, int) and isinstance(j_ext, int)):
                return None
            if n_ext % NT_SPLIT_OUT or j_ext % lanes:
                return None
            try:
                n_o, n_i = sch.split(n, [None, NT_SPLIT_OUT])
                j_o, j_i = sch.split(j, [None, lanes])
                sch.reorder(n_o, i, n_i, j_o, j_i)
                # acc's lane axis last, so one vector register holds one output's partial sums.
                partial = sch.rfactor(j_i, factor_axis=2)
                sch.compute_at(partial, sch.get_loops(block)[1])
                # compute_at regenerates the partial block's loops in iter-var order; put them
                # back as (j_o, n_i, lane). Roles by binding: the reduction iter is j_o, the
                # output iter is the one also bound to the parallel n_o loop, the lane iter the
                # remaining one with a loop of its own (the row iter is bound to i alone).
                roles = _loops_by_iter(sch, partial)
                kinds = {it.var.name: it.iter_type for it in sch.get(partial).iter_vars}
                red = next(v for v, k in kinds.items() if k == tirx.IterVar.CommReduce)
                out = next(v for v, lp in roles.items() if v != red and len(lp) == 2)
                lane = next(
                    v
                    for v, lp in roles.items()
                    if v not in (red, out) and lp and not sch.get(lp[0]).loop_var.same_as(sch.get(i).loop_var)
                )
                sch.reorder(roles[red][-1], roles[out][-1], roles[lane][-1])
                sch.set_scope(partial, 0, "local")
                sch.parallel(n_o)
                loops = sch.get_loops(partial)
                sch.vectorize(loops[-1])
                sch.unroll(loops[-2])
                sch.decompose_reduction(partial, loops[-3])
            except Exception:
                return None
            return sch

    return NTMatmul()


def _nn_matmul_rule():
    """Schedule batched C[b, i, n] = sum_r A[b, i, r] * B[b, r, n]: attention scores (B = K^T,
    n = past + new positions) and attention x V (n = head_dim).

    As lowered, r is the innermost loop and walks B down a column (stride n): at a 256-token
    prefill these two kernels were over half the time. Moving r above n makes the inner loop
    an axpy over contiguous rows of B and C:

        for b in parallel(heads):
          for i in range(k):
            C[b, i, :] = 0
            for r in range(R):
              C[b, i, :] += A[b, i, r] * B[b, r, :]      # vectorised over n

    n is vectorised explicitly when static (head_dim); when dynamic (P + k) LLVM's loop
    vectoriser handles the plain counted loop.
    """
    from tvm import s_tir
    from tvm.s_tir import dlight
    from tvm.s_tir.dlight.analysis import normalize_prim_func
    from tvm.s_tir.dlight.base import get_extent

    class NNMatmul(dlight.ScheduleRule):
        def apply(self, func, target, _tunable):
            if target.kind.name != "llvm":
                return None
            sch = s_tir.Schedule(func)
            infos = normalize_prim_func(sch)
            if not infos or len(infos) != 1:
                return None
            kind = infos[0].dom_kind()
            if not (kind.endswith("SSR") and set(kind[:-1]) == {"S"}):
                return None
            block = infos[0].block_rv
            stmt = sch.get(block)
            *spatial, r_var = (it.var for it in stmt.iter_vars)
            *batch, i_var, n_var = spatial
            reads = [_point_indices(r) for r in stmt.reads]
            if not (
                len(stmt.writes) == 1
                and _same_vars(_point_indices(stmt.writes[0]), spatial)
                and len(reads) == 2
                and any(_same_vars(r, [*batch, i_var, r_var]) for r in reads)
                and any(_same_vars(r, [*batch, r_var, n_var]) for r in reads)
            ):
                return None
            lanes = _vector_lanes(target)
            try:
                *outer, n, r = sch.get_loops(block)
                sch.reorder(r, n)
                parallel = _outer_parallel_loop(sch, outer)
                if parallel is not None:
                    sch.parallel(parallel)
                n_ext = get_extent(sch, n)
                if isinstance(n_ext, int) and n_ext % lanes == 0:
                    sch.vectorize(sch.split(n, [None, lanes])[1])
                sch.decompose_reduction(block, r)
            except Exception:
                return None
            return sch

    return NNMatmul()


def _outer_parallel_loop(sch, loops):
    """The outermost loop with extent > 1, fused with the unit loops before it (or None)."""
    from tvm.s_tir.dlight.base import get_extent

    prefix = []
    for loop in loops:
        prefix.append(loop)
        if get_extent(sch, loop) != 1:
            return sch.fuse(*prefix) if len(prefix) > 1 else loop
    return None


def _parallel_reduction_rule():
    """Run the other reduction kernels (attention scores and attention x V per head, softmax,
    RMSNorm) across the cores: each block's outermost non-unit spatial loop (heads, or token
    rows) becomes a parallel loop, fused with the unit loops before it.

    Only that one loop is parallelised, so the inner loops keep plain indices (fusing more
    loops would put a div/mod in every iteration). Pure elementwise kernels stay serial: at
    decode size they run in microseconds and a parallel launch would cost more than it saves.
    """
    from tvm import s_tir, tirx
    from tvm.s_tir import dlight
    from tvm.s_tir.dlight.base import get_extent

    class ParallelReduction(dlight.ScheduleRule):
        def apply(self, func, target, _tunable):
            if target.kind.name != "llvm":
                return None
            sch = s_tir.Schedule(func)
            blocks = sch.get_child_blocks(sch.get_sblock("root"))
            if not any(it.iter_type == tirx.IterVar.CommReduce for b in blocks for it in sch.get(b).iter_vars):
                return None
            changed = False
            for block in blocks:
                roles = _loops_by_iter(sch, block)
                kinds = {it.var.name: it.iter_type for it in sch.get(block).iter_vars}
                spatial_loops = {
                    sch.get(lp).loop_var.name
                    for v, lps in roles.items()
                    if kinds[v] == tirx.IterVar.DataPar
                    for lp in lps
                }
                prefix = []
                for loop in sch.get_loops(block):
                    if sch.get(loop).loop_var.name not in spatial_loops:
                        break
                    prefix.append(loop)
                    if get_extent(sch, loop) != 1:
                        break
                if not prefix or get_extent(sch, prefix[-1]) == 1:
                    continue
                try:
                    sch.parallel(sch.fuse(*prefix) if len(prefix) > 1 else prefix[0])
                    changed = True
                except Exception:
                    continue
            return sch if changed else None

    return ParallelReduction()


def _schedule_rules():
    """dlight applies the first rule that matches each kernel; unmatched kernels stay as lowered."""
    return [_nt_matmul_rule(), _nn_matmul_rule(), _parallel_reduction_rule()]


def cpu_pipeline(target):
    """The default Relax CPU pipeline with loop schedules inserted after fusion.

    FuseTransposeMatmul turns each linear's matmul(x, permute_dims(W)) into one NT_matmul kernel
    that reads W in place (the default pipeline materialises W^T on every call, which alone is
    about half of the unscheduled decode time).
    """
    import tvm
    from tvm import relax
    from tvm.relax.backend.cpu_generic import pipeline as cpu
    from tvm.s_tir import dlight

    passes = (
        cpu.library_dispatch_passes(target)
        + [relax.transform.FuseTransposeMatmul()]
        + cpu.legalize_passes(target)
        + [dlight.ApplyDefaultSchedule(*_schedule_rules())]
        + cpu.dataflow_lower_passes(target)
        + cpu.finalize_passes(target)
    )

    @tvm.transform.module_pass(opt_level=0, name="AccelcCPUPipeline")
    def _pipeline(mod, _ctx):
        with target:
            return tvm.transform.Sequential(passes)(mod)

    return _pipeline


def lower_causal_lm(model, out_dir: Path, target: dict, *, max_seq_len: int | None = None) -> dict:
    """Lower `model` (a loaded transformers causal LM) to `out_dir`; return the metadata written.

    `max_seq_len` bounds P + k (default: the model's max_position_embeddings); TVM uses it as the
    upper bound of the dynamic dims.
    """
    tvm = import_tvm()
    from safetensors.numpy import save_file

    shapes = _family_shapes(model)
    limit = max_seq_len or getattr(model.config, "max_position_embeddings", None)
    if not limit or limit < 1:
        raise UsageError("max_seq_len must be a positive integer (the model config names none)")
    dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    if dtype != SUPPORTED_DTYPE:
        # The runtime hands logits and KV tensors across numpy, which has no bfloat16, and the
        # CPU schedules above are written for fp32 vectors.
        raise UsageError(f"the TVM target lowers {SUPPORTED_DTYPE} models; got {dtype} (call model.float())")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    timings = {}
    t0 = time.perf_counter()
    try:
        exported = _export(model, shapes, limit)
    except Exception as exc:  # torch.export errors are long; keep the first line
        raise PassFailed("tvm.export", f"torch.export of the step function failed: {exc}") from exc
    timings["export_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    try:
        mod, input_names, slots, stored = _to_relax(exported, shapes, dtype)
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

    # safetensors, not .npz: no pickle, tensors are read one at a time without loading the
    # whole file (the runtime uploads them one by one), and it is the format HF checkpoints use,
    # so a stored weight can be diffed against its source by name.
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
        "param_file": PARAMS_FILE,
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
