"""A TarFlow artifact at run time: its decode plan, its flow model on a backend, `accelc run`.

The decode plan (`decode/plan.json`) holds the sampling schedule the `jacobi` pass chose
(sequential where no pass ran), the batch it was priced for, and the defaults of `accelc run`
(samples, seed, the denoising step), and the ORT threads the pass found the schedule fastest at
(none: the target's session threads). `accelc run ARTIFACT --samples N --seed S --out grid.png`
samples with that schedule on the chosen backend, applies TarFlow's denoising step with the
torch model of record, and writes the images as one PNG grid.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from accelc.errors import UsageError
from accelc.families import tarflow_model

PLAN_FILE = "decode/plan.json"
CHECKPOINT = "model/hf"  # runtime/artifact.py HF_DIR: the target's torch checkpoint, whatever its family
DEFAULT_SAMPLES = 16
MAX_SAMPLES = 4096


def decode_plan(bundle) -> dict:
    from accelc.loops.flow_sampling import FlowSchedule

    config = tarflow_model.read_config(bundle.model_dir)
    chosen = bundle.plan.get("flow")
    if chosen is None:
        schedule, batch, threads = FlowSchedule.sequential(config.blocks).to_json(), 64, None
        reason = "no jacobi pass in the recipe: sequential decoding"
    else:
        schedule, batch, reason = chosen["schedule"], chosen["batch"], chosen["reason"]
        threads = chosen.get("threads")
    return {
        "family": "tarflow",
        "schedule": schedule,
        "batch": batch,
        "threads": threads,
        "reason": reason,
        "samples": DEFAULT_SAMPLES,
        "seed": 0,
        "denoise": True,
        "jacobi": chosen,
    }


def read_plan(art) -> dict:
    art.integrity.require(PLAN_FILE)
    path = art.dir / PLAN_FILE
    try:
        plan = json.loads(path.read_text())
    except ValueError as exc:
        raise UsageError(f"{path}: corrupt decode plan ({exc}); recompile the artifact") from None
    if not isinstance(plan, dict) or plan.get("family") != "tarflow" or "schedule" not in plan:
        raise UsageError(f"{path}: not a TarFlow decode plan; recompile the artifact")
    return plan


def open_flow(backend, role: str, threads: int | None = None):
    """The flow model (runtime/flow.py) of `role` on `backend`: torch on the checkpoint, ORT on
    the export_flow graphs with the session options the artifact was validated with."""
    art = backend.placement.artifact
    if backend.name == "torch":
        from accelc.runtime.flow import torch_flow_model

        return torch_flow_model(tarflow_model.load(art.dir / CHECKPOINT))
    if backend.name == "ort":
        from accelc.runtime.flow_ort import ort_flow_model

        session = dict(backend.placement.config["session"])
        if threads is not None:
            session["intra_op_threads"] = threads
        return ort_flow_model(backend.graph(role), session, name="ort")
    raise UsageError(f"backend '{backend.name}' cannot run TarFlow artifacts; use: torch, ort")


def torch_model(art):
    art.integrity.require(CHECKPOINT)
    return tarflow_model.load(art.dir / CHECKPOINT)


def to_images(model, x: np.ndarray, denoise: bool = True) -> np.ndarray:
    """Sampled patches -> images (N, C, H, W) in [0, 1], after TarFlow's score denoising step
    on the torch model of record `model` (families/tarflow_model.TarFlow)."""
    import torch

    patches = torch.from_numpy(np.ascontiguousarray(x))
    if denoise:
        patches = model.denoise(patches)
    with torch.no_grad():
        images = model.unpatchify(patches)
    return ((images.clamp(-1, 1) + 1) / 2).numpy()


def save_grid(images: np.ndarray, path: Path, pad: int = 2) -> Path:
    """Images (N, C, H, W) in [0, 1] as one PNG grid, ceil(sqrt(N)) columns."""
    from PIL import Image

    n, channels, height, width = images.shape
    columns = math.ceil(math.sqrt(n))
    rows = math.ceil(n / columns)
    grid = np.ones((channels, rows * (height + pad) + pad, columns * (width + pad) + pad), np.float32)
    for i, image in enumerate(images):
        top, left = pad + (i // columns) * (height + pad), pad + (i % columns) * (width + pad)
        grid[:, top : top + height, left : left + width] = image
    pixels = (grid.clip(0, 1) * 255).round().astype(np.uint8)
    picture = Image.fromarray(pixels[0] if channels == 1 else pixels.transpose(1, 2, 0))
    path.parent.mkdir(parents=True, exist_ok=True)
    picture.save(path, format="PNG")
    return path


def run(art, args) -> int:
    from accelc.loops.flow_sampling import FlowSchedule, prior_noise, sample_in_batches
    from accelc.runtime import limits

    plan = read_plan(art)
    if args.out is None or Path(args.out).suffix.lower() != ".png":
        raise UsageError("accelc run: a TarFlow artifact writes its samples as an image grid: give --out FILE.png")
    samples = limits.at_least("--samples", args.samples) or plan["samples"]
    if samples > MAX_SAMPLES:
        raise UsageError(f"--samples {samples}: at most {MAX_SAMPLES}")
    seed = plan["seed"] if args.seed is None else args.seed
    if seed < 0:
        raise UsageError(f"--seed {seed}: the seed must be 0 or more")
    backend = args.backend or ("ort" if "ort" in art.backends() else "torch")
    flow = art.step_model(backend, threads=plan.get("threads"))
    schedule = FlowSchedule.from_json(plan["schedule"])
    x, stats = sample_in_batches(flow, prior_noise(flow, samples, seed), schedule, int(plan["batch"]))
    images = to_images(torch_model(art), x, denoise=bool(plan["denoise"]))
    out = save_grid(images, Path(args.out))
    summary = {
        "out": str(out),
        "samples": samples,
        "seed": seed,
        "backend": backend,
        "schedule": schedule.name,
        "seconds": round(sum(stats.seconds), 3),
        "calls": stats.total_calls,
        "iterations_per_block": stats.iterations,
    }
    print(json.dumps(summary))
    return 0
