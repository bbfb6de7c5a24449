"""Training a TarFlow on Fashion-MNIST: `accelc train tarflow-fmnist`.

Maximum likelihood on noise-augmented images (TarFlow, arXiv 2412.06329, section 2.3): pixels
scaled to [-1, 1] plus Gaussian noise of the model's `noise_std`, AdamW with a linear warm-up and
a cosine decay. Each step's batch and noise come from a generator seeded by (seed, step), so a run
resumed from its checkpoint (model, optimizer, step: `torch.load(weights_only=True)`) sees the same
data as one that never stopped. The result is the model folder (config + safetensors) with the
test-set bits per dimension and the training cost in its config's `accelc_training` entry.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from accelc import assets, progress
from accelc.families import tarflow_model
from accelc.families.tarflow_model import TarFlow, TarFlowConfig


@dataclass(frozen=True)
class TrainSpec:
    config: TarFlowConfig
    steps: int = 1000
    batch: int = 128
    lr: float = 2e-3
    warmup: int = 100
    seed: int = 0
    checkpoint_every: int = 50
    test_images: int | None = None  # the first this many of the test split (None: all 10,000)


def images_to_unit(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W) -> float (N, 1, H, W) in [-1, 1]."""
    return torch.from_numpy(images).float().div_(127.5).sub_(1.0).unsqueeze(1)


def learning_rate(spec: TrainSpec, step: int) -> float:
    if step < spec.warmup:
        return spec.lr * (step + 1) / spec.warmup
    done = (step - spec.warmup) / max(1, spec.steps - spec.warmup)
    return spec.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, done)))


def test_bits_per_dim(model: TarFlow, images: np.ndarray, seed: int = 0, batch: int = 500) -> float:
    """Mean bits/dim of the noise-augmented test images (fixed noise: comparable between runs)."""
    generator = torch.Generator().manual_seed(seed)
    total = 0.0
    with torch.no_grad():
        for start in progress.bar(range(0, len(images), batch), desc="test bits/dim"):
            x = images_to_unit(images[start : start + batch])
            x = x + model.config.noise_std * torch.randn(x.shape, generator=generator)
            total += float(model.bits_per_dim(model.patchify(x)).sum())
    return total / len(images)


def train(spec: TrainSpec, final: Path, fresh: bool = False) -> Path:
    from accelc.images import fashion_mnist

    train_images, _ = fashion_mnist("train")
    test_images, _ = fashion_mnist("test")
    work = final.with_name(final.name + ".train")
    work.mkdir(parents=True, exist_ok=True)
    checkpoint = work / "checkpoint.pt"
    torch.manual_seed(spec.seed)
    model = TarFlow(spec.config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=1e-4)
    step, elapsed = 0, 0.0
    if checkpoint.exists() and not fresh:
        state = torch.load(checkpoint, weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step, elapsed = int(state["step"]), float(state["elapsed_s"])
        progress.status(f"resuming {final.name} from step {step} of {spec.steps} ({checkpoint})")
    data = images_to_unit(train_images)
    model.train()
    bar = progress.bar(total=spec.steps, initial=step, desc=f"train {final.name}")
    loss_avg = None
    while step < spec.steps:
        start = time.perf_counter()
        generator = torch.Generator().manual_seed(spec.seed * 1_000_003 + step)
        index = torch.randint(len(data), (spec.batch,), generator=generator)
        x = data[index] + spec.config.noise_std * torch.randn((spec.batch, *data.shape[1:]), generator=generator)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(spec, step)
        loss = model.bits_per_dim(model.patchify(x)).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step += 1
        elapsed += time.perf_counter() - start
        value = loss.item()
        loss_avg = value if loss_avg is None else 0.95 * loss_avg + 0.05 * value
        bar.update(1)
        bar.set_postfix(bpd=f"{loss_avg:.3f}")
        if step % spec.checkpoint_every == 0 or step == spec.steps:
            tmp = checkpoint.with_suffix(f".tmp-{os.getpid()}")
            state = {"model": model.state_dict(), "optimizer": optimizer.state_dict()}
            torch.save({**state, "step": step, "elapsed_s": elapsed}, tmp)
            os.replace(tmp, checkpoint)
    bar.close()
    model.eval()
    bpd = test_bits_per_dim(model, test_images[: spec.test_images])
    progress.status(f"{final.name}: test bits/dim {bpd:.3f} after {step} steps, {elapsed / 60:.1f} min of training")
    training = {
        "data": "fashion-mnist train (60,000), pixels in [-1, 1] + N(0, noise_std^2)",
        "steps": step,
        "batch": spec.batch,
        "lr": spec.lr,
        "seed": spec.seed,
        "threads": torch.get_num_threads(),
        "train_s": round(elapsed, 1),
        "test_bits_per_dim": round(bpd, 4),
        "test_images": len(test_images[: spec.test_images]),
    }
    tmp = assets.temp_sibling_dir(final)
    tarflow_model.save(model, tmp, extra={"accelc_training": training})
    if final.exists():
        import shutil

        shutil.rmtree(final)
    return assets.publish_dir(tmp, final)
