"""Jacobi and lookahead decoding vs autoregressive decoding, side by side in one run.

    python -m benchmarks.jacobi [--quick] [--part lm|all] [--no-speculative] [--artifact DIR] --json OUT.json

Part `lm`: SmolLM2-135M-Instruct on ONNX Runtime (recipes/bench/jacobi.yaml: export_onnx and the
`lookahead` pass pricing windows 1, 4 and 7, whose plan is measured as its own row), continuing real prompts (Austen,
"Persuasion", 48 tokens each) by 64 greedy tokens with: autoregressive decoding (`ar`), Jacobi
decoding, lookahead decoding, lookahead with prompt lookup (the paper's N=5, W=7, G=7; up to 8
copied tokens), the lookahead pass's plan (`lookahead_plan`), and, for reference, the speculative
pass's plan (recipes/bench/speculative.yaml; --no-speculative leaves it out). Every method runs
on a prompt before the next prompt (interleaved), through its loop table entry as `accelc run`
runs it, and the backend's call-cost curve (a k-token call over a one-token call) is timed
before every prompt. Rows: `part`, `method`, `tok_s` (prefill included, median over prompts),
`speedup` (median of the per-prompt ratios to `ar`), `decode_speedup` (the decode phase alone),
`calls` (target calls per prompt, median), `tokens_per_call`, `identical_to_ar`, and for the window
loops `predicted_speedup`: their calls priced with the run's median curve (loops/jacobi_pricing.py),
what the pass predicts from its calibration runs. The plot (OUT.png) shows the speedups and the curve.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import common

LOOKUP_TOKENS = 8


def window_methods() -> dict[str, dict]:
    """name -> decode plan of the window loops measured at the paper's defaults (N=5, W=7, G=7)."""
    from accelc.loops.jacobi import DEFAULT_WINDOW
    from accelc.loops.lookahead import DEFAULT_GUESS_SET, DEFAULT_NGRAM
    from accelc.loops.lookup import Lookup

    lookahead = {
        "strategy": "lookahead",
        "window": DEFAULT_WINDOW,
        "ngram": DEFAULT_NGRAM,
        "guess_set": DEFAULT_GUESS_SET,
    }
    return {
        "jacobi": {"strategy": "jacobi", "window": DEFAULT_WINDOW},
        "lookahead": lookahead,
        "lookahead+lookup": {**lookahead, "lookup": Lookup(tokens=LOOKUP_TOKENS).to_dict()},
    }


def _compiled(recipe: str, artifact: Path | None, overrides: list[str] = ()) -> Path:
    """recipes/bench/RECIPE.yaml compiled to `artifact` unless it is there, in a process of its
    own: the compile's torch models and validation sessions are gone before the runs (both
    artifacts in one process peaked at 5.4 GB)."""
    out = artifact or Path(tempfile.mkdtemp(prefix=f"accelc-{recipe}-")) / "artifact"
    if not (out / "manifest.json").exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        sets = [arg for assignment in overrides for arg in ("--set", assignment)]
        command = [sys.executable, "-m", "accelc", "compile", str(common.bench_recipe(recipe)), "-o", str(out), *sets]
        code = subprocess.run(command, check=False).returncode
        if code:
            raise SystemExit(code)
    return out


