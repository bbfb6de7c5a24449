"""The router in front of the serving workers: starts them, hands each request to the least loaded
one, and streams its events back to the HTTP handler that waits for them.

The HTTP side is asyncio; a worker is a process behind a pipe. One reader thread per worker
receives its events and passes them to the event loop, so no handler ever blocks on a pipe.
Admission is bounded: at most `workers x max_batch` requests decode and `max_queue` more wait;
beyond that `submit` raises QueueFull (HTTP 429), so an overload is answered at once instead of
growing a queue no client will wait out.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import multiprocessing
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from accelc import progress
from accelc.errors import UsageError
from accelc.serve.batching import Event, Request
from accelc.serve.worker import WorkerSpec

START_TIMEOUT_S = 600.0  # opening a model can mean hashing its files once (runtime/integrity.py)


class QueueFull(Exception):
    """Every decoding place and queue slot is taken."""


class WorkerGone(Exception):
    """The worker decoding a request exited."""


@dataclass(eq=False)
class _Worker:
    spec: WorkerSpec
    process: multiprocessing.Process | None = None  # None: a Ray deployment (ray_router.py)
    conn: object = None
    info: dict = field(default_factory=dict)
    outstanding: set[int] = field(default_factory=set)
    alive: bool = True


class Router:
    def __init__(self, specs: Sequence[WorkerSpec], max_queue: int):
        self.specs, self.max_queue = list(specs), max_queue
        self.capacity = sum(s.max_batch for s in specs) + max_queue
        self.workers: list[_Worker] = []
        self._streams: dict[int, asyncio.Queue] = {}
        self._ids = itertools.count(1)
        self._loop: asyncio.AbstractEventLoop | None = None
        self.on_batch: Callable[[int], None] | None = None  # told each step's batch size (metrics)

    # -- life cycle ---------------------------------------------------------------------------
    def start(self) -> None:
        """Start every worker and wait until each has its model open (or say why one could not)."""
        context = multiprocessing.get_context("spawn")  # no inherited threads or ORT state
        from accelc.serve.worker import main

        for spec in self.specs:
            parent, child = context.Pipe()
            process = context.Process(target=main, args=(child, spec), daemon=True, name=f"accelc-serve-{spec.cores}")
            process.start()
            child.close()
            self.workers.append(_Worker(spec, process, parent))
        for i, worker in enumerate(self.workers):
            if not worker.conn.poll(START_TIMEOUT_S):
                self.close()
                raise UsageError(f"serving worker {i} did not open its model within {START_TIMEOUT_S:.0f} s")
            try:
                kind, payload = worker.conn.recv()
            except EOFError:
                worker.process.join(timeout=5)
                kind, payload = "failed", f"it exited with code {worker.process.exitcode}"
            if kind != "ready":
                self.close()
                raise UsageError(f"serving worker {i} could not open the artifact: {payload}")
            worker.info = payload
            progress.status(
                f"worker {i}: pid {payload['pid']}, cores {','.join(map(str, payload['cores']))}, {payload['mode']}"
            )

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Deliver events on `loop` from now on (the HTTP server's loop)."""
        self._loop = loop
        for worker in self.workers:
            threading.Thread(target=self._read, args=(worker,), daemon=True, name="accelc-serve-reader").start()

    def close(self) -> None:
        for worker in self.workers:
            with contextlib.suppress(OSError, ValueError):
                worker.conn.send(("stop",))
        for worker in self.workers:
            worker.process.join(timeout=5)
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join()
            worker.conn.close()
        self.workers.clear()

    # -- requests -----------------------------------------------------------------------------
    @property
    def outstanding(self) -> int:
        return sum(len(w.outstanding) for w in self.workers)

    @property
    def alive(self) -> int:
        return sum(w.alive for w in self.workers)

    def submit(self, prompt: Sequence[int], **params) -> tuple[int, asyncio.Queue]:
        """Queue a generation on the least loaded live worker; its events arrive on the queue."""
        live = [w for w in self.workers if w.alive]
        if not live:
            raise WorkerGone("no serving worker is running")
        if self.outstanding >= self.capacity:
            raise QueueFull(f"{self.outstanding} requests are decoding or waiting, the server's limit")
        worker = min(live, key=lambda w: len(w.outstanding))
        request = Request(next(self._ids), tuple(prompt), **params)
        queue: asyncio.Queue = asyncio.Queue()
        self._streams[request.id] = queue
        worker.outstanding.add(request.id)
        self._send(worker, request)
        return request.id, queue

    def cancel(self, request_id: int) -> None:
        """Stop decoding a request (its client left or its time ran out); its slot frees at the next step."""
        self._streams.pop(request_id, None)
        for worker in self.workers:
            if request_id in worker.outstanding and worker.alive:
                worker.outstanding.discard(request_id)
                self._cancel(worker, request_id)

    def _send(self, worker: _Worker, request: Request) -> None:
        worker.conn.send(("submit", request))

    def _cancel(self, worker: _Worker, request_id: int) -> None:
        with contextlib.suppress(OSError, ValueError):
            worker.conn.send(("cancel", request_id))

    def _read(self, worker: _Worker) -> None:
        try:
            while True:
                kind, *message = worker.conn.recv()
                if kind == "events":
                    self._loop.call_soon_threadsafe(self._deliver, worker, *message)
        except (EOFError, OSError, ValueError):
            with contextlib.suppress(RuntimeError):  # RuntimeError: the loop closed, the server is stopping
                self._loop.call_soon_threadsafe(self._lost, worker)

    def _deliver(self, worker: _Worker, events: list[Event], batch: int) -> None:
        if batch and self.on_batch is not None:
            self.on_batch(batch)
        for event in events:
            if event.finish is not None:
                worker.outstanding.discard(event.id)
                queue = self._streams.pop(event.id, None)
            else:
                queue = self._streams.get(event.id)
            if queue is not None:
                queue.put_nowait(event)

    def _lost(self, worker: _Worker) -> None:
        if not worker.alive or worker not in self.workers:
            return
        worker.alive = False
        progress.status(f"serving worker pid {worker.info.get('pid')} exited (code {worker.process.exitcode})")
        for request_id in list(worker.outstanding):
            queue = self._streams.pop(request_id, None)
            if queue is not None:
                queue.put_nowait(Event(request_id, finish="lost", error="the worker decoding it exited"))
        worker.outstanding.clear()
