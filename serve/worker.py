"""A serving worker: one process pinned to its own cores, with its own model and decoding engine.

It talks to the router (router.py) over a duplex pipe. In: ("submit", Request), ("cancel", id),
("stop",). Out: ("ready", info) once its model is open, or ("failed", message); then
("events", [Event, ...], batch) after every engine step that made any (batch: the
sequences its model call decoded). It blocks on the pipe while it
has nothing to decode, and between two steps takes whatever arrived, so requests join and leave
the batch between model calls.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from dataclasses import dataclass

from accelc.errors import AccelcError
from accelc.serve.batching import ContinuousBatcher, PlanRunner


@dataclass(frozen=True)
class WorkerSpec:
    """What a worker opens: the artifact, its backend, the cores it owns and its batch cap."""

    artifact: str
    backend: str
    cores: tuple[int, ...]
    max_batch: int
    eos_ids: tuple[int, ...]


def open_engine(spec: WorkerSpec):
    """A batcher where the backend decodes several sequences per call and the batch cap allows
    more than one; else the artifact's decode plan, one request at a time."""
    from accelc.runtime.artifact import Artifact

    art = Artifact(spec.artifact)
    threads = len(spec.cores)
    if spec.max_batch > 1:
        model = art.batch_model(spec.backend, slots=spec.max_batch, threads=threads)
        if model is not None:
            return ContinuousBatcher(model, spec.max_batch, spec.eos_ids), "continuous batching"
    plan = art.plan_for(spec.backend)
    if art.backend(spec.backend).threads_per_model:
        target = art.step_model(spec.backend, threads=threads)
        draft = art.step_model(spec.backend, "draft", threads=threads) if plan.needs_draft else None
    else:
        target, draft = art.decode_pair(spec.backend)
    return PlanRunner(plan, target, draft, spec.eos_ids), f"decode plan '{plan.strategy}', one request at a time"


def main(conn, spec: WorkerSpec) -> None:
    """The worker process's entry point (multiprocessing, spawn)."""
    from accelc.serve.cores import pin

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the router, which stops the workers
    try:
        pin(list(spec.cores))
        engine, mode = open_engine(spec)
    except Exception as exc:  # the router reports it and exits; a traceback helps nobody here
        conn.send(("failed", str(exc) if isinstance(exc, AccelcError) else f"{type(exc).__name__}: {exc}"))
        return
    conn.send(("ready", {"pid": os.getpid(), "cores": sorted(os.sched_getaffinity(0)), "mode": mode}))
    try:
        run_engine(engine, conn.recv, lambda: conn.poll(0), lambda events, batch: conn.send(("events", events, batch)))
    except (EOFError, BrokenPipeError, KeyboardInterrupt):  # the router went away
        return


def run_engine(engine, receive: Callable[[], tuple], pending: Callable[[], bool], emit: Callable) -> None:
    """Step `engine` while it has work, taking messages between steps: `receive()` blocks for the
    next message, `pending()` says whether one is waiting, `emit(events, batch)` sends a step's
    events. Returns on ("stop",). A process worker runs it over its pipe, a Ray replica over a queue."""
    while True:
        if engine.idle or pending():
            while True:  # everything that arrived; block only while there is nothing to decode
                message = receive()
                if message[0] == "stop":
                    return
                if message[0] == "submit":
                    engine.submit(message[1])
                elif message[0] == "cancel":
                    engine.cancel(message[1])
                if not pending() and not engine.idle:
                    break
        events = engine.step()
        if events:
            emit(events, engine.last_batch)
