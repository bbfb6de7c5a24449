"""Sampling the Fashion-MNIST TarFlow: sequential vs Jacobi, GS-Jacobi and SeJD, side by side.

    python -m benchmarks.jacobi_flow --json OUT.json [--samples 64] [--batch B] [--backend torch|ort]
                                     [--rounds 3] [--tol 1e-3] [--chunk 16] [--threads N]
                                     [--reference-threads N ...] [--quick]

The model is `tarflow-fmnist` (`accelc train tarflow-fmnist` builds it), run through the
flow-block protocol (runtime/flow.py) by torch eager or by ONNX Runtime on its exported blocks.
The samples are drawn `batch` at a time (all at once by default; 1 is one image at a time, the
latency case). Each round draws the samples' prior noise and samples it with every schedule
(loops/flow_sampling.py), in turn, so the speedups are paired ratios of times measured side by
side. SeJD's per-block choice comes from Jacobi iterations on separate calibration noise and the
measured cost of a Jacobi call in one-token steps at this batch. Rows (`part` "flow"): wall
seconds (median), speedup against sequential (median paired ratio), model calls, iterations per
block, the largest and the mean pixel difference (in [0, 1] units, after the denoising step)
from the sequential sample of the same noise, the bits per dimension of the samples under the
model, and `class_agreement`: the fraction of samples that the project's Fashion-MNIST classifier
(`accelc train fmnist-cnn`; null when it is not trained) puts in the class of the sequential
sample of the same noise, i.e. whether a looser tolerance changed what was drawn; and the
quality of the samples as a set: `fid`, the Frechet distance (arXiv 1706.08500 §3) between the
samples and 10,000 real test images in that classifier's 128-feature layer, and `fid_change`
(median, 2.5% and 97.5% quantiles of FID(method) - FID(sequential) over samples resampled with
replacement, the same picks for both: paired, since they share the noise), with `bpd_change` (the
mean per-sample change of bits per dimension and its standard error) and `bpd_spread` (the
standard error of the samples' mean bits per dimension: how far another draw of as many samples
would move it), so a schedule whose samples differ from sequential's can be told apart from one
whose samples are worse. On ORT, sequential sampling is also timed at each of
`--reference-threads` intra-op thread counts (default 1, 2, 4, ... up to the cores) in the same
rounds: rows `method` "sequential" with `threads` set, and every schedule's
`speedup_vs_fastest_sequential` (median over rounds of the fastest sequential time of the round,
at any of those counts or the run's own, over the schedule's), since at batch 1 a one-token step
is call overhead and a deployment of sequential sampling would run at its fastest count. The plot
(OUT.png) shows wall time and iterations per block.
"""

from __future__ import annotations

import sys

from benchmarks import common


