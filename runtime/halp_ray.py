"""A HALP plan executed on Ray actors: one actor per worker, pinned to its cores, the host in the caller.

Per fused group each worker computes its piece from its input rows (runtime/receptive_field.py),
the host computes the overlap-zone rows where the plan gives them to it, while the workers run
(the paper's task collaboration, arXiv 2207.11294 section III); the classifier runs on the host.
A worker keeps what it computed: the next group's slab mostly lies in it, so only the rows it
lacks travel (its neighbours' halo, from the host), and a worker sends back only the rows another
piece reads (`halp.rows_wanted_elsewhere`; everything after the last group). Every piece runs
`halp.run_rows` on the same rows, so the result equals `halp.run_plan` in one process bit for bit.

Without an address a local Ray instance is started on loopback for the cluster's lifetime; with
one (`--ray-address`, the `partition` pass's `ray_address`) the actors join that cluster, whose
nodes need accelc and the model folder at the same path. Each actor asks Ray for `threads` CPUs,
pins itself to as many cores of its node (disjoint between the actors of one node) and sets its
torch thread count to match. The host runs its overlap-zone pieces on one thread (the workers hold
the cores meanwhile) and the classifier on `head_threads` (default: every core it may use, idle
by then); `halp.run_plan` on that many threads gives the same bits.
"""

from __future__ import annotations

import os
import time
import warnings
from pathlib import Path

import numpy as np

from accelc import progress
from accelc.errors import UsageError
from accelc.runtime import halp, ray_cluster
from accelc.runtime.backends import Dependency

RAY = Dependency("ray", "pip install 'accelc[ray]'", "Ray")


class HalpWorker:
    """One worker: the model's layers, the plans it serves pieces of, its own cores and thread count."""

    def __init__(self, model_dir: str, plans: dict[str, dict], index: int, threads: int):
        import torch

        from accelc.families import cnn_model

        cores = sorted(os.sched_getaffinity(0))
        mine = cores[index * threads : (index + 1) * threads]
        if len(mine) == threads:  # a node with fewer free cores than workers x threads: Ray's share only
            os.sched_setaffinity(0, mine)
        torch.set_num_threads(threads)
        self.cores = sorted(os.sched_getaffinity(0))
        _, model = cnn_model.load(Path(model_dir))
        self.modules = list(model.layers)
        self.plans = {name: halp.Plan.from_json(plan, f"plan {name}") for name, plan in plans.items()}
        self.kept: dict[str, tuple[int, int, object]] = {}  # plan -> (inference, group, its output)

    def add_plan(self, name: str, plan: dict) -> None:
        self.plans[name] = halp.Plan.from_json(plan, f"plan {name}")

    def run(
        self, plan: str, inference: int, group: int, piece: int, parts: list[tuple[int, np.ndarray]]
    ) -> tuple[list[tuple[int, np.ndarray]], float]:
        """A piece of group `group`: its slab is the rows this worker kept from the group before
        and `parts` ((first row, rows) the host sent); returns the output rows wanted elsewhere as
        (first row, rows), and the seconds its compute took."""
        import torch

        started = time.perf_counter()
        chosen = self.plans[plan]
        segment = chosen.groups[group].pieces[piece]
        rows = RowStore()
        if halp.kept_rows(chosen, group, segment) is not None:
            inference_kept, group_kept, out = self.kept.get(plan, (None, None, None))
            if (inference_kept, group_kept) != (inference, group - 1):
                raise RuntimeError(f"HALP worker: no output of group {group - 1} kept for inference {inference}")
            rows.put(halp.piece_before(chosen, group, segment).out_first, out)
        for first, part in parts:
            rows.put(first, _tensor(part))
        with torch.inference_mode():
            out = halp.run_piece(
                self.modules, chosen.groups[group], segment, rows.take(segment.in_first, segment.in_last)
            )
        self.kept[plan] = (inference, group, out)
        wanted = halp.rows_wanted_elsewhere(chosen, group, segment)
        first = segment.out_first
        sent = [(a, halp.as_numpy(out[:, :, a - first : b - first + 1].contiguous())) for a, b in wanted]
        return sent, time.perf_counter() - started

    def layer_costs(self, x: np.ndarray) -> list[dict]:
        """The model's per-layer costs on this worker's cores (halp.layer_costs)."""
        import torch

        threads = torch.get_num_threads()
        return halp.layer_costs(self.modules, _tensor(x), threads)

    def echo(self, data: np.ndarray) -> np.ndarray:
        """The link's round trip (latency and bytes/s) for the latency model."""
        return data

    def info(self) -> dict:
        return {"pid": os.getpid(), "cores": self.cores}


