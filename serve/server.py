"""`accelc serve ARTIFACT`: the artifact's workers behind an OpenAI-compatible HTTP server.

Layout (docs/serving.md): the HTTP process (uvicorn + FastAPI, app.py) tokenizes, checks and routes
requests (router.py); N worker processes (worker.py), each pinned to its own cores (cores.py),
decode them with continuous batching (batching.py over runtime/ort_batch.py) or, where a batch
cannot run, with the artifact's decode plan. The workers never see HTTP, the HTTP process never
runs a model.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from accelc import progress
from accelc.errors import UsageError
from accelc.runtime.backends import Dependency

SERVE = Dependency("fastapi", "pip install 'accelc[serve]'", "the HTTP server (FastAPI)")
SERVER_DEPENDENCIES = (
    SERVE,
    Dependency("uvicorn", "pip install 'accelc[serve]'", "the ASGI server uvicorn"),
    Dependency("prometheus_client", "pip install 'accelc[serve]'", "the Prometheus client"),
)


@dataclass(frozen=True)
class ServeOptions:
    workers: int = 1
    threads: int | None = None  # per worker; default an equal share of the cores
    max_batch: int = 8
    max_queue: int = 64
    timeout_s: float = 300.0
    backend: str | None = None
    model_name: str | None = None
    ray: bool = False  # the workers as a Ray Serve deployment (ray_router.py)
    ray_address: str | None = None  # an existing Ray cluster; None: a local instance on loopback


def check_options(o: ServeOptions) -> None:
    from accelc.runtime import limits

    limits.at_least("--workers", o.workers)
    limits.at_least("--threads", o.threads)
    limits.at_least("--max-batch", o.max_batch)
    limits.at_least("--max-queue", o.max_queue, 0)
    if not o.timeout_s > 0:
        raise UsageError(f"--timeout {o.timeout_s} is not a duration; give a positive number of seconds")


def service(artifact_dir: str | Path, o: ServeOptions):
    """The artifact checked, its workers started and their HTTP service built (app.Service)."""
    from accelc.families.causal_lm import CausalLM
    from accelc.runtime.artifact import Artifact
    from accelc.runtime.torch_free import keep_torch_out
    from accelc.serve.app import Service
    from accelc.serve.cores import core_sets
    from accelc.serve.router import Router
    from accelc.serve.worker import WorkerSpec

    check_options(o)
    for dependency in SERVER_DEPENDENCIES:
        dependency.check()
    art = Artifact(artifact_dir)
    if not isinstance(art.family, CausalLM):
        raise UsageError(f"{art.dir}: accelc serve serves language models; this artifact is a {art.family.title}")
    available = art.backends()
    backend = o.backend or ("ort" if "ort" in available else next(iter(available), "torch"))
    if backend not in available:
        raise UsageError(f"--backend {backend}: not a backend of this artifact; choose from {', '.join(available)}")
    art.check_backend(backend)
    keep_torch_out(backend)  # before the tokenizer (art.eos_ids) imports transformers
    specs = [
        WorkerSpec(str(art.dir), backend, tuple(cores), o.max_batch, art.eos_ids)
        for cores in core_sets(o.workers, o.threads)
    ]
    if o.ray or o.ray_address:
        from accelc.serve.ray_router import RAY, RayRouter

        RAY.check()
        router = RayRouter(specs[0], len(specs), o.max_queue, o.ray_address)
    else:
        router = Router(specs, o.max_queue)
    with progress.step(f"starting {o.workers} worker(s) on {backend}"):
        router.start()
    return Service(
        router=router,
        model_name=o.model_name or art.dir.name,
        tokenizer=art.tokenizer,
        eos_ids=art.eos_ids,
        context=art.context_length,
        plan=art.plan_for(backend),
        timeout_s=o.timeout_s,
        vocab_size=art.vocab_size,
    )


def listening_socket(host: str, port: int) -> socket.socket:
    """The server's socket, bound before uvicorn starts, so `--port 0` can say which port it got."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise UsageError(f"--host {host}: cannot resolve it ({exc})") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise UsageError(f"--host {host} --port {port}: cannot listen there ({exc.strerror})") from None
    return sock


def _bound(artifact_dir: str | Path, options: ServeOptions, host: str, port: int):
    """The listening socket (first: a taken port fails before any worker starts) and the service."""
    sock = listening_socket(host, port)
    try:
        return sock, service(artifact_dir, options)
    except BaseException:
        sock.close()
        raise


@contextlib.contextmanager
def running(artifact_dir: str | Path, options: ServeOptions, host: str = "127.0.0.1", port: int = 0):
    """The server in a thread of this process until the block ends (tests, `accelc bench --serve`):
    yields (service, base URL)."""
    import uvicorn

    from accelc.serve.app import build_app

    sock, svc = _bound(artifact_dir, options, host, port)
    server = uvicorn.Server(uvicorn.Config(build_app(svc), log_level="warning", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        while not server.started:
            if not thread.is_alive():
                raise UsageError("the HTTP server stopped while starting")
            time.sleep(0.01)
        bound_host, bound_port = sock.getsockname()[:2]
        yield svc, f"http://{bound_host}:{bound_port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        svc.router.close()
        sock.close()


def serve(artifact_dir: str | Path, host: str, port: int, options: ServeOptions) -> None:
    """Run the server until interrupted."""
    import uvicorn

    from accelc.serve.app import build_app

    sock, svc = _bound(artifact_dir, options, host, port)
    try:
        bound_host, bound_port = sock.getsockname()[:2]
        progress.status(f"serving '{svc.model_name}' on http://{bound_host}:{bound_port}/v1 (Ctrl-C stops)")
        config = uvicorn.Config(build_app(svc), log_level="warning", timeout_graceful_shutdown=5)
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        svc.router.close()
        sock.close()