def flow_rows(args) -> list[dict]:
    """The rows, from parsed arguments (samples, rounds, tol, chunk, calibration, quick)."""
    import numpy as np
    import torch

    from accelc import progress
    from accelc.families import tarflow, tarflow_model
    from accelc.families.tarflow_run import to_images
    from accelc.loops import flow_sampling as fs
    from accelc.passes.jacobi import thread_counts

    model = tarflow_model.load(tarflow.builtin_dir(tarflow.FMNIST))
    directory = export(model) if args.backend == "ort" else None
    flow = open_flow(model, directory, args.threads)
    reference_counts = args.reference_threads if args.reference_threads is not None else thread_counts(0, args.backend)
    references = {t: open_flow(model, directory, t) for t in reference_counts if directory is not None}
    batch = args.batch or args.samples
    rounds = 1 if args.quick else args.rounds
    with progress.step("SeJD calibration"):
        costs = fs.measure_costs(flow, batch)
        calibration = fs.prior_noise(flow, max(args.calibration, batch), seed=10_000)
        iterations = fs.calibrate_iterations(flow, calibration, args.tol, batch)
    schedules = [
        fs.FlowSchedule.sequential(len(flow.blocks)),
        fs.FlowSchedule.jacobi(flow, args.tol),
        fs.FlowSchedule.gs_jacobi(flow, args.chunk, args.tol),
        fs.sejd_schedule(flow, iterations, costs.ratio, args.tol),
    ]
    times = {s.name: [] for s in schedules}
    reference_times: dict[int, list[float]] = {t: [] for t in references}
    reference_runs: dict[int, list] = {t: [] for t in references}
    outputs: dict[str, list] = {s.name: [] for s in schedules}
    for r in progress.bar(range(rounds), desc="rounds"):
        z = fs.prior_noise(flow, args.samples, seed=r)
        for schedule in schedules:
            x, stats = fs.sample_in_batches(flow, z, schedule, batch)
            times[schedule.name].append(sum(stats.seconds))
            outputs[schedule.name].append((x, stats))
        for t, reference_flow in references.items():
            x, stats = fs.sample_in_batches(reference_flow, z, schedules[0], batch)
            reference_times[t].append(sum(stats.seconds))
            reference_runs[t].append((x, stats))
    fastest_sequential = [min(round_times) for round_times in zip(times["sequential"], *reference_times.values())]
    reference = [to_images(model, x) for x, _ in outputs["sequential"]]
    net = fmnist_cnn()
    reference_classes = [classify(net, images) for images in reference] if net else None
    sequential_x = np.concatenate([x for x, _ in outputs["sequential"]])
    quality = SetQuality(net, model, np.concatenate(reference), sequential_x) if net else None
    rows = []
    for schedule in schedules:
        runs = outputs[schedule.name]
        images = [to_images(model, x) for x, _ in runs]
        with torch.no_grad():
            bpd = [float(model.bits_per_dim(torch.from_numpy(x)).mean()) for x, _ in runs]
        set_quality = quality.compare(np.concatenate(images), np.concatenate([x for x, _ in runs])) if net else {}
        rows.append(
            {
                "part": "flow",
                "method": schedule.name,
                "wall_s": common.median(times[schedule.name]),
                "speedup": common.median_ratio(times["sequential"], times[schedule.name]),
                "speedup_vs_fastest_sequential": common.median_ratio(fastest_sequential, times[schedule.name]),
                "calls": runs[0][1].total_calls,
                "iterations_per_block": runs[0][1].iterations,
                "max_abs_diff": max(float(np.abs(a - b).max()) for a, b in zip(images, reference)),
                "mean_abs_diff": float(np.mean([np.abs(a - b).mean() for a, b in zip(images, reference)])),
                "class_agreement": float(np.mean([classify(net, a) == c for a, c in zip(images, reference_classes)]))
                if net
                else None,
                "bpd": float(np.mean(bpd)),
                "fid": set_quality.get("fid"),
                "fid_change": set_quality.get("fid_change"),
                "bpd_change": set_quality.get("bpd_change"),
                "bpd_spread": set_quality.get("bpd_spread"),
                "schedule": schedule.to_json(),
                "samples": args.samples,
                "batch": batch,
                "backend": args.backend,
                "threads": args.threads,
                "rounds": rounds,
                "tol": args.tol,
                "cost_ratio": costs.ratio,
                "calibration_iterations": iterations,
            }
        )
    for t, seconds in reference_times.items():
        runs = reference_runs[t]
        with torch.no_grad():
            bpd = [float(model.bits_per_dim(torch.from_numpy(x)).mean()) for x, _ in runs]
        rows.append(
            {
                "part": "flow",
                "method": "sequential",
                "threads": t,
                "wall_s": common.median(seconds),
                "speedup": common.median_ratio(times["sequential"], seconds),
                "speedup_vs_fastest_sequential": common.median_ratio(fastest_sequential, seconds),
                "calls": runs[0][1].total_calls,
                # the same schedule at another thread count: only float rounding may differ
                "max_abs_diff": max(float(np.abs(to_images(model, x) - b).max()) for (x, _), b in zip(runs, reference)),
                "bpd": float(np.mean(bpd)),
                "samples": args.samples,
                "batch": batch,
                "backend": args.backend,
                "rounds": rounds,
            }
        )
    return rows


