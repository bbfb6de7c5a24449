"""The serving workers as a Ray Serve deployment: `accelc serve ARTIFACT --ray [--ray-address ADDR]`.

The same engine a process worker runs (worker.py: `open_engine`, `run_engine`) runs in each
replica, on a thread of its own; the replica's `generate` streams a request's events back. The
HTTP side does not change: `RayRouter` is a Router whose one "worker" is the deployment, so
checks, admission (429), timeouts and metrics are the process router's. Ray Serve routes each
request to a replica and scales replicas between 1 and `--workers` by queue length (ongoing
requests per replica against the batch cap). Without `--ray-address` a local Ray instance is
started on loopback for the server's lifetime; with it, the deployment joins that cluster (whose
nodes need accelc and the artifact at the same path).
"""

from __future__ import annotations

import asyncio
import os
import queue
import threading

from accelc import progress
from accelc.errors import UsageError
from accelc.runtime import ray_cluster
from accelc.runtime.backends import Dependency
from accelc.serve.batching import Event, Request
from accelc.serve.router import Router, _Worker
from accelc.serve.worker import WorkerSpec, open_engine, run_engine

RAY = Dependency("ray.serve", "pip install 'accelc[ray]'", "Ray Serve")
APP = "accelc"


class ServingReplica:
    """One replica: an engine on its own thread, fed through a queue (run_engine's messages)."""

    def __init__(self, spec: WorkerSpec):
        os.environ["OMP_NUM_THREADS"] = str(len(spec.cores))
        self.engine, self.mode = open_engine(spec)
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.streams: dict[int, asyncio.Queue] = {}
        self.loop: asyncio.AbstractEventLoop | None = None
        threading.Thread(
            target=run_engine,
            args=(self.engine, self.inbox.get, lambda: not self.inbox.empty(), self._emit),
            daemon=True,
        ).start()

    def _emit(self, events: list[Event], batch: int) -> None:
        by_request: dict[int, list[Event]] = {}
        for event in events:
            by_request.setdefault(event.id, []).append(event)
        for request_id, mine in by_request.items():
            stream = self.streams.get(request_id)
            if stream is not None:
                self.loop.call_soon_threadsafe(stream.put_nowait, (mine, batch))
                batch = 0  # the step's batch size is reported once

    async def generate(self, request: Request):
        """The request's events as the engine makes them: ([Event, ...], batch) per step."""
        self.loop = asyncio.get_running_loop()
        stream: asyncio.Queue = asyncio.Queue()
        self.streams[request.id] = stream
        self.inbox.put(("submit", request))
        finished = False
        try:
            while not finished:
                events, batch = await stream.get()
                finished = any(e.finish is not None for e in events)
                yield events, batch
        finally:
            self.streams.pop(request.id, None)
            if not finished:  # the caller went away: free the sequence's place in the batch
                self.inbox.put(("cancel", request.id))

    def info(self) -> dict:
        return {"pid": os.getpid(), "mode": self.mode}


class RayRouter(Router):
    def __init__(self, spec: WorkerSpec, replicas: int, max_queue: int, address: str | None):
        super().__init__([spec] * replicas, max_queue)
        self.spec, self.replicas, self.address = spec, replicas, address
        self._tasks: dict[int, asyncio.Task] = {}
        self._started_ray = False

    def start(self) -> None:
        RAY.check()
        import ray
        from ray import serve

        self._started_ray = ray_cluster.start(ray, self.address)
        serve.start(proxy_location="Disabled")  # the HTTP side is accelc's own
        deployment = serve.deployment(ServingReplica).options(
            name="worker",
            ray_actor_options={"num_cpus": len(self.spec.cores)},
            max_ongoing_requests=self.spec.max_batch + self.max_queue,
            # scaled by queue length: a replica is busy enough when its batch is full
            autoscaling_config={
                "min_replicas": 1,
                "max_replicas": self.replicas,
                "target_ongoing_requests": self.spec.max_batch,
            },
        )
        try:
            self.handle = serve.run(deployment.bind(self.spec), name=APP, route_prefix=None)
            info = self.handle.info.remote().result()
        except Exception as exc:
            self.close()
            raise UsageError(f"the Ray Serve deployment could not open the artifact: {exc}") from None
        self.workers.append(_Worker(self.spec, info={**info, "cores": [], "mode": f"ray serve: {info['mode']}"}))
        progress.status(
            f"ray serve: 1 to {self.replicas} replica(s), {len(self.spec.cores)} CPU(s) each, {info['mode']}"
        )

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def close(self) -> None:
        import ray
        from ray import serve

        for task in self._tasks.values():
            task.cancel()
        if ray.is_initialized():
            serve.delete(APP) if not self._started_ray else serve.shutdown()
            ray.shutdown()
        self.workers.clear()

    def _send(self, worker: _Worker, request: Request) -> None:
        task = self._loop.create_task(self._pump(worker, request))
        self._tasks[request.id] = task
        task.add_done_callback(lambda _: self._tasks.pop(request.id, None))

    def _cancel(self, worker: _Worker, request_id: int) -> None:
        task = self._tasks.pop(request_id, None)
        if task is not None:
            task.cancel()  # Ray Serve cancels the replica's generator: its `finally` frees the row

    async def _pump(self, worker: _Worker, request: Request) -> None:
        try:
            async for events, batch in self.handle.options(stream=True).generate.remote(request):
                self._deliver(worker, events, batch)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the replica died or Ray failed: this request fails, the server lives
            error = Event(request.id, finish="error", error=f"the Ray Serve replica failed: {exc}")
            self._deliver(worker, [error], 0)
