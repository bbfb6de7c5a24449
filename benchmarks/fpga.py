"""CNNs on the VTA fabric: fp32 vs int8 on the host vs int8 streams on the simulated PYNQ bitstream.

    python -m benchmarks.fpga [--quick] [--vgg16] --json OUT.json

Compiles recipes/bench/fpga.yaml (the trained Fashion-MNIST CNN; run `accelc train fmnist-cnn`
first) and reads its proof (reports/fpga.json): accuracy on the Fashion-MNIST test set in fp32,
with the int8 reference on the host, and of the simulated fabric, which must be bit-exact with the
reference; the fraction of MACs on the fabric; estimated cycles and latency per image at the
bitstream's clock. Host milliseconds per image of fp32 (torch) and of the int8 reference (numpy) are
timed interleaved on the same images. `--quick` simulates 200 test images instead of 1000;
`--vgg16` adds VGG-16 (seeded weights, 224x224x3; accuracy is meaningless, shapes and cycles are
not), lowered and simulated on one image.

Rows: `model`, `mode` (fp32, int8_host, vta_sim), `accuracy`, `bit_exact`, `fabric_mac_fraction`,
`cycles` (per image, vta_sim), `latency_ms` (at the clock), `host_ms_per_image`, `images`.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

from benchmarks import common


def host_timings(artifact: Path, rounds: int = 3, images: int = 500) -> dict[str, float]:
    """Median host ms per image of fp32 torch and the int8 numpy reference, interleaved."""
    import torch

    from accelc.families import cnn_model
    from accelc.runtime.cnn_fabric import FabricModel
    from accelc.runtime.cnn_int8 import reference

    config, model = cnn_model.load(artifact / "model" / "hf")
    fabric = FabricModel(artifact / "targets" / "fpga")
    x, _ = cnn_model.fashion_mnist_inputs(config.input, "test", images)
    x_q = fabric.model.quantise_input(x)
    times: dict[str, list[float]] = {"fp32": [], "int8_host": []}
    for _ in range(rounds):
        start = time.perf_counter()
        with torch.inference_mode():
            model(torch.from_numpy(x))
        times["fp32"].append(time.perf_counter() - start)
        start = time.perf_counter()
        reference(fabric.model, x_q)
        times["int8_host"].append(time.perf_counter() - start)
    return {mode: 1e3 * common.median(t) / len(x) for mode, t in times.items()}


def rows_for(name: str, artifact: Path, timed: bool) -> list[dict]:
    report = json.loads((artifact / "reports" / "fpga.json").read_text())
    acc, fraction = report["accuracy"], report["fabric_mac_fraction"]
    host = host_timings(artifact) if timed else {}
    shared = {"model": name, "images": report["data"]}
    return [
        {**shared, "mode": "fp32", "accuracy": acc["fp32"], "bit_exact": None, "fabric_mac_fraction": 0.0,
         "cycles": None, "latency_ms": None, "host_ms_per_image": host.get("fp32")},
        {**shared, "mode": "int8_host", "accuracy": acc["int8_host"], "bit_exact": None, "fabric_mac_fraction": 0.0,
         "cycles": None, "latency_ms": None, "host_ms_per_image": host.get("int8_host")},
        {**shared, "mode": "vta_sim", "accuracy": acc["vta_sim"], "bit_exact": report["bit_exact"],
         "fabric_mac_fraction": fraction, "cycles": report["cycles_per_image"],
         "latency_ms": report["latency_ms_per_image"], "host_ms_per_image": None,
         "int8_host_accuracy_on_the_same_images": acc["int8_host_on_sim_images"],
         "config_tag": report["config_tag"], "clock_mhz": report["clock_mhz"]},
    ]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = common.parser(__doc__)
    p.add_argument("--quick", action="store_true", help="simulate 200 test images instead of 1000")
    p.add_argument("--vgg16", action="store_true", help="also lower and simulate VGG-16 (seeded) on one image")
    p.add_argument("--out", help="where the artifacts go (default: a temporary folder)")
    args = p.parse_args(argv)
    environment = common.quiet_threads(args.threads)
    root = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="accelc-fpga-"))
    prove = 200 if args.quick else 1000
    started = time.perf_counter()
    fmnist = root / "fmnist-cnn"
    common.compile_bench_recipe("fpga", fmnist, [common.override("targets.0.prove_images", prove)])
    rows = rows_for("fmnist-cnn", fmnist, timed=True)
    if args.vgg16:
        vgg = root / "vgg16"
        sets = {"model.builtin": "vgg16", "targets.0.calibration_images": 4, "targets.0.eval_images": 1,
                "targets.0.prove_images": 1}  # fmt: skip
        common.compile_bench_recipe("fpga", vgg, [common.override(k, v) for k, v in sets.items()])
        rows += rows_for("vgg16", vgg, timed=False)
    record = common.protocol(
        benchmark="fpga",
        environment=environment,
        quick=args.quick,
        simulated_images=prove,
        seconds=round(time.perf_counter() - started, 1),
        note="cycles and latency are the simulator's estimates for the PYNQ bitstream, not board measurements",
    )
    out, beside = common.write_results(args.json, rows, record)
    for row in rows:
        print(json.dumps(row))
    print(f"rows: {out}; protocol: {beside}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