def fmnist_cnn():
    """The project's trained Fashion-MNIST CNN (images N x 1 x 28 x 28 in [0, 1]); None (and a note)
    when `accelc train fmnist-cnn` has not been run."""
    from accelc import progress
    from accelc.errors import UsageError
    from accelc.families import cnn, cnn_model

    try:
        return cnn_model.load(cnn.builtin_dir("fmnist-cnn"))[1]
    except UsageError as exc:
        progress.status(f"class agreement and FID left out: {exc}")
        return None


def classify(net, images):
    import numpy as np
    import torch

    with torch.no_grad():
        return net(torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))).argmax(1).numpy()


def features(net, images):
    """The classifier's last hidden layer (128 features after its ReLU), the space FID is taken in."""
    import numpy as np
    import torch

    with torch.no_grad():
        return net.layers[:-1](torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))).double().numpy()


def frechet(mu_a, cov_a, mu_b, cov_b) -> float:
    """Frechet distance of two Gaussians: |mu_a - mu_b|^2 + tr(A + B - 2 (A B)^(1/2)), the trace of
    the root taken as the sum of root eigenvalues of A^(1/2) B A^(1/2) (symmetric, so eigh). In
    torch: numpy's OpenBLAS threads spin while they wait, which stalls a loaded machine."""
    import torch

    mu_a, cov_a, mu_b, cov_b = (torch.as_tensor(v, dtype=torch.float64) for v in (mu_a, cov_a, mu_b, cov_b))
    w, v = torch.linalg.eigh(cov_a)
    root_a = (v * w.clamp(min=0).sqrt()) @ v.T
    cross = torch.linalg.eigvalsh(root_a @ cov_b @ root_a).clamp(min=0).sqrt().sum()
    return float(((mu_a - mu_b) ** 2).sum() + cov_a.trace() + cov_b.trace() - 2 * cross)


class SetQuality:
    """Sample-set quality of a schedule against the sequential samples of the same noise: FID to
    the real test images, and paired bootstrap changes of FID and bits per dimension."""

    def __init__(self, net, model, sequential_images, sequential_x, draws: int = 200, seed: int = 0):
        import numpy as np
        import torch

        from accelc.families.cnn_model import fashion_mnist_inputs

        self.net, self.model = net, model
        real = torch.from_numpy(features(net, fashion_mnist_inputs((1, 28, 28), "test")[0]))
        self.real = real.mean(0), torch.cov(real.T)
        self.sequential = features(net, sequential_images)
        self.sequential_bpd = self.bits_per_dim(sequential_x)
        n = len(self.sequential)
        self.picks = np.random.default_rng(seed).integers(0, n, (draws, n))
        self.sequential_fids = np.array([self.fid(self.sequential[k]) for k in self.picks])

    def bits_per_dim(self, x):
        import torch

        with torch.no_grad():
            return self.model.bits_per_dim(torch.from_numpy(x)).double().numpy()

    def fid(self, feats) -> float:
        import torch

        feats = torch.from_numpy(feats)
        return frechet(feats.mean(0), torch.cov(feats.T), *self.real)

    def compare(self, images, x) -> dict:
        import numpy as np

        feats = features(self.net, images)
        change = np.array([self.fid(feats[k]) for k in self.picks]) - self.sequential_fids
        bpd = self.bits_per_dim(x)
        delta = bpd - self.sequential_bpd
        return {
            "fid": self.fid(feats),
            "fid_change": [
                float(np.median(change)),
                float(np.quantile(change, 0.025)),
                float(np.quantile(change, 0.975)),
            ],
            "bpd_change": [float(delta.mean()), standard_error(delta)],
            "bpd_spread": standard_error(bpd),
        }


def standard_error(values) -> float:
    import numpy as np

    return float(np.std(values, ddof=1) / np.sqrt(len(values))) if len(values) > 1 else 0.0