def lm_rows(args) -> list[dict]:
    """Part `lm` (see the module doc): one row per method; the protocol's fields in args.protocol."""
    from accelc.loops import registry
    from accelc.loops.autoregressive import Sampler
    from accelc.loops.jacobi_pricing import WindowRun, predicted_speedup
    from accelc.loops.plan import DecodePlan
    from accelc.loops.timing import call_cost_curve
    from accelc.runtime.artifact import Artifact

    # --quick: the lookahead pass calibrates on 2 prompts instead of 4
    quick = [common.override("passes.1.calibration_prompts", 2)] if args.quick else []
    art = Artifact(_compiled("jacobi", Path(args.artifact) if args.artifact else None, quick))
    model = art.step_model("ort")
    prompts = common.persuasion_prompts(art.tokenizer, args.prompts)

    def run(plan: DecodePlan, target=model, draft=None):
        loop = registry.get(plan.strategy)
        return plan.strategy, lambda prompt: loop.run(
            plan, target, draft, prompt, args.new_tokens, sampler=Sampler(), eos_ids=()
        )

    windows = window_methods()
    methods = {"ar": run(DecodePlan(strategy="greedy"))}
    for name, settings in windows.items():
        methods[name] = run(DecodePlan(**settings))
    methods["lookahead_plan"] = run(art.plan)  # the pass's decision (greedy where nothing pays)
    spec_plan = None
    if args.speculative:
        spec = Artifact(
            _compiled("speculative", Path(args.speculative_artifact) if args.speculative_artifact else None)
        )
        spec_plan = spec.plan
        methods["speculative_plan"] = run(spec_plan, *spec.decode_pair("ort"))
    # the longest call: the last token and the window's guesses or a candidate, whichever is longer
    plans = [*windows.values(), art.plan.to_json_dict()]
    longest = max(
        max(p.get("window", 1), p.get("ngram", 0), 1 + (p.get("lookup") or {}).get("tokens", 0)) for p in plans
    )

    out = {
        name: {"rate": [], "decode_rate": [], "calls": [], "tokens": [], "identical": [], "runs": []}
        for name in methods
    }
    curves = []
    for prompt in prompts:
        curves.append(call_cost_curve(model, prompt, range(1, longest + 1), repeats=3))
        ar_tokens = None
        for name, (_, generate) in methods.items():
            t = time.perf_counter()
            result = generate(prompt)
            seconds = time.perf_counter() - t
            o = out[name]
            o["rate"].append(len(result.tokens) / seconds)
            o["decode_rate"].append(result.decode_tokens_per_second)
            o["calls"].append(result.stats.get("target_calls", len(result.tokens)))
            o["tokens"].append(len(result.tokens))
            if "call_tokens_fed" in result.stats:
                o["runs"].append(WindowRun.of(result))
            if name == "ar":
                ar_tokens = result.tokens
            o["identical"].append(result.tokens == ar_tokens)
    curve = {k: statistics.median(c[k] for c in curves) for k in curves[0]}
    rows = []
    for name, o in out.items():
        row = {
            "part": "lm",
            "method": name,
            "strategy": methods[name][0],
            "tok_s": common.median(o["rate"]),
            "speedup": common.median(common.paired_ratios(o["rate"], out["ar"]["rate"])),
            "decode_speedup": common.median(common.paired_ratios(o["decode_rate"], out["ar"]["decode_rate"])),
            "calls": common.median(o["calls"]),
            "tokens_per_call": sum(o["tokens"]) / sum(o["calls"]),
            "identical_to_ar": all(o["identical"]),
            "predicted_speedup": predicted_speedup(o["runs"], curve) if o["runs"] else None,
            "speedup_per_prompt": common.paired_ratios(o["rate"], out["ar"]["rate"]),
        }
        rows.append(row)
        predicted = "" if row["predicted_speedup"] is None else f" (decode predicted x{row['predicted_speedup']:.2f})"
        print(
            f"lm {name:<18} {row['tok_s']:7.2f} tok/s  x{row['speedup']:.2f}  decode x{row['decode_speedup']:.2f}"
            f"{predicted}  {row['tokens_per_call']:.2f} tokens/call  identical {row['identical_to_ar']}",
            flush=True,
        )
    args.protocol["lm"] = {
        "model": art.manifest["model"]["description"],
        "backend": "onnxruntime CPU",
        "recipe": "recipes/bench/jacobi.yaml",
        "artifact": str(art.dir),
        "prompts": len(prompts),
        "prompt_tokens": 48,
        "prompt_text": "austen:persuasion",
        "new_tokens": args.new_tokens,
        "configurations": windows,
        "lookahead_pass_plan": art.plan.to_json_dict(),
        "speculative_plan": spec_plan and spec_plan.to_json_dict(),
        "call_cost_curve": {str(k): v for k, v in curve.items()},
        "call_cost_curves_per_prompt": [{str(k): v for k, v in c.items()} for c in curves],
        "schedule": "interleaved: every method on a prompt, then the next; the call-cost curve timed before each prompt",
    }
    return rows


PARTS = {"lm": lm_rows}


def plot(rows: list[dict], curve: dict | None, path: Path) -> None:
    lm = [r for r in rows if r["part"] == "lm"]
    fig, axes = common.pyplot().subplots(1, 2, figsize=(11, 3.8))
    ax = axes[0]
    ax.bar([r["method"] for r in lm], [r["speedup"] for r in lm], color="#2a7", label="measured (tok/s vs ar)")
    ax.scatter(
        [r["method"] for r in lm],
        [r["predicted_speedup"] if r["predicted_speedup"] is not None else float("nan") for r in lm],
        color="k",
        zorder=3,
        label="decode, priced from the curve",
    )
    ax.axhline(1.0, color="#888", lw=0.8)
    ax.set_title("SmolLM2-135M on ORT: speedup vs autoregressive", fontsize=9)
    ax.tick_params(axis="x", labelsize=7, rotation=25)
    ax.legend(fontsize=7)
    if curve:
        ks = sorted(int(k) for k in curve)
        ax = axes[1]
        ax.plot(ks, [curve[str(k)] for k in ks], "o-", label="measured: k-token call / 1-token call")
        ax.plot(ks, ks, ":", color="#888", label="linear in k")
        ax.axhline(1.0, color="#888", lw=0.8)
        ax.set_xlabel("tokens fed a call (k)")
        ax.set_title("per-call cost curve (ORT, this CPU)", fontsize=9)
        ax.legend(fontsize=7)
    common.save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    p = common.parser(__doc__)
    p.add_argument("--part", choices=[*PARTS, "all"], default="all")
    p.add_argument("--quick", action="store_true", help="4 prompts, 32 tokens; the pass calibrates on 2 prompts")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--artifact", help="reuse a compiled recipes/bench/jacobi.yaml artifact")
    p.add_argument("--speculative-artifact", help="reuse a compiled recipes/bench/speculative.yaml artifact")
    p.add_argument(
        "--speculative",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also run the speculative pass's plan for reference (compiles recipes/bench/speculative.yaml)",
    )
    args = p.parse_args(argv)
    if args.quick:
        args.prompts, args.new_tokens = 4, 32
    environment = common.quiet_threads(args.threads)
    args.protocol = {}
    rows = []
    for name, rows_of in PARTS.items():
        if args.part in (name, "all"):
            rows += rows_of(args)
    record = common.protocol(environment=environment, **args.protocol)
    rows_path, _ = common.write_results(args.json, rows, record)
    plot(rows, args.protocol.get("lm", {}).get("call_cost_curve"), rows_path.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
