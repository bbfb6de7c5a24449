"""A HALP plan executed on Ray actors: one actor per worker, pinned to its cores, the host in the caller.

Per fused group the host sends each worker only its own input rows (runtime/receptive_field.py:
the slabs are disjoint), computes the overlap-zone rows itself while the workers run (the paper's
task collaboration, arXiv 2207.11294 section III), then merges; the classifier runs on the host.
Every piece runs `halp.run_rows`, so the result equals `halp.run_plan` in one process bit for bit.

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

    def add_plan(self, name: str, plan: dict) -> None:
        self.plans[name] = halp.Plan.from_json(plan, f"plan {name}")

    def run(self, plan: str, group: int, piece: int, slab: np.ndarray) -> tuple[np.ndarray, float]:
        """A piece's output rows from its input slab, and the seconds its compute took."""
        import torch

        started = time.perf_counter()
        g = self.plans[plan].groups[group]
        with torch.inference_mode():
            out = halp.run_piece(self.modules, g, g.pieces[piece], _tensor(slab))
        return halp.as_numpy(out), time.perf_counter() - started

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
        _, model = cnn_model.load(Path(model_dir))
        self.modules = list(model.layers)

    def infer(self, x: np.ndarray, timings: list | None = None, plan: str | None = None) -> np.ndarray:
        """Logits of images `x` (N x C x H x W float32) through a plan (default: the first); `timings`
        gets one dict per group: wall seconds, each worker's compute seconds, the host's seconds on
        its pieces."""
        import torch

        name = plan or next(iter(self.plans))
        chosen = self.plans[name]
        with torch.inference_mode():
            h = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
            for gi, group in enumerate(chosen.groups):
                started = time.perf_counter()
                pending = {
                    pi: self.workers[p.worker].run.remote(name, gi, pi, h[:, :, p.in_first : p.in_last + 1].numpy())
                    for pi, p in enumerate(group.pieces)
                    if p.worker is not None
                }
                host_started = time.perf_counter()
                parts = {
                    pi: halp.run_piece(self.modules, group, p, h[:, :, p.in_first : p.in_last + 1])
                    for pi, p in enumerate(group.pieces)
                    if p.worker is None
                }
                host_seconds = time.perf_counter() - host_started
                got = dict(zip(pending, self.ray.get(list(pending.values()))))
                parts.update({pi: _tensor(out) for pi, (out, _) in got.items()})
                h = torch.cat([parts[pi] for pi in range(len(group.pieces))], 2)
                if timings is not None:
                    timings.append({"group": gi, "seconds": time.perf_counter() - started, "host_seconds": host_seconds,
                                    "worker_seconds": {group.pieces[pi].worker: s for pi, (_, s) in got.items()}})  # fmt: skip
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
