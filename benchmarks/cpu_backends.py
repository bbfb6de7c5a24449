"""ORT and TVM against torch eager on the quickstart artifact, side by side in one run.

    python benchmarks/cpu_backends.py [--artifact artifacts/quickstart] [--repeats 5] --json OUT.json

Compiles recipes/quickstart.yaml first if the artifact is missing. Each measurement runs in its
own worker process, backends interleaved round by round (accelc.compiler.benchmark); the script prints
medians and the decode-speed ratio of each backend to torch eager.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--artifact", default=str(REPO / "artifacts" / "quickstart"))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--backends", nargs="+", default=["torch", "ort", "tvm"])
    parser.add_argument("--json", help="write the full report here")
    args = parser.parse_args()

    from accelc.cli import main as accelc
    from accelc.compiler.benchmark import bench, plot
    from accelc.compiler.recipe import BenchSpec

    artifact = Path(args.artifact)
    if not (artifact / "manifest.json").exists():
        code = accelc(
            [
                "compile",
                str(REPO / "recipes" / "quickstart.yaml"),
                "-o",
                str(artifact),
                "--set",
                "eval.bench.enabled=false",
            ]
        )
        if code:
            return code
    spec = BenchSpec(repeats=args.repeats, new_tokens=args.new_tokens, backends=args.backends)
    report = bench(artifact, spec)
    print(f"{'backend':<8} {'prefill ms':>11} {'decode tok/s':>13} {'decode x torch':>15} {'peak MB':>8}")
    for name, row in report["backends"].items():
        print(
            f"{name:<8} {row['prefill_ms_median']:>11.1f} {row['decode_tok_s_median']:>13.2f} "
            f"{row['decode_speedup_vs_torch']:>15.2f} {row['peak_rss_mb_median']:>8.0f}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
        plot(report, Path(args.json).with_suffix(".png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
