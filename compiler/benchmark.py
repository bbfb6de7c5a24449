"""`accelc bench`: prefill latency, decode tokens/s and peak memory of every backend of an
artifact against torch eager, measured side by side in one run.

Each backend runs in its own worker process, so its peak RSS is its own (model load included)
and one backend's thread pools cannot slow the next. Workers set OMP_WAIT_POLICY=PASSIVE and
ORT spinning is off (session options), because spinning threads on a shared 2-core machine make
timings up to 50x worse. Workers run in rounds (backend A, B, C, A, B, C, ...) so slow drifts
of machine load hit every backend alike; medians are reported.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from accelc import progress
from accelc.errors import AccelcError

# A fixed English passage (Austen, "Persuasion", public domain) so every backend and every run
# sees the same prompt without touching the asset store.
PROMPT_TEXT = (
    "Sir Walter Elliot, of Kellynch Hall, in Somersetshire, was a man who, for his own amusement, "
    "never took up any book but the Baronetage; there he found occupation for an idle hour, and "
    "consolation in a distressed one; there his faculties were roused into admiration and respect, "
    "by contemplating the limited remnant of the earliest patents; there any unwelcome sensations, "
    "arising from domestic affairs changed naturally into pity and contempt as he turned over the "
    "almost endless creations of the last century; and there, if every other leaf were powerless, "
    "he could read his own history with an interest which never failed. "
)
WARMUP_TOKENS = 4


def rss_mb() -> float:
    """Resident memory now (VmRSS): what a model occupies once loaded, without load-time peaks."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mb() -> float:
    """Peak resident memory of this process's address space.

    VmHWM belongs to the address space created at exec, so a worker reports its own peak;
    getrusage's ru_maxrss is carried across fork+exec from the parent on Linux and would
    report the compile process's peak for every backend.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def prompt_ids(tokenizer, prompt_tokens: int) -> list[int]:
    """The benchmark prompt: PROMPT_TEXT repeated and cut to `prompt_tokens` tokens."""
    return list(tokenizer(PROMPT_TEXT * 8)["input_ids"])[:prompt_tokens]


def time_decode(model, ids: list[int], new_tokens: int, rounds: int, after_round=None) -> dict:
    """Greedy decoding of `new_tokens` after the prompt `ids`, `rounds` times after a short warm-up:
    per round the prefill latency (ms) and decode tokens/s, and this process's peak RSS (MB).
    `after_round()` runs after each round's plain decoding (the artifact's rewritten loop)."""
    from accelc.loops.autoregressive import generate

    generate(model, ids[:8], WARMUP_TOKENS)  # first-call allocations and lazy init out of the timing
    prefill, decode = [], []
    for _ in range(rounds):
        result = generate(model, ids, new_tokens)  # eos ignored: every run decodes new_tokens
        prefill.append(result.prefill_seconds * 1e3)
        decode.append(result.decode_tokens_per_second)
        if after_round is not None:
            after_round()
    return {"prefill_ms": prefill, "decode_tok_s": decode, "peak_rss_mb": peak_rss_mb()}


def _worker(artifact: str, backend: str, prompt_tokens: int, new_tokens: int, rounds: int) -> dict:
    from accelc.loops.plan import run_plan
    from accelc.runtime.artifact import Artifact
    from accelc.runtime.torch_free import keep_torch_out

    keep_torch_out(backend)  # the memory measured is a deployment's, without torch it never runs
    art = Artifact(artifact)
    plan = art.plan_for(backend)
    t0 = time.perf_counter()
    model, draft = art.decode_pair(backend)
    load_s = time.perf_counter() - t0
    ids = prompt_ids(art.tokenizer, prompt_tokens)
    plan_decode, plan_stats = [], []

    def each_round():
        if draft is not None:  # the artifact's rewritten loop, on the same prompt and length
            rewritten = run_plan(plan, model, draft, ids, new_tokens)
            plan_decode.append(rewritten.decode_tokens_per_second)
            plan_stats.append(rewritten.stats)

    out = {"backend": backend, "load_s": load_s, **time_decode(model, ids, new_tokens, rounds, each_round)}
    if draft is not None:
        out.update(plan_decode_tok_s=plan_decode, plan_stats=plan_stats)
    out["plan_strategy"] = plan.strategy
    return out


def run_worker(module: str, args: list[str], what: str) -> dict:
    """`python -m module args` in a fresh process with passive thread pools; its last stdout line
    is the JSON it measured. `what` names the measurement in the error when the worker fails."""
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-3:]
        raise AccelcError(f"bench worker for {what} failed: {' | '.join(tail)}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def round_robin(names: list[str], repeats: int, measure, desc: str = "bench") -> dict[str, list]:
    """`measure(name)` for every name, then again, `repeats` rounds (A, B, C, A, B, C, ...), so slow
    drifts of machine load hit every measurement alike. Returns each name's results in order."""
    samples: dict[str, list] = {name: [] for name in names}
    bar = progress.bar(total=repeats * len(names), desc=desc)
    for _ in range(repeats):
        for name in names:
            bar.set_postfix_str(name)
            samples[name].append(measure(name))
            bar.update()
    bar.close()
    return samples


