"""ORT and TVM against torch eager on a compiled artifact, side by side in one run.

    python -m benchmarks.cpu_backends [--artifact DIR] [--recipe recipes/bench/cpu_backends.yaml]
                                      [--set KEY.PATH=VALUE ...] [--repeats 5] --json OUT.json

Compiles the recipe (default recipes/bench/cpu_backends.yaml: the quick start's model and targets)
into --artifact first if it holds no artifact; `--artifact artifacts/quickstart` measures the quick
start's. Each measurement runs in its own worker process, backends interleaved round by round
(`accelc bench`'s own code, compiler/benchmark.py); the script prints medians and the decode-speed
ratio of each backend to torch eager, and writes one row per backend.
"""

from __future__ import annotations

import sys
from pathlib import Path

from benchmarks import common


def main(argv: list[str] | None = None) -> int:
    p = common.parser(__doc__)
    p.add_argument("--artifact", default=str(common.REPO / "artifacts" / "bench" / "cpu_backends"))
    p.add_argument(
        "--recipe", default=str(common.bench_recipe("cpu_backends")), help="compiled when --artifact is empty"
    )
    p.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE", help="override a recipe value")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--backends", nargs="+", default=["torch", "ort", "tvm"])
    args = p.parse_args(argv)
    environment = common.quiet_threads(args.threads)

    from accelc.compiler.benchmark import bench, plot
    from accelc.compiler.recipe import BenchSpec

    artifact = Path(args.artifact)
    if not (artifact / "manifest.json").exists():
        common.compile_bench_recipe(args.recipe, artifact, args.set)
    spec = BenchSpec(
        repeats=args.repeats, new_tokens=args.new_tokens, prompt_tokens=args.prompt_tokens, backends=args.backends
    )
    report = bench(artifact, spec)
    rows = [{"backend": name, **row} for name, row in report["backends"].items()]
    print(f"{'backend':<8} {'prefill ms':>11} {'decode tok/s':>13} {'decode x torch':>15} {'peak MB':>8}")
    for row in rows:
        print(
            f"{row['backend']:<8} {row['prefill_ms_median']:>11.1f} {row['decode_tok_s_median']:>13.2f} "
            f"{row['decode_speedup_vs_torch']:>15.2f} {row['peak_rss_mb_median']:>8.0f}"
        )
    record = common.protocol(
        artifact=str(artifact),
        recipe=args.recipe,
        overrides=args.set,
        environment=environment,
        bench=report["protocol"],
    )
    rows_path, _ = common.write_results(args.json, rows, record)
    plot(report, rows_path.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    sys.exit(common.run(main))
