"""`accelc bench ARTIFACT --serve`: the number of workers and threads per worker, chosen by measurement.

arXiv 2406.07553 runs one pinned worker per NUMA node; how many workers a machine should run, and
with how many cores each, depends on the model, the cores and the load, so it is measured: every
way of splitting this process's cores into equal pinned workers serves the same closed-loop load
(serve/loadtest.py), and the one with the most generated tokens per second wins. The greedy texts
of every split are held to each other: a split that changed an output would be a bug.
"""

from __future__ import annotations

import os
from pathlib import Path

from accelc import progress
from accelc.serve.loadtest import run_load
from accelc.serve.server import ServeOptions, running


def splits(cores: int) -> list[tuple[int, int]]:
    """(workers, threads per worker) that use all `cores` in equal shares, fewest workers first."""
    return [(w, cores // w) for w in range(1, cores + 1) if cores % w == 0]


def text_prompts(n: int, chars: int = 240) -> list[str]:
    """n passages of "Persuasion" (real text, held out from every calibration), from different chapters."""
    from accelc.data import load_text

    text = load_text("austen:persuasion")
    step = len(text) // (n + 1)
    return [" ".join(text[(i + 1) * step : (i + 1) * step + chars].split()[1:-1]) for i in range(n)]


def tune(artifact: str | Path, *, max_batch: int, concurrency: int, new_tokens: int, requests: int) -> dict:
    """Serve the same load with each split of the cores; rows and the fastest split."""
    cores = len(os.sched_getaffinity(0))
    prompts = text_prompts(max(concurrency, 4))
    rows, texts = [], None
    for workers, threads in splits(cores):
        options = ServeOptions(workers=workers, threads=threads, max_batch=max_batch, max_queue=concurrency)
        label = f"load test: {workers} worker(s) x {threads} thread(s), concurrency {concurrency}"
        with progress.step(label), running(artifact, options) as (svc, url):
            run_load(url, svc.model_name, prompts[:1], 4, 1, 1)  # warm-up: first-call allocations
            result = run_load(url, svc.model_name, prompts, new_tokens, concurrency, requests)
        texts = texts or result.texts
        rows.append(
            {
                "workers": workers,
                "threads": threads,
                "max_batch": max_batch,
                "concurrency": concurrency,
                "tok_s": result.tok_s,
                "p50_ms": result.percentile(50),
                "p95_ms": result.percentile(95),
                "errors": result.errors,
                "identical": result.mismatched == 0 and all(texts.get(i) == t for i, t in result.texts.items()),
            }
        )
    best = max((r for r in rows if not r["errors"]), key=lambda r: r["tok_s"], default=None)
    return {"rows": rows, "best": best, "cores": cores, "new_tokens": new_tokens, "requests": requests}
