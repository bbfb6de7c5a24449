"""A closed-loop load test of a running server: `concurrency` clients, each sending its next
completion as soon as the last one returned, for a bounded number of requests.

What `accelc bench --serve` (choosing workers and threads) and benchmarks/serve.py (the grid of
concurrency, workers and batch caps) measure: throughput in generated tokens per second of wall
time, per-request latency percentiles, errors, and the greedy texts, so outputs under load can be
held to the single-request ones. Loopback only: the URL is the caller's own server.
"""

from __future__ import annotations

import statistics
import threading
import time
from dataclasses import dataclass, field


@dataclass
class LoadResult:
    concurrency: int
    requests: int
    seconds: float
    tokens: int
    latencies_ms: list[float] = field(default_factory=list)
    errors: int = 0
    texts: dict[int, str] = field(default_factory=dict)  # prompt index -> the text it got (the last time)
    mismatched: int = 0  # a prompt that got two different texts in this run

    @property
    def tok_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else float("nan")

    def percentile(self, q: float) -> float:
        if not self.latencies_ms:
            return float("nan")
        if len(self.latencies_ms) == 1:
            return self.latencies_ms[0]
        return statistics.quantiles(self.latencies_ms, n=100, method="inclusive")[int(q) - 1]


def run_load(
    url: str,
    model: str,
    prompts: list[str],
    max_tokens: int,
    concurrency: int,
    requests: int,
    duration_s: float | None = None,
    timeout_s: float = 600,
) -> LoadResult:
    """Send `requests` greedy completions (prompt i % len(prompts)) from `concurrency` threads;
    after `duration_s` no new request starts (those under way finish)."""
    import httpx

    lock = threading.Lock()
    deadline = None if duration_s is None else time.perf_counter() + duration_s
    issued = iter(range(requests))
    result = LoadResult(concurrency, requests, 0.0, 0)

    def client() -> None:
        with httpx.Client(base_url=url, timeout=timeout_s) as http:
            while True:
                with lock:
                    i = next(issued, None)
                if i is None or (deadline is not None and time.perf_counter() > deadline):
                    return
                body = {"model": model, "prompt": prompts[i % len(prompts)], "max_tokens": max_tokens,
                        "temperature": 0}  # fmt: skip
                start = time.perf_counter()
                try:
                    response = http.post("/v1/completions", json=body)
                    ok = response.status_code == 200
                    answer = response.json() if ok else None
                except httpx.HTTPError:
                    ok, answer = False, None
                elapsed = (time.perf_counter() - start) * 1e3
                with lock:
                    if not ok:
                        result.errors += 1
                        continue
                    result.latencies_ms.append(elapsed)
                    result.tokens += answer["usage"]["completion_tokens"]
                    text, index = answer["choices"][0]["text"], i % len(prompts)
                    if result.texts.setdefault(index, text) != text:
                        result.mismatched += 1

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    result.seconds = time.perf_counter() - start
    result.requests = len(result.latencies_ms) + result.errors
    return result
