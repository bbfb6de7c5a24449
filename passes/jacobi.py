"""jacobi: choose how each TarFlow block is inverted when sampling, by predicted wall time.

Every schedule of loops/flow_sampling.py solves a block in chunks of some length: 1 is
sequential decoding with the KV cache, the whole block is Jacobi, lengths between are
Gauss-Seidel-Jacobi (arXiv 2505.12849). The pass runs each candidate chunk length over
calibration noise on the chosen backend, recording the calls each block needs to reach the
relative-change tolerance, times one call of each length at the deployment batch, and gives
each block the length with the smallest predicted time (calls x cost per call): SeJD's selection
(arXiv 2505.24791) generalised to GS-Jacobi's chunks and priced on this machine. Sequential is
kept where nothing else is predicted at least `min_gain` faster, since the prediction has noise.
The schedule goes into the family's decode plan (families/tarflow.py `decode_plan`).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from accelc.compiler import registry


@registry.register_pass
class Jacobi(registry.Pass):
    """Per-block sampling schedule of a TarFlow (sequential, Jacobi, GS-Jacobi) by predicted wall time."""

    name = "jacobi"
    version = 1
    families = ("tarflow",)
    produces = ("plan",)

    class Params(registry.Params):
        backend: Literal["torch", "ort"] = Field("ort", description="where calls are timed (ort: after export_flow)")
        batch: int = Field(64, gt=0, le=4096, description="samples drawn together at run time")
        tol: float = Field(1e-3, ge=0, lt=1, description="relative-change stopping threshold per chunk")
        chunks: list[int] = Field(
            default_factory=lambda: [8, 16], description="GS-Jacobi chunk lengths tried besides 1 and the whole block"
        )
        threads: int = Field(0, ge=0, description="ORT intra-op threads while timing (0: one per core)")
        min_gain: float = Field(1.05, ge=1, description="keep sequential unless predicted this much faster")
        seed: int = 10_000

    @classmethod
    def flow(cls, params):
        return ("onnx_graph",) if params.backend == "ort" else (), cls.produces, cls.drops

    def run(self, bundle, ctx):
        from accelc import progress
        from accelc.loops import flow_sampling as fs

        p = self.params
        flow = self._open(bundle)
        steps = flow.tokens - 1
        candidates = sorted({1, steps, *(c for c in p.chunks if 1 < c < steps)})
        z = fs.prior_noise(flow, p.batch, p.seed)
        costs, calls = {}, {}
        for chunk in progress.bar(candidates, desc="jacobi: calibrate chunk lengths"):
            costs[chunk] = fs.call_cost(flow, p.batch, chunk)
            _, stats = fs.sample(flow, z, fs.FlowSchedule.uniform("calibration", len(flow.blocks), chunk, p.tol))
            calls[chunk] = stats.calls
        chosen, gain = fs.cheapest_chunks(calls, costs, p.min_gain)
        if gain < p.min_gain:
            reason = f"no schedule predicted {p.min_gain}x faster than sequential (best {gain:.2f}x)"
        else:
            reason = f"predicted {gain:.2f}x faster than sequential at batch {p.batch} on {p.backend}"
        predicted = sum(calls[c][b] * costs[c] for b, c in enumerate(chosen))
        sequential = sum(calls[1][b] * costs[1] for b in range(len(chosen)))
        schedule = fs.FlowSchedule(schedule_name(chosen, steps), tuple(fs.BlockSchedule(c, p.tol) for c in chosen))
        progress.status(f"jacobi: {schedule.name} {chosen} ({reason})")
        plan = {
            "schedule": schedule.to_json(),
            "batch": p.batch,
            "backend": p.backend,
            "call_cost_s": {str(c): costs[c] for c in candidates},
            "calls_per_block": {str(c): calls[c] for c in candidates},
            "predicted_s": predicted,
            "predicted_sequential_s": sequential,
            "predicted_speedup": sequential / predicted,
            "reason": reason,
        }
        return bundle.evolve(plan={**bundle.plan, "flow": plan})

    def _open(self, bundle):
        from accelc.families import tarflow_model
        from accelc.runtime.flow import torch_flow_model

        if self.params.backend == "torch":
            return torch_flow_model(tarflow_model.load(bundle.model_dir))
        from accelc.passes.export_flow import FLOW_GRAPH
        from accelc.runtime.flow_ort import ort_flow_model

        session = {"intra_op_threads": self.params.threads, "allow_spinning": False}
        return ort_flow_model(bundle.graphs[FLOW_GRAPH], session)


def schedule_name(chunks: list[int], steps: int) -> str:
    """sequential, jacobi, sejd (each block one or the other) or gs_jacobi (chunks in between)."""
    kinds = set(chunks)
    if kinds == {1}:
        return "sequential"
    if kinds == {steps}:
        return "jacobi"
    return "sejd" if kinds <= {1, steps} else "gs_jacobi"