class RowStore:
    """Row intervals of one activation (N x C x rows x W) held as (first row, tensor) pieces."""

    def __init__(self):
        self.pieces: list[tuple[int, object]] = []

    def put(self, first: int, rows) -> None:
        self.pieces.append((first, rows))

    def take(self, first: int, last: int):
        """Rows [first, last], from whichever pieces hold them (every row must be held)."""
        import torch

        out, row = [], first
        while row <= last:
            held = [(f, t) for f, t in self.pieces if f <= row < f + t.shape[2]]
            if not held:
                raise RuntimeError(f"HALP: row {row} of [{first}, {last}] was never received")
            f, t = max(held, key=lambda piece: piece[0] + piece[1].shape[2])  # the piece reaching furthest
            end = min(last + 1, f + t.shape[2])
            out.append(t[:, :, row - f : end - f])
            row = end
        return out[0] if len(out) == 1 else torch.cat(out, 2)


def _tensor(a: np.ndarray):
    import torch

    with warnings.catch_warnings():  # Ray's arrays are read-only views of its object store; no piece writes them
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(a)


class HalpCluster:
    """Actors for one or more plans of a model (as many as the largest plan has workers, its thread
    count each: plans share them, a 1-worker plan runs on worker 0; `workers` reserves more for
    plans added later), and Ray, started here unless `address` names a cluster. The first plan is
    the default of `infer`."""

    def __init__(self, model_dir: Path, plans: halp.Plan | dict[str, halp.Plan], address: str | None = None,
                 workers: int | None = None, head_threads: int | None = None):  # fmt: skip
        RAY.check()
        import ray

        halp.require_onednn()
        self.plans = plans if isinstance(plans, dict) else {"plan": plans}
        first = next(iter(self.plans.values()))
        workers = max(workers or 1, *(plan.workers for plan in self.plans.values()))
        threads = {plan.threads for plan in self.plans.values()}
        if len(threads) != 1:
            raise UsageError(f"HALP plans on the same actors need one thread count, not {sorted(threads)}")
        if address is None and workers * first.threads > (os.cpu_count() or 1):
            raise UsageError(
                f"HALP: {workers} worker(s) x {first.threads} thread(s) need more than this machine's "
                f"{os.cpu_count()} cores on local Ray: fewer workers or threads, or a cluster (--ray-address)"
            )
        self._started_ray = False
        if not ray.is_initialized():
            self._started_ray = ray_cluster.start(ray, address)
        self.ray, self.workers = ray, []
        try:
            actor = ray.remote(HalpWorker).options(num_cpus=first.threads)
            plans_json = {name: plan.to_json() for name, plan in self.plans.items()}
            with progress.step(f"HALP: {workers} Ray worker(s), {first.threads} thread(s) each"):
                self.workers = [actor.remote(str(model_dir), plans_json, i, first.threads) for i in range(workers)]
                self.info = ray.get([w.info.remote() for w in self.workers])
        except ray.exceptions.RayError as exc:  # a worker that cannot start (its node lacks the model, ...)
            self.close()
            first_line = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
            raise UsageError(f"HALP: a Ray worker could not start with {model_dir}: {first_line}") from None
        except BaseException:
            self.close()
            raise
        import torch

        from accelc.families import cnn_model

        torch.set_num_threads(1)
        self.head_threads = head_threads or len(os.sched_getaffinity(0))
        self._inferences = 0  # numbers each inference, so a worker can tell its kept rows are this one's
        _, model = cnn_model.load(Path(model_dir))
        self.modules = list(model.layers)

    def infer(self, x: np.ndarray, timings: list | None = None, plan: str | None = None) -> np.ndarray:
        """Logits of images `x` (N x C x H x W float32) through a plan (default: the first); `timings`
        gets one dict per group: wall seconds, each worker's compute seconds, the host's seconds on
        its pieces."""
        import torch

        name = plan or next(iter(self.plans))
        chosen = self.plans[name]
        self._inferences += 1
        with torch.inference_mode():
            rows = RowStore()  # the rows of the current group's input the host holds
            rows.put(0, torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)))
            for gi, group in enumerate(chosen.groups):
                started = time.perf_counter()
                pending = {}
                for pi, p in enumerate(group.pieces):
                    if p.worker is None:
                        continue
                    kept = halp.kept_rows(chosen, gi, p)
                    missing = [(p.in_first, p.in_last)] if kept is None else [
                        (a, b) for a, b in ((p.in_first, kept[0] - 1), (kept[1] + 1, p.in_last)) if a <= b
                    ]  # fmt: skip
                    parts = [(a, rows.take(a, b).contiguous().numpy()) for a, b in missing]
                    pending[pi] = self.workers[p.worker].run.remote(name, self._inferences, gi, pi, parts)
                host_started = time.perf_counter()
                computed = RowStore()
                for p in group.pieces:
                    if p.worker is None:
                        computed.put(
                            p.out_first, halp.run_piece(self.modules, group, p, rows.take(p.in_first, p.in_last))
                        )
                host_seconds = time.perf_counter() - host_started
                got = dict(zip(pending, self.ray.get(list(pending.values()))))
                for sent, _ in got.values():
                    for first, part in sent:
                        computed.put(first, _tensor(part))
                rows = computed
                if timings is not None:
                    timings.append({"group": gi, "seconds": time.perf_counter() - started, "host_seconds": host_seconds,
                                    "worker_seconds": {group.pieces[pi].worker: s for pi, (_, s) in got.items()}})  # fmt: skip
            h = rows.take(0, chosen.groups[-1].pieces[-1].out_last)
            torch.set_num_threads(self.head_threads)
            try:
                return halp.as_numpy(halp.run_head(self.modules, chosen.head, h))
            finally:
                torch.set_num_threads(1)

    def paired_rounds(self, names: list[str], x: np.ndarray, rounds: int, desc: str = "HALP rounds") -> dict:
        """Plans `names` timed side by side, round after round (one warm-up first): per plan its
        outputs, wall seconds per round and per-group timings per round. Pairing by round cancels
        the drift of the machine's load that separate runs would keep."""
        out = {name: {"output": self.infer(x, plan=name), "seconds": [], "timings": []} for name in names}
        for _ in progress.bar(range(rounds), desc=desc):
            for name in names:
                timings: list = []
                started = time.perf_counter()
                self.infer(x, timings, plan=name)
                out[name]["seconds"].append(time.perf_counter() - started)
                out[name]["timings"].append(timings)
        return out

    def add_plan(self, name: str, plan: halp.Plan) -> None:
        """Another plan on the same actors (no more workers than they are, the same threads)."""
        if plan.workers > len(self.workers) or plan.threads != next(iter(self.plans.values())).threads:
            raise UsageError(f"HALP plan {name}: {plan.workers} x {plan.threads} threads does not fit these actors")
        self.ray.get([w.add_plan.remote(name, plan.to_json()) for w in self.workers])
        self.plans[name] = plan

    def layer_costs(self, x: np.ndarray) -> list[dict]:
        """Per-layer costs measured on every worker at once, the slower worker's for each layer:
        what a partitioned group sees, workers competing for caches and memory bandwidth."""
        per_worker = self.ray.get([w.layer_costs.remote(np.ascontiguousarray(x, np.float32)) for w in self.workers])
        return [
            {**layers[0], "fixed": max(c["fixed"] for c in layers), "per_row": max(c["per_row"] for c in layers)}
            for layers in zip(*per_worker)
        ]

    def link(self, sizes=(1 << 16, 1 << 22), repeats: int = 5) -> tuple[float, float]:
        """(seconds per trip, bytes per second) of the link, as a group uses it: every worker gets a
        payload and sends it back at once (a single worker's round trip misses the contention of
        several), at two payload sizes, fitted as `latency + bytes / rate` for one worker's bytes."""
        times = []
        for size in sizes:
            data = np.zeros(size // 4, np.float32)
            self.ray.get([w.echo.remote(data) for w in self.workers])
            samples = []
            for _ in range(repeats):
                started = time.perf_counter()
                self.ray.get([w.echo.remote(data) for w in self.workers])
                samples.append(time.perf_counter() - started)
            times.append(float(np.median(samples)))
        per_byte = max((times[1] - times[0]) / (2 * (sizes[1] - sizes[0])), 1e-12)  # there and back
        return max(times[0] - 2 * sizes[0] * per_byte, 0.0), 1.0 / per_byte

    def close(self) -> None:
        for w in self.workers:
            self.ray.kill(w)
        self.workers = []
        if self._started_ray:
            self.ray.shutdown()

    def __enter__(self) -> HalpCluster:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