def _run_worker(artifact: Path, backend: str, prompt_tokens: int, new_tokens: int, rounds: int) -> dict:
    args = [str(artifact), backend, str(prompt_tokens), str(new_tokens), str(rounds)]
    return run_worker("accelc.compiler.benchmark", args, f"'{backend}'")


def bench(artifact: Path, spec, backends: list[str] | None = None) -> dict:
    from accelc.runtime.artifact import Artifact
    from accelc.runtime.limits import check_context

    art = Artifact(artifact)
    check_context(
        art.context_length,
        spec.prompt_tokens + spec.new_tokens,
        f"bench prompt_tokens {spec.prompt_tokens} plus new_tokens {spec.new_tokens}",
        "lower --prompt-tokens and --new-tokens (eval.bench in a recipe) to fit it",
    )
    available = art.backends()
    wanted = [b for b in (backends or spec.backends) if b in available]
    if "torch" not in wanted and "torch" in available:  # the baseline every speedup is read against
        wanted.insert(0, "torch")
    for backend in wanted:  # a damaged file or a missing library is the user's to fix: say so here,
        art.check_backend(backend)  # not as a worker process's traceback

    def measure(backend: str) -> dict:
        n = spec.tvm_new_tokens if backend == "tvm" else spec.new_tokens
        return _run_worker(artifact, backend, spec.prompt_tokens, n, 1)

    samples = round_robin(wanted, spec.repeats, measure)
    rows = {}
    for backend, runs in samples.items():
        rows[backend] = {
            "prefill_ms_median": statistics.median(x for r in runs for x in r["prefill_ms"]),
            "decode_tok_s_median": statistics.median(x for r in runs for x in r["decode_tok_s"]),
            "peak_rss_mb_median": statistics.median(r["peak_rss_mb"] for r in runs),
            "load_s_median": statistics.median(r["load_s"] for r in runs),
            "new_tokens": spec.tvm_new_tokens if backend == "tvm" else spec.new_tokens,
            "runs": runs,
        }
        plan_rates = [x for r in runs for x in r.get("plan_decode_tok_s", [])]
        if plan_rates:  # the decode plan (e.g. speculative) against plain decoding, same process
            stats = [s for r in runs for s in r["plan_stats"]]
            rows[backend].update(
                plan_decode_tok_s_median=statistics.median(plan_rates),
                plan_speedup_vs_autoregressive=statistics.median(plan_rates) / rows[backend]["decode_tok_s_median"],
                plan_acceptance_rate=statistics.median(s.get("acceptance_rate", float("nan")) for s in stats),
                plan_mean_accepted_length=statistics.median(s.get("mean_accepted_length", float("nan")) for s in stats),
                plan_target_calls=statistics.median(s["target_calls"] for s in stats),
                plan_draft_calls=statistics.median(s["draft_calls"] for s in stats),
            )
        rows[backend]["plan_strategy"] = runs[0].get("plan_strategy")
    for backend, row in rows.items():
        row.update({k.replace("_bytes", "_mb"): v / 2**20 for k, v in art.footprint(backend).items()})
    base = rows.get("torch")  # a deploy-profile artifact ships no torch weights: no ratio to them
    for row in rows.values() if base else ():
        row["decode_speedup_vs_torch"] = row["decode_tok_s_median"] / base["decode_tok_s_median"]
        row["prefill_speedup_vs_torch"] = base["prefill_ms_median"] / row["prefill_ms_median"]
    return {
        "protocol": {
            "prompt_tokens": spec.prompt_tokens,
            "new_tokens": spec.new_tokens,
            "tvm_new_tokens": spec.tvm_new_tokens,
            "repeats": spec.repeats,
            "decoding": "greedy, batch 1, KV cache, eos ignored",
            "process_per_measurement": True,
            "OMP_WAIT_POLICY": "PASSIVE",
            "ort_spinning": "per artifact session options",
            "cpu_count": os.cpu_count(),
            "machine": platform.machine(),
            "load_average": os.getloadavg(),
        },
        "backends": rows,
    }


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["backends"])
    rows = [report["backends"][n] for n in names]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    for ax, key, label in zip(
        axes,
        ("prefill_ms_median", "decode_tok_s_median", "peak_rss_mb_median"),
        ("prefill latency (ms, lower is better)", "decode tokens/s (higher is better)", "peak RSS (MB)"),
    ):
        values = [r[key] for r in rows]
        ax.bar(names, values, color=["#888", "#2a7", "#27a", "#a72"][: len(names)])
        ax.set_title(label, fontsize=9)
        for i, v in enumerate(values):
            ax.text(i, v, f"{v:.3g}", ha="center", va="bottom", fontsize=8)
    p = report["protocol"]
    fig.suptitle(
        f"accelc bench: {p['prompt_tokens']} prompt tokens, {p['new_tokens']} new tokens, median of {p['repeats']}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(art, result: dict, figure: Path) -> None:
    """`accelc bench` on a causal LM: the plot at `figure` and the tables on stdout."""
    plot(result, figure)
    print(f"{'backend':<8} {'prefill ms':>11} {'decode tok/s':>13} {'x torch':>8} {'peak MB':>9}")
    for name, r in result["backends"].items():
        print(
            f"{name:<8} {r['prefill_ms_median']:>11.1f} {r['decode_tok_s_median']:>13.2f} "
            f"{r['decode_speedup_vs_torch']:>8.2f} {r['peak_rss_mb_median']:>9.0f}"
        )
    rewritten = {name: r for name, r in result["backends"].items() if "plan_decode_tok_s_median" in r}
    if rewritten or art.plan.needs_draft:
        # the decode plan's loop against plain greedy decoding, same prompt, same worker
        print(f"\ndecode plan '{art.plan.strategy}' (greedy, same prompt):")
        print(
            f"{'backend':<8} {'tok/s':>8} {'x plain':>8} {'acceptance':>11} {'accepted/round':>15} "
            f"{'target calls':>13} {'draft calls':>12}"
        )
        for name, r in result["backends"].items():
            if name not in rewritten:
                print(f"{name:<8} decodes plainly ({r.get('plan_strategy')}): no draft on this backend")
                continue
            print(
                f"{name:<8} {r['plan_decode_tok_s_median']:>8.2f} {r['plan_speedup_vs_autoregressive']:>8.2f} "
                f"{r['plan_acceptance_rate']:>11.3f} {r['plan_mean_accepted_length']:>15.2f} "
                f"{r['plan_target_calls']:>13.0f} {r['plan_draft_calls']:>12.0f}"
            )


if __name__ == "__main__":
    art, backend, pt, nt, rounds = sys.argv[1:6]
    print(json.dumps(_worker(art, backend, int(pt), int(nt), int(rounds))))
