"""jacobi: choose how each TarFlow block is inverted when sampling, by predicted wall time.

Every schedule of loops/flow_sampling.py solves a block in chunks of some length: 1 is
sequential decoding with the KV cache, the whole block is Jacobi, lengths between are
Gauss-Seidel-Jacobi (arXiv 2505.12849). The pass runs each candidate chunk length over
calibration noise on the chosen backend, recording the calls each block needs to reach the
relative-change tolerance, times one call of each length at the deployment batch, and gives
each block the length with the smallest predicted time (calls x cost per call): SeJD's selection
(arXiv 2505.24791) generalised to GS-Jacobi's chunks and priced on this machine. Sequential is
kept where nothing else is predicted at least `min_gain` faster, since the prediction has noise.

The stopping tolerance is chosen the same way, under a quality bound: every tolerance of `tol`
and `looser_tols` gets its own schedule, whose calibration samples are drawn and compared, as
images after the denoising step, with the sequential samples of the same noise; the fastest
predicted schedule whose mean absolute pixel difference stays within `max_pixel_diff` is
planned (by default 0.001 of the pixel range, a quarter of an 8-bit grey level: on the
Fashion-MNIST flow, tolerance 1e-2 moves samples by half a grey level on average and changes the
class of 1% of them, docs/flows.md, so it is not taken). The schedule goes into the family's
decode plan (families/tarflow.py `decode_plan`).

On ORT the calls are timed at several intra-op thread counts (1, 2, 4, ... up to one per usable
core) unless `threads` pins one, and the plan keeps the count its schedule is fastest at, which
sampling then runs with. At batch 1 a one-token step is call overhead, and waking a second
thread for it costs more than it saves (docs/flows.md, session 18: 62 us at one thread, 98 at
two); the predicted gain is over sequential at its own fastest count.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import Field

from accelc.compiler import registry


@registry.register_pass
class Jacobi(registry.Pass):
    """Per-block sampling schedule of a TarFlow (sequential, Jacobi, GS-Jacobi) by predicted wall time."""

    name = "jacobi"
    version = 3
    families = ("tarflow",)
    produces = ("plan",)

    class Params(registry.Params):
        backend: Literal["torch", "ort"] = Field("ort", description="where calls are timed (ort: after export_flow)")
        batch: int = Field(64, gt=0, le=4096, description="samples drawn together at run time")
        tol: float = Field(1e-3, ge=0, lt=1, description="relative-change stopping threshold per chunk")
        looser_tols: list[Annotated[float, Field(gt=0, lt=1)]] = Field(
            default_factory=lambda: [3e-3, 1e-2],
            description="looser thresholds tried too; planned only within max_pixel_diff of sequential",
        )
        max_pixel_diff: float = Field(
            1e-3,
            ge=0,
            le=1,
            description="quality bound: mean absolute difference of the calibration samples from the "
            "sequential ones (pixels in [0, 1], after the denoising step)",
        )
        chunks: list[int] = Field(
            default_factory=lambda: [8, 16], description="GS-Jacobi chunk lengths tried besides 1 and the whole block"
        )
        threads: int = Field(
            0,
            ge=0,
            description="ORT intra-op threads to sample with (0: time 1, 2, 4, ... per core and plan the fastest)",
        )
        min_gain: float = Field(1.05, ge=1, description="keep sequential unless predicted this much faster")
        seed: int = 10_000

    @classmethod
    def flow(cls, params):
        return ("onnx_graph",) if params.backend == "ort" else (), cls.produces, cls.drops

    def run(self, bundle, ctx):
        import numpy as np

        from accelc import progress
        from accelc.families import tarflow_model
        from accelc.families.tarflow_run import to_images
        from accelc.loops import flow_sampling as fs

        p = self.params
        counts = thread_counts(p.threads, p.backend)
        flows = {t: self._open(bundle, t) for t in counts}
        flow = flows[counts[0]]  # calls to a tolerance do not depend on the thread count
        steps = flow.tokens - 1
        candidates = sorted({1, steps, *(c for c in p.chunks if 1 < c < steps)})
        z = fs.prior_noise(flow, p.batch, p.seed)
        timed = [(t, c) for t in counts for c in candidates]
        costs_by_threads: dict[int, dict[int, float]] = {t: {} for t in counts}
        for t, c in progress.bar(timed, desc="jacobi: time calls"):
            costs_by_threads[t][c] = fs.call_cost(flows[t], p.batch, c)
        reference, stats = fs.sample(flow, z, fs.FlowSchedule.sequential(len(flow.blocks)))
        model = tarflow_model.load(bundle.model_dir)  # the model of record denoises the samples compared
        reference_images = to_images(model, reference)
        tried = []
        for tol in progress.bar(sorted({p.tol, *p.looser_tols}), desc="jacobi: calibrate tolerances"):
            calls = {1: stats.calls}
            for chunk in candidates[1:]:
                schedule = fs.FlowSchedule.uniform("calibration", len(flow.blocks), chunk, tol)
                calls[chunk] = fs.sample(flow, z, schedule)[1].calls
            threads, chosen, gain = fs.cheapest_threads(calls, costs_by_threads, p.min_gain)
            schedule = fs.FlowSchedule(schedule_name(chosen, steps), tuple(fs.BlockSchedule(c, tol) for c in chosen))
            images = to_images(model, fs.sample(flow, z, schedule)[0])
            diff = float(np.abs(images - reference_images).mean())
            tried.append(Tried(tol, schedule, calls, gain, diff, threads))
        best = fastest_within(tried, p.max_pixel_diff, p.min_gain)
        if best is None:
            sequential = fs.FlowSchedule.sequential(len(flow.blocks))
            best = Tried(p.tol, sequential, tried[0].calls, 1.0, 0.0, fs.fastest_step_threads(costs_by_threads))
            reason = (
                f"no schedule within {p.max_pixel_diff:.4f} of sequential was predicted {p.min_gain}x faster "
                f"(best {max(t.gain for t in tried):.2f}x)"
            )
        else:
            reason = (
                f"predicted {best.gain:.2f}x faster than sequential at batch {p.batch} on {p.backend}, tol {best.tol:g}, "
                f"mean pixel difference {best.pixel_diff:.5f}"
            )
        if p.backend == "ort":
            reason += f", {best.threads} thread{'s' * (best.threads > 1)}"
        costs = costs_by_threads[best.threads]
        chosen = [b.chunk for b in best.schedule.blocks]
        predicted = sum(best.calls[c][b] * costs[c] for b, c in enumerate(chosen))
        sequential = min(sum(best.calls[1][b] * by[1] for b in range(len(chosen))) for by in costs_by_threads.values())
        progress.status(f"jacobi: {best.schedule.name} {chosen} ({reason})")
        plan = {
            "schedule": best.schedule.to_json(),
            "batch": p.batch,
            "backend": p.backend,
            "threads": best.threads or None,
            "tol": best.tol,
            "call_cost_s": {str(c): costs[c] for c in candidates},
            "call_cost_s_by_threads": {
                str(t): {str(c): by[c] for c in candidates} for t, by in costs_by_threads.items()
            },
            "calls_per_block": {str(c): best.calls[c] for c in candidates},
            "predicted_s": predicted,
            "predicted_sequential_s": sequential,
            "predicted_speedup": sequential / predicted,
            "tolerances": [t.to_json() for t in tried],
            "max_pixel_diff": p.max_pixel_diff,
            "reason": reason,
        }
        return bundle.evolve(plan={**bundle.plan, "flow": plan})

    def _open(self, bundle, threads: int):
        from accelc.families import tarflow_model
        from accelc.runtime.flow import torch_flow_model

        if self.params.backend == "torch":
            return torch_flow_model(tarflow_model.load(bundle.model_dir))
        from accelc.passes.export_flow import FLOW_GRAPH
        from accelc.runtime.flow_ort import ort_flow_model

        session = {"intra_op_threads": threads, "allow_spinning": False}
        return ort_flow_model(bundle.graphs[FLOW_GRAPH], session)


@dataclass(frozen=True)
class Tried:
    """One tolerance's calibration: its cheapest schedule, the calls behind it, its predicted gain
    over sequential and its samples' mean absolute pixel difference from sequential's."""

    tol: float
    schedule: object  # loops/flow_sampling.FlowSchedule
    calls: dict[int, list[int]]
    gain: float
    pixel_diff: float
    threads: int = 0  # the ORT intra-op threads the schedule is fastest at (0: the backend's own)

    def to_json(self) -> dict:
        return {
            "tol": self.tol,
            "schedule": self.schedule.to_json(),
            "predicted_speedup": self.gain,
            "mean_pixel_diff": self.pixel_diff,
            "threads": self.threads or None,
        }


def fastest_within(tried: list[Tried], max_pixel_diff: float, min_gain: float) -> Tried | None:
    """The tolerance with the largest predicted gain (ties: the stricter) among those whose samples
    stay within `max_pixel_diff` and that gain at least `min_gain`; None when none does."""
    within = [t for t in tried if t.pixel_diff <= max_pixel_diff and t.gain >= min_gain]
    return max(within, key=lambda t: (t.gain, -t.tol)) if within else None


def thread_counts(pinned: int, backend: str) -> list[int]:
    """The intra-op thread counts to time: the pinned one, torch's own (0), or 1, 2, 4, ... and
    the usable cores for ORT."""
    import os

    if pinned or backend != "ort":
        return [pinned]
    cores = len(os.sched_getaffinity(0))
    return sorted({*(1 << k for k in range(cores.bit_length()) if 1 << k <= cores), cores})


def schedule_name(chunks: list[int], steps: int) -> str:
    """sequential, jacobi, sejd (each block one or the other) or gs_jacobi (chunks in between)."""
    kinds = set(chunks)
    if kinds == {1}:
        return "sequential"
    if kinds == {steps}:
        return "jacobi"
    return "sejd" if kinds <= {1, steps} else "gs_jacobi"
