"""HALP partitioned CNN inference on Ray: 1 vs 2 workers, VGG-16 (seeded, 224x224) and the Fashion-MNIST CNN.

For each model the latency model of the `partition` pass (passes/partition.py) is fed this
machine's per-layer costs and the measured Ray link, and plans K=1 (the unpartitioned model on one
actor, the classifier on the host) and K=2 (rows split, overlap zones and classifier on the host).
Both run on local Ray side by side, interleaved round by round, one image and a batch of 4 real
Fashion-MNIST test images (resized to the model's input): the speedup is the median of paired
ratios. Each worker is one actor pinned to one core with one torch thread; the host (this process)
runs its pieces on one thread and shares the cores (on a 2-core machine it has none of its own), so
its overlap-zone and classifier time count in full. Bit-exactness: the 2-worker logits against the
1-worker ones (`torch.equal`), and against the plain torch module's forward where torch picks the
same kernels (docs/halp.md).

Rows: model, workers, batch, latency_ms, speedup, bit_exact, predicted_ms, split (rows per worker
in each group), measured vs predicted seconds per group and worker.
Run timings under the shared lock: flock /work/bench.lock python -m benchmarks.halp --json OUT.json
"""

from __future__ import annotations

from benchmarks import common

MODELS = ("vgg16", "fmnist-cnn")
BATCHES = (1, 4)


def main() -> int:
    p = common.parser(__doc__)
    p.add_argument("--quick", action="store_true", help="fewer rounds (under 10 minutes)")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    p.add_argument("--ray-address", help="a Ray cluster to run on (default: a local one on loopback)")
    args = p.parse_args()
    env = common.quiet_threads(1)
    rows = []
    for name in args.models:
        rows += bench_model(name, args.quick, args.ray_address)
    for row in rows:
        print(f"{row['model']:>10} workers {row['workers']} batch {row['batch']}: {row['latency_ms']:8.1f} ms "
              f"(predicted {row['predicted_ms']:.1f}), speedup {row['speedup']:.2f}x, bit-exact {row['bit_exact']}")  # fmt: skip
    common.write_results(args.json, rows, common.protocol(environment=env, quick=args.quick))
    return 0


def bench_model(name: str, quick: bool, address: str | None) -> list[dict]:
    import numpy as np
    import torch

    from accelc import progress
    from accelc.families import cnn, cnn_model
    from accelc.passes import partition
    from accelc.runtime import halp
    from accelc.runtime.halp_ray import HalpCluster

    directory = cnn.builtin_dir(name)
    config, model = cnn_model.load(directory)
    modules = list(model.layers)
    x4, _ = cnn_model.fashion_mnist_inputs(config.input, "test", 4)
    rounds = (5 if quick else 15) if name == "vgg16" else (20 if quick else 60)
    whole = partition.single_plan(config, 1)
    rows = []
    with HalpCluster(directory, {"1": whole}, address, workers=2) as cluster:
        with progress.step(f"{name}: per-layer costs on both workers at once"):
            costs = cluster.layer_costs(x4[:1])
        link = cluster.link()
        plans = {k: partition.plan_for(config, costs, link, k, 1, 1, host_shares=True) for k in (1, 2)}
        cluster.add_plan("2", plans[2])
        for batch in BATCHES:
            x = x4[:batch]
            runs = cluster.paired_rounds(["1", "2"], x, rounds, desc=f"{name} batch {batch}: 1 vs 2 workers")
            times = {k: runs[str(k)]["seconds"] for k in (1, 2)}
            timings = {k: runs[str(k)]["timings"] for k in (1, 2)}
            outputs = {k: runs[str(k)]["output"] for k in (1, 2)}
            torch.set_num_threads(cluster.head_threads)  # the classifier's threads on the host: the same bits
            local = halp.run_plan(modules, plans[2], torch.from_numpy(x))
            with torch.inference_mode():
                module_out = model(torch.from_numpy(x)).numpy()
            for k in (1, 2):
                rows.append({
                    "model": name,
                    "workers": k,
                    "batch": batch,
                    "latency_ms": 1e3 * common.median(times[k]),
                    "latency_ms_per_image": 1e3 * common.median(times[k]) / batch,
                    "speedup": common.median_ratio(times[1], times[k]),
                    "bit_exact": bool(np.array_equal(outputs[k], outputs[1])
                                      and np.array_equal(outputs[k], local.numpy())),
                    "equal_to_torch_module": bool(np.array_equal(outputs[k], module_out)),
                    "predicted_ms": 1e3 * batch_prediction(config, costs, link, plans[k], batch),
                    "split": [[p.in_rows if p.worker is not None else f"host:{p.in_rows}" for p in g.pieces]
                              for g in plans[k].groups],
                    "groups": per_group(plans[k], timings[k], config, costs, link, batch),
                    "rounds": rounds,
                    "link": {"latency_ms": 1e3 * link[0], "gb_per_s": link[1] / 1e9},
                })  # fmt: skip
    return rows


def batch_prediction(config, costs, link, plan, batch: int) -> float:
    """The latency model's seconds for this plan at `batch` images (the plan was chosen for one)."""
    from accelc.passes import partition

    head = sum(c["fixed"] + batch * c["per_row"] for c in costs[plan.head :])
    total = head
    for group in plan.groups:
        times = [partition.piece_seconds(config, costs, link, group, p, batch) for p in group.pieces]
        workers = [t for p, t in zip(group.pieces, times) if p.worker is not None]
        total += max(workers) + sum(t for p, t in zip(group.pieces, times) if p.worker is None)
    return total


def per_group(plan, timings: list, config, costs, link, batch: int) -> list[dict]:
    """Predicted vs measured seconds of each group: each worker (compute measured in the actor;
    predicted includes transfer), the host's pieces, the group's wall time."""
    from accelc.passes import partition

    out = []
    for gi, group in enumerate(plan.groups):
        predicted = {str(p.worker): partition.piece_seconds(config, costs, link, group, p, batch)
                     for p in group.pieces if p.worker is not None}  # fmt: skip
        measured = {str(w): common.median([t[gi]["worker_seconds"][w] for t in timings])
                    for w in timings[0][gi]["worker_seconds"]}  # fmt: skip
        out.append({"layers": [group.first, group.end], "predicted_worker_s": predicted,
                    "measured_worker_compute_s": measured,
                    "measured_host_s": common.median([t[gi]["host_seconds"] for t in timings]),
                    "measured_wall_s": common.median([t[gi]["seconds"] for t in timings])})  # fmt: skip
    return out


if __name__ == "__main__":
    raise SystemExit(common.run(main))
