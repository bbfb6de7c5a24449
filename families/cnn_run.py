"""`accelc run` on a CNN artifact: classify Fashion-MNIST test images on the simulated fabric."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from accelc import progress
from accelc.errors import UsageError
from accelc.images import FASHION_MNIST_CLASSES

DEFAULT_SAMPLES = 100


def run(art, args) -> int:
    from accelc.families import cnn_model

    name = args.backend or "vta_sim"
    if args.ray_address:
        raise UsageError("--ray-address applies to partitioned artifacts run on Ray (the `partition` pass), "
                         f"not to --backend {name}")  # fmt: skip
    backend = art.backend(name)
    if "cnn" not in backend.families:
        raise UsageError(f"--backend {name} does not run CNN artifacts; backends that do: vta_sim")
    samples = args.samples if args.samples is not None else DEFAULT_SAMPLES
    if not 1 <= samples <= 10000:
        raise UsageError(f"--samples {samples}: allowed 1 to 10000 test images")
    seed = args.seed if args.seed is not None else cnn_model.SEED
    fabric = backend.step_model("target")  # the files are checked against the manifest first
    x, labels = cnn_model.fashion_mnist_inputs(tuple(fabric.model.input_shape), "test", samples, seed)
    predictions = []
    for start in progress.bar(range(0, len(x), 250), desc="VTA simulator"):
        logits, _ = fabric.forward(fabric.model.quantise_input(x[start : start + 250]))
        predictions.append(logits.argmax(1))
    predicted = np.concatenate(predictions)
    accuracy = float((predicted == labels).mean())
    print(f"{samples} Fashion-MNIST test images (seed {seed}) on the simulated {fabric.placement['config_tag']} fabric: "
          f"accuracy {accuracy:.4f}")  # fmt: skip
    if args.out:
        names = FASHION_MNIST_CLASSES if len(FASHION_MNIST_CLASSES) >= predicted.max(initial=0) + 1 else None
        rows = [
            {"label": int(y), "predicted": int(p), **({"predicted_class": names[p]} if names else {})}
            for y, p in zip(labels, predicted)
        ]
        Path(args.out).write_text(json.dumps({"accuracy": accuracy, "seed": seed, "predictions": rows}, indent=1))
        print(f"predictions written to {args.out}")
    return 0