def export(model):
    """The model's blocks exported for ORT into a temporary folder."""
    import tempfile
    from pathlib import Path

    from accelc.families.tarflow_export import export_blocks

    directory = Path(tempfile.mkdtemp(prefix="accelc-flow-"))
    export_blocks(model, directory)
    return directory


def open_flow(model, directory, threads: int | None):
    """The model on ORT over its exported blocks in `directory`, or in torch eager when that is None."""
    if directory is None:
        from accelc.runtime.flow import torch_flow_model

        return torch_flow_model(model)
    from accelc.runtime.flow_ort import ort_flow_model

    return ort_flow_model(directory, {**common.ORT_SESSION, "intra_op_threads": threads or 0})


def positive_count(text: str) -> int:
    """A thread count from the command line: 1 or more (argparse reports anything else as usage)."""
    import argparse

    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"'{text}' is not a thread count: give 1 or more")
    return value


def add_arguments(p) -> None:
    p.add_argument("--samples", type=int, default=64, help="samples drawn in all")
    p.add_argument("--batch", type=int, help="samples drawn together (default: all of them at once)")
    p.add_argument("--backend", choices=("torch", "ort"), default="torch")
    p.add_argument("--rounds", type=int, default=3, help="noise batches, each sampled by every schedule")
    p.add_argument("--tol", type=float, default=1e-3, help="relative-change stopping threshold of the Jacobi chunks")
    p.add_argument("--chunk", type=int, default=16, help="GS-Jacobi chunk length in tokens")
    p.add_argument("--calibration", type=int, default=16, help="calibration noise samples for SeJD")
    p.add_argument(
        "--reference-threads", type=positive_count, nargs="*",
        help="ORT thread counts sequential is also timed at (default 1, 2, 4, ... up to the cores; none: omit)",
    )  # fmt: skip


def label(row: dict) -> str:
    """The method, with the thread count for the extra sequential references."""
    return f"{row['method']} ({row['threads']}t)" if "iterations_per_block" not in row else row["method"]


def plot(rows, path) -> None:
    plt = common.pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    names = [label(r) for r in rows]
    left.bar(names, [r["wall_s"] for r in rows], color="tab:blue")
    for i, r in enumerate(rows):
        left.annotate(f"{r['speedup']:.2f}x", (i, r["wall_s"]), ha="center", va="bottom")
    left.set_ylabel("wall seconds (median)")
    left.set_title(f"TarFlow Fashion-MNIST, {rows[0]['samples']} samples")
    for r in (r for r in rows if "iterations_per_block" in r):
        right.plot(range(len(r["iterations_per_block"])), r["iterations_per_block"], marker="o", label=r["method"])
    right.set_xlabel("block (density order)")
    right.set_ylabel("iterations (sequential: T - 1)")
    right.legend()
    common.save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    p = common.parser(__doc__)
    add_arguments(p)
    p.add_argument("--quick", action="store_true", help="one round (well under 10 minutes)")
    args = p.parse_args(argv)
    environment = common.quiet_threads(args.threads)
    rows = flow_rows(args)
    path, _ = common.write_results(args.json, rows, common.protocol(environment=environment, args=vars(args)))
    plot(rows, path.with_suffix(".png"))
    for r in rows:
        if "iterations_per_block" not in r:
            print(f"{label(r):<15} {r['wall_s']:7.2f}s  {r['speedup']:5.2f}x")
            continue
        print(
            f"{r['method']:<15} {r['wall_s']:7.2f}s  {r['speedup']:5.2f}x  calls {r['calls']:4d}  "
            f"iters {r['iterations_per_block']}  max|dx| {r['max_abs_diff']:.4f}  mean|dx| {r['mean_abs_diff']:.5f}  "
            f"bpd {r['bpd']:.4f} (change {r['bpd_change']}, spread {r['bpd_spread']})  classes {r['class_agreement']}  "
            f"FID {r['fid']} (change {r['fid_change']})  vs fastest sequential {r['speedup_vs_fastest_sequential']:.2f}x"
        )
    return 0


if __name__ == "__main__":
    sys.exit(common.run(main))
