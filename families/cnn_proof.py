"""How a CNN artifact is proved: fp32, int8 on the host, and the fabric simulator, side by side.

On the Fashion-MNIST test set (fitted to the model's input, families/cnn_model.py): the fp32
model of record and the int8 reference (runtime/cnn_int8.py) classify every image; the VTA
simulator runs the artifact's binary streams on `prove_images` of them, and every step's int8
output is compared with the reference's, bit for bit. The artifact is refused (exit 5) unless
every offloaded layer is bit-exact. Accuracy, the int8 cost against fp32 (the goal: within one
point), instruction counts, estimated cycles and latency at the bitstream's clock and the
fraction of MACs on the fabric go to `reports/fpga.json` and the manifest's metrics.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from accelc import progress
from accelc.families import cnn_model
from accelc.runtime import cnn_fabric
from accelc.runtime.cnn_int8 import run_step

ACCURACY_GOAL_POINTS = 1.0
CHUNK = 250  # images per simulator run: its buffers hold an image axis


def fp32_logits(model, x: np.ndarray) -> np.ndarray:
    import torch

    out = []
    with torch.inference_mode():
        for start in range(0, len(x), 500):
            out.append(model(torch.from_numpy(x[start : start + 500])).numpy())
    return np.concatenate(out)


def simulate(fabric: cnn_fabric.FabricModel, x_q: np.ndarray) -> dict:
    """The fabric's predictions on int8 inputs, whether every step matched the reference bit for
    bit, and the simulator's per-layer statistics (per image)."""
    mismatched: dict[int, int] = {}
    predictions, stats = [], {}
    for start in progress.bar(range(0, len(x_q), CHUNK), desc="VTA simulator"):
        trace: dict[int, np.ndarray] = {}
        chunk = x_q[start : start + CHUNK]
        logits, stats = fabric.forward(chunk, trace)
        predictions.append(logits.argmax(1))
        ref_input = chunk
        for step in fabric.model.steps:  # each step fed the fabric's own input: a per-layer check
            ref = run_step(step, fabric.model.weights, ref_input)
            got = trace.get(step["layer"])
            if got is None:  # fused into the next step's stream: checked with it
                ref_input = ref
                continue
            bad = int(np.any(got.reshape(len(got), -1) != ref.reshape(len(ref), -1), axis=1).sum())
            if bad:
                mismatched[step["layer"]] = mismatched.get(step["layer"], 0) + bad
            ref_input = got
    return {"predictions": np.concatenate(predictions), "mismatched": mismatched, "stats": stats}


def layer_report(fabric: cnn_fabric.FabricModel, stats: dict) -> tuple[list[dict], int]:
    rows, cycles = [], 0
    for entry in fabric.placement["steps"]:
        row = {k: entry[k] for k in ("layer", "op", "where", "macs", "in_shape", "out_shape")}
        if "fused_into" in entry:
            row["reason"] = entry["reason"]
        elif entry["where"] == "fabric":
            s = stats[entry["layer"]]
            row.update(tiling=entry["tiling"], instructions=s["instructions"], uops=entry["instructions"]["uops"],
                       cycles=s["cycles"], busy=s["busy"], gemm_utilisation=round(entry["macs"] / max(s["cycles"], 1)
                                                                                 / fabric.config.block**2, 3))  # fmt: skip
            cycles += s["cycles"]
        else:
            row["reason"] = entry["reason"]
        rows.append(row)
    return rows, cycles


def prove(directory: Path, manifest: dict) -> tuple[dict, bool]:
    target = next(t for t in manifest["targets"] if t["kind"] == "fpga")
    fabric = cnn_fabric.FabricModel(directory / target["dir"])
    config, model = cnn_model.load(directory / "model" / "hf")
    proof = target["runtime"]["vta_sim"]
    with progress.step(f"fp32 and int8 reference on {proof['eval_images']} Fashion-MNIST test images"):
        x, labels = cnn_model.fashion_mnist_inputs(config.input, "test", proof["eval_images"])
        fp32 = fp32_logits(model, x).argmax(1)
        x_q = fabric.model.quantise_input(x)
        from accelc.runtime.cnn_int8 import reference

        int8 = np.concatenate(
            [reference(fabric.model, x_q[s : s + CHUNK]).argmax(1) for s in range(0, len(x_q), CHUNK)]
        )
    pick = np.sort(np.random.default_rng(cnn_model.SEED).choice(len(x), proof["prove_images"], replace=False))
    sim = simulate(fabric, x_q[pick])
    rows, cycles = layer_report(fabric, sim["stats"])
    clock = fabric.config.clock_mhz
    bit_exact = not sim["mismatched"]
    acc = {
        "fp32": float((fp32 == labels).mean()),
        "int8_host": float((int8 == labels).mean()),
        "vta_sim": float((sim["predictions"] == labels[pick]).mean()),
        "int8_host_on_sim_images": float((int8[pick] == labels[pick]).mean()),
    }
    report = {
        "data": f"Fashion-MNIST test set: {len(x)} images; the simulator runs {len(pick)} of them (seed {cnn_model.SEED})",
        "config_tag": fabric.placement["config_tag"],
        "clock_mhz": clock,
        "accuracy": acc,
        "int8_vs_fp32_points": round(100 * (acc["fp32"] - acc["int8_host"]), 2),
        "int8_agreement_with_fp32": float((int8 == fp32).mean()),
        "bit_exact": bit_exact,
        "mismatched_images_by_layer": sim["mismatched"],
        "fabric_mac_fraction": fabric.placement["macs"]["fabric_fraction"],
        "macs_per_image": fabric.placement["macs"],
        "cycles_per_image": cycles,
        "latency_ms_per_image": cycles / (clock * 1e3),
        "layers": rows,
    }
    reports = directory / "reports"
    reports.mkdir(exist_ok=True)
    (reports / "fpga.json").write_text(json.dumps(report, indent=1))
    metrics = {
        "accuracy": acc,
        "int8_agreement_with_fp32": report["int8_agreement_with_fp32"],
        "bit_exact": bit_exact,
        "fabric_mac_fraction": report["fabric_mac_fraction"],
        "cycles_per_image": cycles,
        "latency_ms_at_clock": round(report["latency_ms_per_image"], 3),
    }
    progress.status(
        f"fpga proof: bit-exact {bit_exact}; accuracy fp32 {acc['fp32']:.4f}, int8 {acc['int8_host']:.4f}, "
        f"simulated {acc['vta_sim']:.4f} on {len(pick)}; {cycles:,} cycles = {report['latency_ms_per_image']:.2f} ms "
        f"at {clock} MHz; {report['fabric_mac_fraction']:.1%} of MACs on the fabric"
    )
    if report["int8_vs_fp32_points"] > ACCURACY_GOAL_POINTS:
        progress.status(f"fpga proof: int8 costs {report['int8_vs_fp32_points']} points, above the 1-point goal")
    if not bit_exact:
        metrics["failure"] = (
            f"the VTA simulator differs from the int32 reference at layers {sorted(sim['mismatched'])} (reports/fpga.json)"
        )
    return metrics, bit_exact
