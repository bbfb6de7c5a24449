"""Models on the VTA fabric: fp32 vs int8 on the host vs int8 streams on the simulated PYNQ bitstream.

    python -m benchmarks.fpga [--quick] [--vgg16] [--hls4ml] [--no-cnn] [--no-lm] --json OUT.json

CNN: compiles recipes/bench/fpga.yaml (the trained Fashion-MNIST CNN; run `accelc train
fmnist-cnn` first) and reads its proof (reports/fpga.json): accuracy on the Fashion-MNIST test set
in fp32, with the int8 reference on the host, and of the simulated fabric, which must be
bit-exact with the reference; the fraction of MACs on the fabric; estimated cycles and latency per
image at the bitstream's clock. Host milliseconds per image of fp32 (torch) and of the int8
reference (numpy) are timed interleaved on the same images. `--quick` simulates 200 test images
instead of 1000; `--vgg16` adds VGG-16 (seeded weights, 224x224x3; accuracy is meaningless, shapes
and cycles are not), lowered and simulated on one image.

LM: compiles recipes/bench/fpga_smollm2.yaml (SmolLM2-135M-Instruct, its 210 q/k/v/o and MLP
projections on the fabric) and reads its proof: every projection runs on the simulator for the
first prompt's prefill, bit for bit against the int32 reference; greedy tokens over 8 prompts and
perplexity on held-out Persuasion are measured with that int32 reference (proved equal to the
simulator; simulating every token of them in numpy would take hours) against fp32. `--quick`
generates 8 tokens per prompt instead of 16 and scores 2 windows of 512 tokens instead of 8.

`--hls4ml` (needs `pip install 'accelc[hls4ml]'` and g++) adds the Fashion-MNIST CNN through the
`hls4ml` flavour: the Vitis HLS project's C simulation (compiled with g++) on 200 test images (50
with `--quick`; it runs the streaming dataflow design in C++, a few images a second), `bit_exact` meaning its logits equal the int8 reference's on every one.

Rows: `model`, `mode` (fp32, int8_host, vta_sim, hls4ml_csim), `accuracy` (CNN) or `greedy_agreement` and
`ppl_ratio` (LM), `bit_exact`, `fabric_mac_fraction`, `cycles` (per image or per token, vta_sim),
`latency_ms` (at the clock), `host_ms_per_image` (CNN), `images` (CNN).
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


def lm_rows(name: str, artifact: Path) -> list[dict]:
    report = json.loads((artifact / "reports" / "fpga.json").read_text())
    greedy, ppl = report["greedy"], report["perplexity"]
    shared = {"model": name, "prompts": len(greedy["prompts"]), "tokens_per_prompt": greedy["tokens_per_prompt"],
              "ppl_text": ppl["fp32"]["text"], "ppl_tokens": ppl["fp32"]["tokens_scored"]}  # fmt: skip
    int8 = {"greedy_agreement": greedy["agreement"], "ppl_ratio": ppl["ratio"], "ppl": ppl["int8_fabric"]["ppl"]}
    return [
        {**shared, "mode": "fp32", "greedy_agreement": 1.0, "ppl_ratio": 1.0, "ppl": ppl["fp32"]["ppl"],
         "bit_exact": None, "fabric_mac_fraction": 0.0, "cycles": None, "latency_ms": None},
        {**shared, "mode": "int8_host", **int8, "bit_exact": None, "fabric_mac_fraction": 0.0, "cycles": None,
         "latency_ms": None},
        {**shared, "mode": "vta_sim", **int8, "bit_exact": report["bit_exact"],
         "fabric_mac_fraction": report["fabric_mac_fraction"],
         "fabric_mac_fraction_with_head": report["macs_per_token"]["fabric_fraction_with_head"],
         "cycles": report["cycles_per_token"], "latency_ms": report["latency_ms_per_token"],
         "weight_bytes_per_token": report["weight_bytes_streamed_per_token"],
         "quality_measured_with": "the int32 reference, proved bit-exact with the simulator",
         "simulated_tokens": report["simulated_tokens"],
         "config_tag": report["config_tag"], "clock_mhz": report["clock_mhz"]},
    ]  # fmt: skip


def hls4ml_row(name: str, artifact: Path) -> dict:
    report = json.loads((artifact / "reports" / "hls4ml.json").read_text())
    return {"model": name, "mode": "hls4ml_csim", "accuracy": report["accuracy"]["hls4ml_csim"],
            "bit_exact": report["csim_equals_int8"], "fabric_mac_fraction": 1.0, "cycles": None, "latency_ms": None,
            "agreement_with_int8": report["agreement_with_int8"], "agreement_with_fp32": report["agreement_with_fp32"],
            "int8_host_accuracy_on_the_same_images": report["accuracy"]["int8_host"], "images": report["data"],
            "vendor_build": report["build"]["built"]}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = common.parser(__doc__)
    p.add_argument(
        "--quick", action="store_true", help="CNN: 200 simulated images; LM: 8 tokens per prompt, 2 perplexity windows"
    )
    p.add_argument("--vgg16", action="store_true", help="also lower and simulate VGG-16 (seeded) on one image")
    p.add_argument("--hls4ml", action="store_true", help="also the CNN through the hls4ml flavour's C simulation")
    p.add_argument("--no-cnn", action="store_true", help="leave out the Fashion-MNIST CNN rows")
    p.add_argument("--no-lm", action="store_true", help="leave out the SmolLM2 rows")
    p.add_argument("--out", help="where the artifacts go (default: a temporary folder)")
    args = p.parse_args(argv)
    environment = common.quiet_threads(args.threads)
    root = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="accelc-fpga-"))
    prove = 200 if args.quick else 1000
    started = time.perf_counter()
    rows = []
    if not args.no_cnn:
        fmnist = root / "fmnist-cnn"
        common.compile_bench_recipe("fpga", fmnist, [common.override("targets.0.prove_images", prove)])
        rows += rows_for("fmnist-cnn", fmnist, timed=True)
    if args.hls4ml:
        hls = root / "fmnist-cnn-hls4ml"
        sets = {"targets.0.flavour": "hls4ml", "targets.0.prove_images": 50 if args.quick else 200}
        common.compile_bench_recipe("fpga", hls, [common.override(k, v) for k, v in sets.items()])
        rows.append(hls4ml_row("fmnist-cnn", hls))
    lm = {"targets.0.greedy_tokens": 8, "targets.0.perplexity_windows": 2} if args.quick else {}
    if not args.no_lm:
        smollm2 = root / "smollm2"
        common.compile_bench_recipe("fpga_smollm2", smollm2, [common.override(k, v) for k, v in lm.items()])
        rows += lm_rows("smollm2-135m-instruct", smollm2)
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
        lm_overrides=lm,
        seconds=round(time.perf_counter() - started, 1),
        note="cycles and latency are the simulator's estimates for the PYNQ bitstream, not board measurements; "
        "the LM's greedy tokens and perplexity are measured with the int32 reference the simulator was proved equal to",
    )
    out, beside = common.write_results(args.json, rows, record)
    for row in rows:
        print(json.dumps(row))
    print(f"rows: {out}; protocol: {beside}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
