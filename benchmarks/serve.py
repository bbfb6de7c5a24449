"""Load test of `accelc serve` on loopback: throughput and latency vs concurrency, workers and batch caps.

    python -m benchmarks.serve [--quick] [--artifact DIR] --json OUT.json

Compiles recipes/bench/serve.yaml (SmolLM2-135M-Instruct, ORT with the fused graph) into
--artifact first if it holds no artifact. For each (workers, max_batch) it starts `accelc serve
--port 0` on 127.0.0.1 as its own process, then runs closed-loop clients (serve/loadtest.py) at
each concurrency, with a bounded number of greedy requests and a bounded duration per point. Rows:
concurrency, workers, max_batch, tok_s (generated tokens per second of wall time), p50_ms,
p95_ms, errors, identical (every text equals what the same prompt got alone: one worker, batch
cap 1, one client, which decodes with the artifact's plan as `accelc run` does).

The goal, tok/s at concurrency 8 >= 3x single-request decoding, is checked as a paired ratio: on
one worker with the largest batch cap, rounds of one client and of eight clients alternate
(`paired_goal`). And first, without the server, one worker's decode call at each batch cap is
timed interleaved with batch 1 (paired ratios, in the protocol): what batching can give at most.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

from benchmarks import common

GRID = {"workers": (1, 2), "max_batch": (1, 2, 4, 8), "concurrency": (1, 2, 4, 8, 16)}
QUICK = {"workers": (1, 2), "max_batch": (1, 8), "concurrency": (1, 4, 8)}
GOAL = 3.0  # tok/s at concurrency 8 over single-request decoding
GOAL_ROUNDS = 3  # rounds of (one client, eight clients) on one server for the paired goal ratio
LISTENING = re.compile(r"serving '(?P<model>.+)' on (?P<url>http://\S+)/v1")


class Server:
    """`accelc serve ARTIFACT --port 0 ...` as a child process, until `close`."""

    def __init__(self, artifact: Path, workers: int, max_batch: int, max_queue: int):
        command = [sys.executable, "-m", "accelc", "serve", str(artifact), "--host", "127.0.0.1", "--port", "0",
                   "--workers", str(workers), "--max-batch", str(max_batch), "--max-queue", str(max_queue)]  # fmt: skip
        self.process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
        self.log: list[str] = []
        for line in self.process.stderr:
            self.log.append(line)
            found = LISTENING.search(line)
            if found:
                self.url, self.model = found["url"], found["model"]
                break
        else:
            raise SystemExit(f"accelc serve exited ({self.process.wait()}):\n{''.join(self.log)}")
        threading.Thread(target=lambda: self.log.extend(self.process.stderr), daemon=True).start()

    def close(self) -> None:
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def decode_steps(artifact: Path, batches: tuple[int, ...], rounds: int = 6, steps: int = 8) -> dict:
    """One worker's model alone, no HTTP: the time of a decode call holding each batch size, the
    sizes interleaved round by round so every round's ratio to batch 1 is measured side by side.
    What batching can give at most; the load test shows what the server makes of it."""
    import time

    import numpy as np

    from accelc.runtime.artifact import Artifact

    art = Artifact(artifact)
    prompt = np.random.default_rng(0).integers(0, art.vocab_size, 48).tolist()
    models = {}
    for b in batches:
        model = art.batch_model("ort", slots=b)
        models[b] = (model, [model.admit(prompt, 48 + rounds * steps + 1)[0] for _ in range(b)])
    seconds: dict[int, list[float]] = {b: [] for b in batches}
    for _ in range(rounds):
        for b, (model, rows) in models.items():
            start = time.perf_counter()
            for _ in range(steps):
                model.decode(rows, [1] * b)
            seconds[b].append((time.perf_counter() - start) / steps)
    return {
        str(b): {
            "step_ms": common.median(seconds[b]) * 1e3,
            "tok_s": b / common.median(seconds[b]),
            "tok_s_x_batch_1": common.median_ratio([s1 * b for s1 in seconds[batches[0]]], seconds[b]),
        }
        for b in batches
    }


def paired_goal(server: Server, prompts: list[str], new_tokens: int, rounds: int = GOAL_ROUNDS) -> dict:
    """tok/s of eight clients over one client on the same server, alternated round by round, so
    each ratio compares two measurements taken side by side (the grid's points are minutes apart
    on a machine whose load moves). One client at a time is single-request decoding: the batched
    engine at batch 1 costs what `accelc run`'s loop does."""
    from accelc.serve.loadtest import run_load

    alone, loaded = [], []
    for _ in range(rounds):
        alone.append(run_load(server.url, server.model, prompts, new_tokens, 1, 2).tok_s)
        loaded.append(run_load(server.url, server.model, prompts, new_tokens, 8, 16).tok_s)
    return {"single_tok_s": alone, "concurrency_8_tok_s": loaded, "ratio": common.median_ratio(loaded, alone)}


