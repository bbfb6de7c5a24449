"""Loop schedules for TVM's Relax CPU pipeline: the rules accelc applies to its own kernels.

Why hand-written rules: the default Relax CPU pipeline emits naive single-threaded loops, and
MetaSchedule (the tuner) segfaults in this wheel (tvm::ffi::ToJSONGraph). dlight's CPU GEMV
rule matched none of our kernels (checked): with a dynamic token count k every linear is a
[k, K] x [N, K]^T "NT" matmul, not a GEMV. dlight's CPU Reduction rule does match softmax and
RMSNorm but was not faster than the plain parallel rule below in one (noisy) 512-token
prefill measurement, so it is left out. (TVM 0.27 on CPU: docs/platform-notes.md section 3.)

`cpu_pipeline(target)` is the default Relax CPU pipeline with these rules inserted after fusion;
`targets/tvm_build.py` compiles with it. Import this module only after
`accelc.runtime.tvm_backend.import_tvm()`, which turns a missing TVM into MissingDependency.
"""

from __future__ import annotations

import tvm
from tvm import relax, s_tir, tirx
from tvm.relax.backend.cpu_generic import pipeline as cpu
from tvm.s_tir import dlight
from tvm.s_tir.dlight.analysis import normalize_prim_func
from tvm.s_tir.dlight.analysis.common_analysis import get_sblockrealize
from tvm.s_tir.dlight.base import get_extent
from tvm.target.codegen import llvm_get_vector_width

NT_SPLIT_OUT = 4  # outputs computed together: 4 independent FMA chains hide the FMA latency


def _loops_by_iter(sch, block) -> dict[str, list]:
    """Block iter var name -> the loops its binding uses (outermost first)."""
    realize = get_sblockrealize(sch, block)
    loops = sch.get_loops(block)
    found: dict[str, list] = {}
    for iter_var, binding in zip(realize.block.iter_vars, realize.iter_values):
        used = tirx.analysis.undefined_vars(binding)
        found[iter_var.var.name] = [lp for lp in loops if any(sch.get(lp).loop_var.same_as(u) for u in used)]
    return found


def _point_indices(region) -> list | None:
    """The index vars of a single-element buffer access A[v0, v1, ...]; None if not that form."""
    mins = []
    for rng in region.region:
        if not (isinstance(rng.min, tirx.Var) and isinstance(rng.extent, tirx.IntImm) and int(rng.extent) == 1):
            return None
        mins.append(rng.min)
    return mins


def _same_vars(found: list | None, expected: list) -> bool:
    return found is not None and len(found) == len(expected) and all(a.same_as(b) for a, b in zip(found, expected))


def _vector_lanes(target, dtype_bits: int = 32) -> int:
    bits = llvm_get_vector_width(target)
    return max((bits if bits > 0 else 128) // dtype_bits, 1)


class NTMatmul(dlight.ScheduleRule):
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


class NNMatmul(dlight.ScheduleRule):
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


def _outer_parallel_loop(sch, loops):
    """The outermost loop with extent > 1, fused with the unit loops before it (or None)."""
    prefix = []
    for loop in loops:
        prefix.append(loop)
        if get_extent(sch, loop) != 1:
            return sch.fuse(*prefix) if len(prefix) > 1 else loop
    return None


class ParallelReduction(dlight.ScheduleRule):
    """Run the other reduction kernels (attention scores and attention x V per head, softmax,
    RMSNorm) across the cores: each block's outermost non-unit spatial loop (heads, or token
    rows) becomes a parallel loop, fused with the unit loops before it.

    Only that one loop is parallelised, so the inner loops keep plain indices (fusing more
    loops would put a div/mod in every iteration). Pure elementwise kernels stay serial: at
    decode size they run in microseconds and a parallel launch would cost more than it saves.
    """

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
                sch.get(lp).loop_var.name for v, lps in roles.items() if kinds[v] == tirx.IterVar.DataPar for lp in lps
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


def _schedule_rules():
    """dlight applies the first rule that matches each kernel; unmatched kernels stay as lowered."""
    return [NTMatmul(), NNMatmul(), ParallelReduction()]


def cpu_pipeline(target):
    """The default Relax CPU pipeline with loop schedules inserted after fusion.

    FuseTransposeMatmul turns each linear's matmul(x, permute_dims(W)) into one NT_matmul kernel
    that reads W in place (the default pipeline materialises W^T on every call, which alone is
    about half of the unscheduled decode time).
    """
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
