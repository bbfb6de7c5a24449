"""How a TarFlow artifact is proved (parity, quality) and benchmarked (schedules side by side).

Parity: on every lowered backend, each block's full call and cached step against the torch
model of record, and a sample drawn with the planned schedule against torch's with the same
schedule and noise (max abs difference, at most `eval.parity.atol`). Quality, recorded not
gated: how far the planned schedule's sample lies from the sequential one (the price of its
tolerance), the bits per dimension of those samples under the model, and, for a 28 x 28 grey
model, of Fashion-MNIST test images (noise-augmented as in training). Benchmark: sequential,
Jacobi, GS-Jacobi and the planned schedule, timed in turn on the same noise, `repeats` rounds,
medians and paired speedups against sequential.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import numpy as np

from accelc import progress

PARITY_SAMPLES = 8
TEST_IMAGES = 1000  # a fixed prefix of the test split: enough for bits/dim to 0.01, quick on CPU
GS_CHUNK = 16


def _calls(block, z: np.ndarray) -> list[np.ndarray]:
    """A block's outputs for z: the full call, then the cached step over it in two extends (so a
    non-empty cache is read too)."""
    half = z.shape[1] // 2
    state, a, b = block.extend(block.empty(len(z)), z[:, :half])
    _, a2, b2 = block.extend(state, z[:, half:])
    return [*block.params(z), a, b, a2, b2]


def block_parity(flow, reference, z: np.ndarray) -> float:
    """Max abs difference of every block's calls on `flow` from the reference's."""
    return max(
        float(np.abs(x - y).max())
        for ours, theirs in zip(flow.blocks, reference.blocks)
        for x, y in zip(_calls(ours, z), _calls(theirs, z))
    )


def prove(directory: Path, recipe, manifest: dict) -> tuple[dict, bool]:
    import torch

    from accelc.families.tarflow_run import read_plan, torch_model
    from accelc.loops.flow_sampling import FlowSchedule, prior_noise, sample
    from accelc.runtime.artifact import Artifact

    art = Artifact(directory)
    reports = directory / "reports"
    reports.mkdir(exist_ok=True)
    plan = read_plan(art)
    schedule = FlowSchedule.from_json(plan["schedule"])
    atol = recipe.eval.parity.atol
    model = torch_model(art)
    reference = art.step_model("torch")
    z = prior_noise(reference, PARITY_SAMPLES, seed=12345)
    with progress.step("TarFlow parity"):
        sequential, _ = sample(reference, z, FlowSchedule.sequential(len(reference.blocks)))
        planned, _ = sample(reference, z, schedule)
        validation = {"atol": atol, "samples": PARITY_SAMPLES, "schedule": schedule.name, "backends": {}}
        for name in art.backends():
            if name == "torch":
                continue
            flow = art.step_model(name)
            got, _ = sample(flow, z, schedule)
            blocks = block_parity(flow, reference, z)
            samples = float(np.abs(got - planned).max())
            verdict = "pass" if max(blocks, samples) <= atol else "fail"
            validation["backends"][name] = {"blocks_max_abs_diff": blocks, "sample_max_abs_diff": samples}
            validation["backends"][name]["verdict"] = verdict
    with progress.step("TarFlow quality"), torch.no_grad():
        quality = {
            "schedule": schedule.name,
            "schedule_max_abs_diff_from_sequential": float(np.abs(planned - sequential).max()),
            "samples_bits_per_dim": float(model.bits_per_dim(torch.from_numpy(planned)).mean()),
            "sequential_samples_bits_per_dim": float(model.bits_per_dim(torch.from_numpy(sequential)).mean()),
        }
        config = model.config
        if (config.image_size, config.channels) == (28, 1):
            from accelc.families.tarflow_train import test_bits_per_dim
            from accelc.images import fashion_mnist

            images, _ = fashion_mnist("test")
            quality["test_bits_per_dim"] = test_bits_per_dim(model, images[:TEST_IMAGES])
            quality["test_images"] = TEST_IMAGES
    (reports / "validation.json").write_text(json.dumps(validation, indent=2))
    (reports / "quality.json").write_text(json.dumps(quality, indent=2))
    verdicts = {name: r["verdict"] for name, r in validation["backends"].items()}
    metrics = {
        "validation": verdicts,
        "max_abs_diff": {
            n: max(r["blocks_max_abs_diff"], r["sample_max_abs_diff"]) for n, r in validation["backends"].items()
        },
        "quality": quality,
        "schedule": schedule.name,
    }
    bench_spec = recipe.eval.bench
    if bench_spec.enabled:
        chosen = [b for b in bench_spec.backends if b in art.backends()]
        result = bench(art, bench_spec.model_copy(update={"backends": chosen}))
        (reports / "bench.json").write_text(json.dumps(result, indent=2))
        plot(result, reports / "bench.png")
        metrics["speedup_vs_sequential"] = {
            name: r[schedule.name]["speedup_vs_sequential"] for name, r in result["backends"].items()
        }
    ok = all(v == "pass" for v in verdicts.values())
    if not ok:
        failed = ", ".join(n for n, v in verdicts.items() if v != "pass")
        metrics["failure"] = f"{failed} differs from the torch TarFlow by more than {atol} (reports/validation.json)"
    return metrics, ok


def bench(art, spec) -> dict:
    """Each schedule on each of `spec.backends` this artifact has, in turn on the same noise, `spec.repeats` rounds,
    at the plan's batch and threads: median wall seconds, paired speedup against sequential, calls, iterations."""
    from accelc.families.tarflow_run import read_plan
    from accelc.loops.flow_sampling import FlowSchedule, prior_noise, sample

    plan = read_plan(art)
    planned = FlowSchedule.from_json(plan["schedule"])
    tol = planned.blocks[0].tol or 1e-3
    protocol = {"batch": plan["batch"], "threads": plan.get("threads"), "repeats": spec.repeats, "tol": tol}
    result = {"protocol": protocol, "backends": {}}
    for name in [b for b in spec.backends if b in art.backends()] or ["torch"]:
        flow = art.step_model(name, threads=plan.get("threads"))
        schedules = {
            s.name: s
            for s in (
                FlowSchedule.sequential(len(flow.blocks)),
                FlowSchedule.jacobi(flow, tol),
                FlowSchedule.gs_jacobi(flow, GS_CHUNK, tol),
                planned,
            )
        }
        times = {s: [] for s in schedules}
        runs = {}
        for r in progress.bar(range(spec.repeats), desc=f"bench {name}"):
            z = prior_noise(flow, int(plan["batch"]), seed=r)
            for s, schedule in schedules.items():
                _, stats = sample(flow, z, schedule)
                times[s].append(sum(stats.seconds))
                runs[s] = stats
        result["backends"][name] = {
            s: {
                "wall_s_median": statistics.median(times[s]),
                "speedup_vs_sequential": statistics.median(a / b for a, b in zip(times["sequential"], times[s])),
                "calls": runs[s].total_calls,
                "iterations_per_block": runs[s].iterations,
            }
            for s in schedules
        }
    return result


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    backends = list(result["backends"])
    fig, axes = plt.subplots(1, len(backends), figsize=(5 * len(backends), 3.6), squeeze=False)
    for ax, name in zip(axes[0], backends):
        rows = result["backends"][name]
        ax.bar(list(rows), [r["wall_s_median"] for r in rows.values()], color="tab:blue")
        for i, r in enumerate(rows.values()):
            ax.text(i, r["wall_s_median"], f"{r['speedup_vs_sequential']:.2f}x", ha="center", va="bottom", fontsize=8)
        ax.set_title(f"{name}: batch {result['protocol']['batch']}, median of {result['protocol']['repeats']}")
        ax.set_ylabel("sampling seconds")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report_bench(art, result: dict, figure: Path) -> None:
    plot(result, figure)
    print(f"{'backend':<8} {'schedule':<11} {'seconds':>8} {'x seq':>6} {'calls':>6}  iterations per block")
    for name, rows in result["backends"].items():
        for s, r in rows.items():
            print(
                f"{name:<8} {s:<11} {r['wall_s_median']:>8.3f} {r['speedup_vs_sequential']:>6.2f} "
                f"{r['calls']:>6}  {r['iterations_per_block']}"
            )