def plot(rows: list[dict], path: Path) -> None:
    plt = common.pyplot()
    fig, (ax_tok, ax_lat) = plt.subplots(1, 2, figsize=(11, 4))
    for key in sorted({(r["workers"], r["max_batch"]) for r in rows}):
        line = sorted((r for r in rows if (r["workers"], r["max_batch"]) == key), key=lambda r: r["concurrency"])
        label = f"{key[0]} worker(s), batch cap {key[1]}"
        ax_tok.plot([r["concurrency"] for r in line], [r["tok_s"] for r in line], marker="o", label=label)
        ax_lat.plot([r["concurrency"] for r in line], [r["p95_ms"] for r in line], marker="o", label=label)
    for ax, title in ((ax_tok, "throughput (generated tok/s)"), (ax_lat, "p95 latency (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent clients")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    ax_tok.legend(fontsize=8)
    common.save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    p = common.parser(__doc__)
    p.add_argument("--quick", action="store_true", help=f"the grid {QUICK} instead of {GRID}")
    p.add_argument("--artifact", default=str(common.REPO / "artifacts" / "bench" / "serve"))
    p.add_argument("--new-tokens", type=int, default=32, help="max_tokens of every request")
    p.add_argument("--requests", type=int, default=3, help="requests per client at each point")
    p.add_argument("--duration", type=float, default=60.0, help="seconds after which a point starts no request")
    args = p.parse_args(argv)
    environment = common.quiet_threads(args.threads)
    grid = QUICK if args.quick else GRID

    from accelc.serve.loadtest import run_load
    from accelc.serve.tuning import text_prompts

    artifact = Path(args.artifact)
    if not (artifact / "manifest.json").exists():
        common.compile_bench_recipe("serve", artifact)
    steps = decode_steps(artifact, (1, *sorted(set(grid["max_batch"]) - {1})))
    for b, r in steps.items():
        print(f"decode call, batch {b:>2}: {r['step_ms']:6.1f} ms, {r['tok_s']:6.1f} tok/s, "
              f"{r['tok_s_x_batch_1']:.2f}x batch 1 (paired)", flush=True)  # fmt: skip
    prompts = text_prompts(max(grid["concurrency"]))
    rows, reference = [], None
    for workers in grid["workers"]:
        for max_batch in grid["max_batch"]:
            server = Server(artifact, workers, max_batch, max_queue=max(grid["concurrency"]))
            try:
                run_load(server.url, server.model, prompts[:1], 4, 1, 1)  # warm-up: first-call allocations
                if reference is None:  # the first server is one worker with batch cap 1: requests alone
                    alone = run_load(server.url, server.model, prompts, args.new_tokens, 1, len(prompts))
                    reference = alone.texts
                if (workers, max_batch) == (1, max(grid["max_batch"])):
                    goal = paired_goal(server, prompts, args.new_tokens)
                for concurrency in grid["concurrency"]:
                    r = run_load(server.url, server.model, prompts, args.new_tokens, concurrency,
                                 args.requests * concurrency, args.duration)  # fmt: skip
                    identical = r.mismatched == 0 and all(reference.get(i) == t for i, t in r.texts.items())
                    rows.append({"concurrency": concurrency, "workers": workers, "max_batch": max_batch,
                                 "tok_s": r.tok_s, "p50_ms": r.percentile(50), "p95_ms": r.percentile(95),
                                 "errors": r.errors, "identical": identical, "requests": r.requests,
                                 "threads_per_worker": len(os.sched_getaffinity(0)) // workers})  # fmt: skip
                    row = rows[-1]
                    print(f"workers {workers} batch {max_batch:>2} concurrency {concurrency:>2}: "
                          f"{row['tok_s']:7.1f} tok/s  p50 {row['p50_ms']:7.0f} ms  p95 {row['p95_ms']:7.0f} ms  "
                          f"errors {row['errors']}  identical {identical}", flush=True)  # fmt: skip
            finally:
                server.close()
    single = next(r["tok_s"] for r in rows if (r["workers"], r["max_batch"], r["concurrency"]) == (1, 1, 1))
    at_8 = {(r["workers"], r["max_batch"]): r["tok_s"] for r in rows if r["concurrency"] == 8}
    best = max(at_8, key=at_8.get)
    speedup = at_8[best] / single
    print(f"\nsingle-request decoding: {single:.1f} tok/s; concurrency 8, {best[0]} worker(s), batch cap {best[1]}: "
          f"{at_8[best]:.1f} tok/s = {speedup:.2f}x; paired on one worker with batch cap "
          f"{max(grid['max_batch'])}, {GOAL_ROUNDS} rounds: {goal['ratio']:.2f}x (goal {GOAL}x: "
          f"{'met' if goal['ratio'] >= GOAL else 'NOT met'}); errors {sum(r['errors'] for r in rows)}, "
          f"all identical: {all(r['identical'] for r in rows)}")  # fmt: skip
    record = common.protocol(
        artifact=str(artifact),
        grid=grid,
        new_tokens=args.new_tokens,
        requests_per_client=args.requests,
        duration_s=args.duration,
        environment=environment,
        decode_call_by_batch=steps,
        single_request_tok_s=single,
        best_at_concurrency_8={"workers": best[0], "max_batch": best[1], "tok_s": at_8[best], "speedup": speedup},
        goal_paired=goal,
        goal_met=goal["ratio"] >= GOAL,
    )
    rows_path, _ = common.write_results(args.json, rows, record)
    plot(rows, rows_path.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
