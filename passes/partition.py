"""partition: HALP's segment partitioning of a CNN across K workers, chosen by a measured latency model.

HALP (Li, Iosifidis & Zhang, arXiv 2207.11294) splits each fused group of conv/pool layers along
its rows: every worker gets a disjoint slab of the group's input and computes what that slab
alone determines, the host computes the overlap zone between two workers' outputs and merges
(runtime/receptive_field.py, runtime/halp.py). Partition points are the ends of the conv stages
(after each max pooling) up to the classifier, which runs on the host.

The latency model (the paper's section IV, with measured rather than nominal rates):
- compute: each layer's seconds at the workers' thread count, measured on every worker at once (so
  they compete for caches and memory bandwidth as in a group) at three row counts and fitted as
  `fixed + per_row x rows` (a batch scales the rows' part);
- link: a round trip to every worker at once, fitted as `latency + bytes / rate` (runtime/halp_ray.py);
- a worker's time in a group: its slab there and its output back, plus its layers on the rows its
  slab determines; the host's: its overlap-zone pieces. Where the workers hold every core the host
  shares them, so its time adds to the group's; on a machine with a core to spare it overlaps.
For each grouping of consecutive stages and each K, the cuts balance the workers' times (bisection
on the slowest worker's time, slabs grown greedily); the plan with the smallest predicted latency
wins. Where the host shares the workers' cores, a group may instead leave the overlap to the
workers (`overlap: auto`): each computes its output rows from every input row they read, so the
receptive field's halo is computed twice instead of on the host
(runtime/receptive_field.py:halo_segments); per group the model takes whichever it predicts
faster. `overlap: host` keeps the paper's task collaboration everywhere. The pass then runs it on Ray for `measure_images` images and reports predicted against
measured seconds per group and worker (reports/partition.json). The plan is the artifact's
decode plan (`decode/plan.json`, kind `halp`), which `accelc run` and `accelc bench` execute.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import time
from typing import Literal

from pydantic import Field

from accelc.compiler import registry
from accelc.errors import UsageError
from accelc.runtime import halp
from accelc.runtime.receptive_field import Segment, determined_rows, halo_segments, input_rows, segments, sizes

SPATIAL_OPS = ("conv2d", "max_pool2d", "relu", "dropout")


@registry.register_pass
class Partition(registry.Pass):
    """HALP: a CNN's conv stages split by rows across K Ray workers, overlap zones on the host or the workers."""

    name = "partition"
    version = 2
    families = ("cnn",)
    produces = ("plan",)

    class Params(registry.Params):
        workers: int | None = Field(None, ge=1, le=64, description="K; default: the best of 1..max_workers")
        max_workers: int | None = Field(None, ge=1, le=64, description="default: cores // threads")
        threads: int = Field(1, ge=1, le=256, description="torch threads (and pinned cores) per worker")
        batch: int = Field(1, ge=1, le=256, description="images per inference the plan is priced for")
        measure_images: int = Field(3, ge=1, le=100, description="inferences timed on Ray for the report")
        ray_address: str | None = Field(None, description="a Ray cluster to plan and run on; default: local Ray")
        overlap: Literal["auto", "host", "workers"] = Field(
            "auto",
            description="who computes the rows between two workers' slabs: host (HALP's task collaboration), "
            "workers (each recomputes the receptive field's halo), auto (per group, the faster predicted)",
        )

    def run(self, bundle, ctx):
        from accelc import progress
        from accelc.families import cnn_model
        from accelc.runtime.halp_ray import HalpCluster

        p = self.params
        halp.require_onednn()
        config, _ = cnn_model.load(bundle.model_dir)  # refuses weights that do not match the config
        if feature_layers(config) == 0:
            raise UsageError(f"passes: partition: {bundle.model_dir} starts with {config.layers[0]['op']}; "
                             "there are no conv2d/max_pool2d layers before the classifier to split by rows")  # fmt: skip
        cores = len(os.sched_getaffinity(0))
        most = p.workers or p.max_workers or max(cores // p.threads, 1)
        x = cnn_model.fashion_mnist_inputs(config.input, "test", p.batch)[0]
        whole = single_plan(config, p.threads)
        with HalpCluster(bundle.model_dir, {"whole": whole}, p.ray_address, workers=most) as cluster:
            with progress.step(f"partition: per-layer costs on {most} worker(s) at once, batch {p.batch}"):
                costs = cluster.layer_costs(x)
            link = cluster.link()
            progress.status(f"partition: link {link[0] * 1e3:.2f} ms + {link[1] / 1e9:.2f} GB/s per round trip")
            host_shares = cores < (most + 1) * p.threads if p.ray_address is None else False
            candidates = [p.workers] if p.workers else range(1, most + 1)
            chosen = min((plan_for(config, costs, link, k, p.threads, p.batch, host_shares, p.overlap)
                          for k in candidates),
                         key=lambda plan: plan.predicted["seconds"])  # fmt: skip
            progress.status(f"partition: {chosen.workers} worker(s), {len(chosen.groups)} group(s), predicted "
                            f"{chosen.predicted['seconds'] * 1e3:.1f} ms per inference")  # fmt: skip
            chosen = dataclasses.replace(chosen, ray_address=p.ray_address)
            cluster.add_plan("chosen", chosen)
            measured = measure(cluster, "chosen", x, p.measure_images)
        report = {"plan": chosen.to_json(), "link": {"latency_s": link[0], "bytes_per_s": link[1]},
                  "costs": costs, "host_shares_cores": host_shares, "measured": measured}  # fmt: skip
        path = ctx.workdir / "partition.json"
        path.write_text(json.dumps(report, indent=1))
        return bundle.evolve(plan={**bundle.plan, halp.PLAN_KIND: chosen.to_json()},
                             reports={**bundle.reports, "partition.json": path})  # fmt: skip


def feature_layers(config) -> int:
    """The number of leading layers that are row-partitionable (up to flatten / the classifier)."""
    n = 0
    while n < len(config.layers) and config.layers[n]["op"] in SPATIAL_OPS:
        n += 1
    return n


def single_plan(config, threads: int) -> halp.Plan:
    """Every feature layer on one worker: the unpartitioned model on the same runtime."""
    end, rows = feature_layers(config), config.input[1]
    stack = _stack(config, 0, end)
    piece = Segment(0, 0, rows - 1, 0, sizes(stack, rows)[-1] - 1)
    return halp.Plan(1, threads, (halp.Group(0, end, rows, (piece,)),), end)


def _stack(config, first: int, end: int) -> list:
    from accelc.runtime.receptive_field import Window

    out = []
    for layer in config.layers[first:end]:
        if layer["op"] == "conv2d":
            out.append(Window(layer["kernel"], 1, layer["padding"]))
        elif layer["op"] == "max_pool2d":
            out.append(Window(layer["kernel"], layer["kernel"]))
        else:
            out.append(None)
    return out


def _compute(costs, first: int, rows_per_layer: list[tuple[int, int]], batch: int) -> float:
    """Seconds of layers first.. on these rows each: a call's fixed cost once, its rows per image."""
    return sum(costs[first + i]["fixed"] + batch * costs[first + i]["per_row"] * (b - a + 1)
               for i, (a, b) in enumerate(rows_per_layer[1:]))  # fmt: skip


def _bytes(shape: list[int], rows: int, batch: int) -> int:
    return 4 * batch * shape[0] * rows * shape[2]


def piece_seconds(config, costs, link, group: halp.Group, piece: Segment, batch: int) -> float:
    """The latency model's time of one piece: compute, and for a worker the transfer there and back."""
    stack = _stack(config, group.first, group.end)
    have = determined_rows(stack, group.rows, piece.in_first, piece.in_last)
    seconds = _compute(costs, group.first, have, batch)
    if piece.worker is not None:
        moved = _bytes(costs[group.first]["in"], piece.in_rows, batch) + _bytes(
            costs[group.end - 1]["out"], piece.out_rows, batch
        )
        seconds += link[0] + moved / link[1]
    return seconds


def split(config, costs, link, first: int, end: int, workers: int, batch: int) -> halp.Group | None:
    """HALP's cuts of the group's input rows for `workers`, the host computing the overlap zones,
    that minimise the slowest worker's time; None if the stack's receptive field leaves no slab for
    some worker."""
    rows = costs[first]["in"][1]
    stack = _stack(config, first, end)

    def group_for(cuts):
        plan = segments(stack, rows, cuts)
        return None if plan is None else halp.Group(first, end, rows, tuple(plan))

    # the thinnest slab that determines an output row anywhere: one row's receptive field, plus
    # the strides' product (where that field starts relative to the slab)
    mid = sizes(stack, rows)[-1] // 2
    field_first, field_last = input_rows(stack, rows, mid, mid)[0]
    thinnest = field_last - field_first + 1 + math.prod(w.stride for w in stack if w)

    def slab_time(start: int, stop: int) -> float:
        return _slab_time(config, costs, link, first, end, rows, stack, start, stop, batch)

    return _balanced(rows, workers, group_for, _slowest(config, costs, link, batch), slab_time, thinnest)


def split_halo(config, costs, link, first: int, end: int, workers: int, batch: int) -> halp.Group | None:
    """The group's output rows cut for `workers`, each worker computing its rows' whole receptive
    field (no host piece), balanced on the slowest worker's time; None where it cannot be cut."""
    rows = costs[first]["in"][1]
    stack = _stack(config, first, end)
    out_rows = sizes(stack, rows)[-1]
    if workers > out_rows:
        return None

    def group_for(cuts):
        pieces = halo_segments(stack, rows, cuts)
        return None if pieces is None else halp.Group(first, end, rows, tuple(pieces))

    def rows_time(a: int, b: int) -> float:  # one worker on output rows [a, b]
        (lo, hi) = input_rows(stack, rows, a, b)[0]
        group = halp.Group(first, end, rows, (Segment(0, lo, hi, a, b),))
        return piece_seconds(config, costs, link, group, group.pieces[0], batch)

    return _balanced(out_rows, workers, group_for, _slowest(config, costs, link, batch), rows_time, 1)


def _slowest(config, costs, link, batch):
    """A group's slowest worker's time, by the latency model."""

    def slowest(group: halp.Group) -> float:
        return max(piece_seconds(config, costs, link, group, p, batch) for p in group.pieces if p.worker is not None)

    return slowest


def _balanced(n: int, workers: int, group_for, slowest, grow_time, reserve: int) -> halp.Group | None:
    """The cuts of n rows among `workers` that minimise the slowest worker's time: every cut for 2
    workers; for more, bisection on that time with each worker's rows grown greedily from the top
    (`grow_time(start, stop)`: a worker's seconds on rows [start, stop]), leaving `reserve` rows to
    each later worker. `group_for(cuts)` builds the group, None where a cut leaves a worker nothing."""
    if workers == 1:
        return group_for([])
    if workers == 2:  # exhaustive: every cut
        options = [g for g in (group_for([u]) for u in range(1, n)) if g is not None]
        return min(options, key=slowest) if options else None
    lo, hi, best = 0.0, slowest(group_for([])) * 2, None
    for _ in range(24):
        tau, cuts, start = (lo + hi) / 2, [], 0
        for j in range(workers - 1):
            u, last = start + 1, n - (workers - 1 - j) * reserve
            while u < last and grow_time(start, u) <= tau:
                u += 1
            cuts.append(u)
            start = u
        group = group_for(cuts) if all(a < b for a, b in itertools.pairwise([0, *cuts, n])) else None
        if group is not None and slowest(group) <= tau:
            best, hi = group, tau
        else:
            lo = tau
    return best


def _slab_time(config, costs, link, first, end, rows, stack, start, stop, batch) -> float:
    have = determined_rows(stack, rows, start, stop)  # [start, stop]: one row past the slab being grown
    if have is None:
        return 0.0
    group = halp.Group(first, end, rows, (Segment(0, start, stop, *have[-1]),))
    return piece_seconds(config, costs, link, group, group.pieces[0], batch)


def plan_for(
    config, costs, link, workers: int, threads: int, batch: int, host_shares: bool, overlap: str = "auto"
) -> halp.Plan:
    """The best plan with `workers` workers over every grouping of consecutive stages; `overlap`:
    who computes the rows between the workers' slabs (the pass's option of that name)."""
    splitters = {"host": [split], "workers": [split_halo], "auto": [split, split_halo]}[overlap]
    head = feature_layers(config)
    head_seconds = sum(c["fixed"] + batch * c["per_row"] for c in costs[head:])
    if workers == 1:
        plan = single_plan(config, threads)
        group = plan.groups[0]
        seconds = piece_seconds(config, costs, link, group, group.pieces[0], batch)
        return halp.Plan(1, threads, plan.groups, head, {"seconds": seconds + head_seconds,
                         "head_s": head_seconds, "groups": [{"workers_s": {"0": seconds}, "host_s": 0.0}]})  # fmt: skip
    points = cut_points(config)
    # best[i]: (seconds, groups, detail) of the feature layers [0, points[i]); groups add up, so a
    # dynamic programme over the cut points finds the best grouping without enumerating them all
    best: list = [(0.0, [], [])] + [None] * (len(points) - 1)
    for j in range(1, len(points)):
        for i in range(j):
            if best[i] is None:
                continue
            for splitter in splitters:
                group = splitter(config, costs, link, points[i], points[j], workers, batch)
                if group is None:
                    continue
                times = [(p.worker, piece_seconds(config, costs, link, group, p, batch)) for p in group.pieces]
                host = sum(t for w, t in times if w is None)
                slowest = max(t for w, t in times if w is not None)
                seconds = best[i][0] + (slowest + host if host_shares else max(slowest, host))
                if best[j] is None or seconds < best[j][0]:
                    detail = {"workers_s": {str(w): t for w, t in times if w is not None}, "host_s": host}
                    best[j] = (seconds, [*best[i][1], group], [*best[i][2], detail])
    seconds, groups, detail = best[-1]
    return halp.Plan(workers, threads, tuple(groups), head,
                     {"seconds": seconds + head_seconds, "head_s": head_seconds, "groups": detail})  # fmt: skip


def cut_points(config) -> list[int]:
    """Where a group may start or end: 0, after every layer that is not a conv2d (a conv keeps its
    ReLU), and the end of the feature layers."""
    head = feature_layers(config)
    inner = [i + 1 for i in range(head - 1) if config.layers[i]["op"] != "conv2d"]
    return [0, *inner, head]


def measure(cluster, name: str, x, images: int) -> dict:
    """Run a plan on its Ray actors `images` times (after one warm-up): median wall seconds per group
    and each worker's compute, against the latency model's prediction."""
    import numpy as np

    plan = cluster.plans[name]
    cluster.infer(x, plan=name)
    runs, walls = [], []
    for _ in range(images):
        timings: list = []
        started = time.perf_counter()
        cluster.infer(x, timings, plan=name)
        walls.append(time.perf_counter() - started)
        runs.append(timings)
    groups = []
    for gi, predicted in enumerate(plan.predicted.get("groups", [])):
        per_worker = {str(w): float(np.median([r[gi]["worker_seconds"][w] for r in runs]))
                      for w in runs[0][gi]["worker_seconds"]}  # fmt: skip
        groups.append({"predicted_workers_s": predicted["workers_s"], "measured_worker_compute_s": per_worker,
                       "predicted_host_s": predicted["host_s"],
                       "measured_host_s": float(np.median([r[gi]["host_seconds"] for r in runs])),
                       "measured_wall_s": float(np.median([r[gi]["seconds"] for r in runs]))})  # fmt: skip
    return {"seconds": float(np.median(walls)), "predicted_seconds": plan.predicted.get("seconds"), "groups": groups}
