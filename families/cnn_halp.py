"""A CNN artifact with a HALP plan (the `partition` pass): its proof and `accelc run` on Ray.

The plan is the artifact's decode plan (`decode/plan.json`, key `halp`; runtime/halp.py). The
proof runs the plan in one process on real Fashion-MNIST test images, fitted to the model's input,
and refuses the artifact (exit 5) unless every logit equals the unpartitioned run's bit for bit
(`halp.reference`: the same oneDNN kernels on the whole image); it also records whether they equal
the plain torch module's forward, which holds where torch's own dispatch picks those kernels. The
latency the plan was chosen for and what it measured on Ray are the pass's `reports/partition.json`.
`accelc run` classifies test images through the plan on Ray actors (runtime/halp_ray.py);
`accelc bench` times the plan against the unpartitioned model on one of those actors, side by side.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from accelc import progress
from accelc.errors import UsageError
from accelc.families import cnn_model
from accelc.runtime import halp

PROVE_IMAGES = 8
DEFAULT_SAMPLES = 100


def plan_of(manifest: dict) -> halp.Plan | None:
    data = (manifest.get("decode_plan") or {}).get(halp.PLAN_KIND)
    return None if data is None else halp.Plan.from_json(data, "manifest.json decode_plan.halp")


def prove(directory: Path, manifest: dict) -> tuple[dict, bool]:
    import torch

    plan = plan_of(manifest)
    config, model = cnn_model.load(directory / "model" / "hf")
    modules = list(model.layers)
    x, _ = cnn_model.fashion_mnist_inputs(config.input, "test", PROVE_IMAGES)
    with progress.step(f"HALP proof: {plan.workers} worker(s) vs the whole image on {PROVE_IMAGES} test images"):
        got = halp.run_plan(modules, plan, torch.from_numpy(x))
        want = halp.reference(modules, plan, torch.from_numpy(x))
        with torch.inference_mode():
            plain = model(torch.from_numpy(x))
    exact = bool(torch.equal(got, want))
    metrics = {
        "bit_exact": exact,
        "equal_to_torch_module": bool(torch.equal(got, plain)),
        "images": PROVE_IMAGES,
        "workers": plan.workers,
        "groups": len(plan.groups),
        "predicted_ms": round(1e3 * plan.predicted.get("seconds", float("nan")), 2),
    }
    if not exact:
        diff = float((got - want).abs().max())
        metrics["failure"] = f"the partitioned logits differ from the unpartitioned run (max |diff| {diff:.3g})"
    progress.status(f"HALP proof: bit-exact {exact}; equal to the torch module {metrics['equal_to_torch_module']}")
    return metrics, exact


def _model_dir(art) -> Path:
    for name in (cnn_model.CONFIG, cnn_model.WEIGHTS):
        art.integrity.require(f"model/hf/{name}")
    return art.dir / "model" / "hf"


def bench(art, spec) -> dict:
    """The plan's K workers against the unpartitioned model on worker 0, `spec.repeats` paired
    rounds on one Fashion-MNIST test image: medians, the median paired speedup, bit-exactness."""
    from accelc.runtime.halp_ray import HalpCluster

    plan = plan_of(art.manifest)
    weights = _model_dir(art)
    x, _ = cnn_model.fashion_mnist_inputs(cnn_model.read_config(weights).input, "test", 1)
    with HalpCluster(weights, {"whole": plan.single(), "plan": plan}, plan.ray_address) as cluster:
        runs = cluster.paired_rounds(["whole", "plan"], x, spec.repeats, desc=f"HALP: 1 vs {plan.workers} workers")
    whole, split = runs["whole"]["seconds"], runs["plan"]["seconds"]
    return {
        "workers": plan.workers,
        "rounds": spec.repeats,
        "latency_ms": {"1": 1e3 * float(np.median(whole)), str(plan.workers): 1e3 * float(np.median(split))},
        "speedup": float(np.median(np.array(whole) / np.array(split))),
        "bit_exact": bool(np.array_equal(runs["whole"]["output"], runs["plan"]["output"])),
        "predicted_ms": 1e3 * plan.predicted.get("seconds", float("nan")),
    }


def run(art, args) -> int:
    from accelc.runtime.halp_ray import HalpCluster

    plan = plan_of(art.manifest)
    samples = args.samples if args.samples is not None else DEFAULT_SAMPLES
    if not 1 <= samples <= 10000:
        raise UsageError(f"--samples {samples}: allowed 1 to 10000 test images")
    seed = args.seed if args.seed is not None else cnn_model.SEED
    weights = _model_dir(art)
    config = cnn_model.read_config(weights)
    x, labels = cnn_model.fashion_mnist_inputs(config.input, "test", samples, seed)
    predictions, seconds = [], []
    address = args.ray_address or plan.ray_address  # a cluster named at run time wins over the compile's
    with HalpCluster(weights, plan, address) as cluster:
        cluster.infer(x[:1])  # warm-up: the actors' first call allocates
        for i in progress.bar(range(len(x)), desc=f"HALP on {plan.workers} Ray worker(s)"):
            started = time.perf_counter()
            predictions.append(int(cluster.infer(x[i : i + 1]).argmax(1)[0]))
            seconds.append(time.perf_counter() - started)
    predicted = np.array(predictions)
    accuracy = float((predicted == labels).mean())
    latency = 1e3 * float(np.median(seconds))
    print(f"{samples} Fashion-MNIST test images (seed {seed}) through HALP on {plan.workers} Ray worker(s): "
          f"accuracy {accuracy:.4f}, median {latency:.1f} ms per image "
          f"(predicted {1e3 * plan.predicted.get('seconds', float('nan')):.1f})")  # fmt: skip
    if args.out:
        rows = [{"label": int(y), "predicted": int(p)} for y, p in zip(labels, predicted)]
        result = {"accuracy": accuracy, "seed": seed, "latency_ms": latency, "predictions": rows}
        Path(args.out).write_text(json.dumps(result, indent=1))
        print(f"predictions written to {args.out}")
    return 0
