"""The GGUF's own 4-bit blocks against fp32 and re-quantised int4 weights (ONNX Runtime), side by side.

    python -m benchmarks.gguf_weights [--only NAME ...] [--repeats 3] [--new-tokens 32] [--spin-us N]
                                      [--compile-only] --json OUT.json

Compiles recipes/bench/gguf_weights.yaml (the embedded SmolLM2-135M-Instruct, a Q4_1 GGUF) once
per configuration into artifacts/bench/gguf_weights/NAME (every run; the step cache keeps an
unchanged configuration's compile to its proof):
  fp32          export_onnx only
  int4          quantize_weights_int4: ORT's quantizer re-quantises the dequantised weights
  int4[-bB]-hH  the same in blocks of B (32 unless named) with the LM head quantised to H bits
  q4            gguf_weights: the GGUF's own blocks, fp32 compute (accuracy_level 0)
  q4-int8       gguf_weights with int8 activations (accuracy_level 4)
  q4-float-zp   gguf_weights as one MatMulNBits with float zero points
  q4[-int8]-q8  q4 / q4-int8 with the Q8_0 tied head as the file's 8-bit blocks (int8 activations)
  q4-int8-q8-apart  q4-int8-q8 with every MatMul its own MatMulNBits (merge: false; gate and up
                are merged by default)
  q4-spec-int8  q4 with the speculative plan, draft: the target's weights in int8 (block 128,
                symmetric) with a head over the 8,192 most frequent tokens (recipes/bench/speculative.yaml's)
  q4-spec-gguf  q4 with the speculative plan, draft: the GGUF's blocks (int8 compute), same head
Then times greedy decoding on each artifact's ORT session, each in its own worker process,
artifacts interleaved round by round (compiler/benchmark.py's workers); for a speculative
artifact the worker also times the plan, so plan and plain decoding are paired in one process.
Rows: decode tok/s (plain and plan), the ratio to fp32 (medians of the rounds' paired ratios),
perplexity of torch and ORT from the compile, and `exact`: ORT's perplexity within 1% of the
torch model's (the source model's weights) and the greedy tokens equal on the parity prompts.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from benchmarks import common

INT4 = {"type": "quantize_weights_int4", "block_size": 32}
GGUF = {"type": "gguf_weights"}
DRAFT = {"from_target": True, "vocab": 8192}
SPEC = {"type": "speculative", "fallback": False, "gamma_max": 8}
LOOSE = [  # re-quantised weights move logits and tokens (recipes/quickstart_int4.yaml's gates)
    common.override("eval.parity.atol", 60.0),
    common.override("eval.parity.greedy_tokens", 0),
    common.override("eval.perplexity.max_ratio", 1.25),
]
CONFIGS = {
    "fp32": [common.override("passes", [{"type": "export_onnx"}])],
    "int4": [common.override("passes", [{"type": "export_onnx"}, INT4]), *LOOSE],
    # the LM head quantised too (its own copy of the tied embedding), at 4 or 8 bits; larger blocks
    # read fewer scales (recipes/quickstart_int4.yaml is int4-b128-h8)
    **{
        f"int4{'' if block == 32 else f'-b{block}'}-h{bits}": [
            common.override(
                "passes", [{"type": "export_onnx"}, {**INT4, "block_size": block, "head": True, "head_bits": bits}]
            ),
            *LOOSE,
            common.override("eval.perplexity.max_ratio", 1.35),
        ]
        for block, bits in ((32, 4), (32, 8), (64, 8), (128, 8))
    },
    "q4": [],
    # int8 activations move logits by ~3 and change greedy tokens within 16: gated as int4 is
    "q4-int8": [common.override("passes", [{"type": "export_onnx"}, {**GGUF, "accuracy_level": 4}]), *LOOSE],
    # the tied head (the file's Q8_0 embedding) as 8-bit blocks: its activations rounded as llama.cpp's are
    **{
        f"{name}-q8": [common.override("passes", [{"type": "export_onnx"}, {**GGUF, "q8_0": "int8", **extra}]), *LOOSE]
        for name, extra in (("q4", {}), ("q4-int8", {"accuracy_level": 4}))
    },
    "q4-int8-q8-apart": [
        common.override(
            "passes", [{"type": "export_onnx"}, {**GGUF, "q8_0": "int8", "accuracy_level": 4, "merge": False}]
        ),
        *LOOSE,
    ],
    "q4-float-zp": [common.override("passes", [{"type": "export_onnx"}, {**GGUF, "layout": "float_zero_point"}])],
    "q4-spec-int8": [
        common.override(
            "passes",
            [
                {"type": "export_onnx"},
                GGUF,
                {**SPEC, "draft": {**DRAFT, "weights": "int8", "block_size": 128, "symmetric": True}},
            ],
        )
    ],
    "q4-spec-gguf": [
        common.override("passes", [{"type": "export_onnx"}, GGUF, {**SPEC, "draft": {**DRAFT, "weights": "gguf"}}])
    ],
}


def main(argv: list[str] | None = None) -> int:
    p = common.parser(__doc__)
    p.add_argument("--only", nargs="+", choices=list(CONFIGS), help="these configurations (default: all)")
    p.add_argument("--artifacts", default=str(common.REPO / "artifacts" / "bench" / "gguf_weights"))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--compile-only", action="store_true", help="build the artifacts and stop (run it under nice)")
    p.add_argument(
        "--spin-us",
        type=int,
        help="compile the artifacts with ORT's threads spinning this long before they sleep (a machine of their "
        "own; artifacts in a folder of their own): spinning changes which layout decodes fastest",
    )
    args = p.parse_args(argv)
    environment = common.quiet_threads(args.threads)
    spin = []
    if args.spin_us is not None:
        if args.spin_us < 1:
            from accelc.errors import UsageError

            raise UsageError(f"--spin-us must be at least 1 (microseconds), got {args.spin_us}")
        spin = [
            common.override("targets.0.ort.allow_spinning", True),
            common.override("targets.0.ort.spin_duration_us", args.spin_us),
        ]
        args.artifacts = f"{args.artifacts}-spin{args.spin_us}us"

    from accelc.compiler.benchmark import _run_worker, round_robin

    names = args.only or list(CONFIGS)
    if "fp32" not in names:
        names.insert(0, "fp32")  # the baseline every ratio is read against
    root = Path(args.artifacts)
    for name in names:  # every run: the step cache makes an unchanged one cheap, and a stale one is rebuilt
        common.compile_bench_recipe("gguf_weights", root / name, [*CONFIGS[name], *spin])
    if args.compile_only:
        return 0
    samples = round_robin(
        names,
        args.repeats,
        lambda name: _run_worker(root / name, "ort", args.prompt_tokens, args.new_tokens, 1),
        desc="gguf_weights",
    )
    rate = {name: [x for run in runs for x in run["decode_tok_s"]] for name, runs in samples.items()}
    rows = []
    for name, runs in samples.items():
        quality = json.loads((root / name / "reports" / "eval.json").read_text())["backends"]
        validation = json.loads((root / name / "reports" / "validation.json").read_text())
        ppl = {backend: quality[backend]["ppl"] for backend in ("torch", "ort")}
        greedy = all(case["backends"]["ort"].get("greedy_match", False) for case in validation["cases"])
        plan = [x for run in runs for x in run.get("plan_decode_tok_s", [])]
        row = {
            "config": name,
            "decode_tok_s": statistics.median(rate[name]),
            "vs_fp32": common.median_ratio(rate[name], rate["fp32"]),
            "ppl_torch": ppl["torch"],
            "ppl_ort": ppl["ort"],
            "exact": abs(ppl["ort"] / ppl["torch"] - 1) < 0.01 and greedy,
            "plan": runs[0].get("plan_strategy"),
            "peak_rss_mb": statistics.median(run["peak_rss_mb"] for run in runs),
        }
        if plan:
            row.update(
                plan_decode_tok_s=statistics.median(plan),
                plan_vs_plain=common.median_ratio(plan, rate[name]),
                plan_vs_fp32=common.median_ratio(plan, rate["fp32"]),
                acceptance=statistics.median(s["acceptance_rate"] for run in runs for s in run["plan_stats"]),
            )
        rows.append(row)
    print(f"{'config':<13} {'tok/s':>7} {'x fp32':>7} {'plan tok/s':>11} {'x fp32':>7} {'ppl ort':>8} exact")
    for r in rows:
        plan = f"{r['plan_decode_tok_s']:>11.1f} {r['plan_vs_fp32']:>7.2f}" if "plan_decode_tok_s" in r else " " * 19
        print(
            f"{r['config']:<13} {r['decode_tok_s']:>7.1f} {r['vs_fp32']:>7.2f} {plan} {r['ppl_ort']:>8.3f} {r['exact']}"
        )
    record = common.protocol(
        recipe=str(common.bench_recipe("gguf_weights")),
        configs={name: [*CONFIGS[name], *spin] for name in names},
        environment=environment,
        prompt_tokens=args.prompt_tokens,
        new_tokens=args.new_tokens,
        repeats=args.repeats,
        decoding="greedy, batch 1, KV cache, eos ignored; one worker process per measurement, interleaved",
    )
    common.write_results(args.json, rows, record)
    return 0


if __name__ == "__main__":
    raise SystemExit(common.run(main))
