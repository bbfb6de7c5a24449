"""`accelc train smollm2-dream`: the embedded SmolLM2-135M adapted into a Dream-style masked-diffusion LM.

No masked-diffusion LM can be downloaded here, so the project makes its own small one from the
autoregressive model it already has, by the adaptation recipe of DiffuLLaMA/DiffuGPT (Gong et
al., arXiv 2410.17891 §3) and Dream (arXiv 2508.15487):

- attention made bidirectional from the first step (DiffuLLaMA's 7B trainer: no annealing);
- the logit shift kept: token i is predicted from the hidden state at i-1, so the pretrained
  next-token head is reused as is;
- the loss: t ~ U(eps, 1), every response token masked with probability t, cross-entropy on the
  masked tokens weighted by 1/t over the sequence length (the masked-diffusion ELBO, LLaDA arXiv
  2502.09992 Eq. 3); the first token is never masked, it is the context the shift needs;
- the mask token is an existing special token the text never contains (`<empty_output>`), as
  DiffuLLaMA reuses one: the vocabulary and its embedding keep their size;
- the tied embedding and head are frozen (they are a fifth of the weights; the text is small).

The text is Jane Austen's novels with `persuasion` held out for evaluation. A run checkpoints
every `CHECKPOINT_EVERY` steps (weights, optimiser, data position) and resumes from it; the
finished model is a Dream folder in the asset cache with its cost and its masked-token accuracy
on the held-out novel, before and after training, in `accelc_builtin.json`.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

from accelc import progress

NAME = "smollm2-dream"
MASK_TOKEN = "<empty_output>"
TRAIN_TEXTS = ("austen:prideprejudice", "austen:sensesensibility", "austen:emma", "austen:mansfieldpark")
HELD_OUT = "austen:persuasion"
CHECKPOINT_EVERY = 5
EPS = 1e-3


@dataclass(frozen=True)
class TrainConfig:
    # sized for a short CPU run: about 10 s a step on two shared cores, 20 minutes in all
    steps: int = 120
    batch: int = 4
    length: int = 64
    lr: float = 1e-4
    warmup: int = 5
    seed: int = 0
    eval_windows: int = 16


def model_dir() -> Path:
    """Where the trained model is published (keyed by the SmolLM2 it starts from)."""
    from accelc import assets

    return assets.cache_root() / "models" / f"{NAME}-{assets.key(assets.SMOLLM2_WHEEL.sha256)}"


def work_dir() -> Path:
    return model_dir().with_name(model_dir().name + ".work")


def initial_model():
    """SmolLM2's weights in a Dream-style denoiser (its Llama names are Qwen2's; zero q/k/v biases
    make the folder Dream's exact layout)."""
    import torch
    from safetensors.torch import load_file

    from accelc import assets
    from accelc.families import diffusion_lm_model as dm

    source = assets.smollm2_dir()
    raw = json.loads((source / "config.json").read_text())
    tokenizer = tokenizer_for(source)
    cfg = dm.DiffusionConfig(
        architecture="dream",
        vocab_size=raw["vocab_size"],
        hidden_size=raw["hidden_size"],
        intermediate_size=raw["intermediate_size"],
        num_layers=raw["num_hidden_layers"],
        num_heads=raw["num_attention_heads"],
        num_kv_heads=raw["num_key_value_heads"],
        rope_theta=raw["rope_theta"],
        rms_norm_eps=raw["rms_norm_eps"],
        mask_token_id=tokenizer.mask_token_id,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        max_positions=raw["max_position_embeddings"],
        qkv_bias=True,
        tie_embeddings=True,
    )
    model = dm.DiffusionLM(cfg)
    state = {k: v.to(torch.float32) for k, v in load_file(str(source / "model.safetensors")).items()}
    state.pop("lm_head.weight", None)
    missing, unexpected = model.load_state_dict(state, strict=False)
    biases = {n for n in missing if n.endswith("_proj.bias")}
    if unexpected or set(missing) - biases - {"lm_head.weight"}:
        raise RuntimeError(f"SmolLM2 weights do not fit the denoiser: missing {missing}, unexpected {unexpected}")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in biases:
                p.zero_()
    return model, tokenizer


def tokenizer_for(source: Path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
    tokenizer.mask_token = MASK_TOKEN
    return tokenizer


def token_stream(tokenizer, specs) -> list[int]:
    from accelc.data import load_text

    ids: list[int] = []
    for spec in specs:
        ids += tokenizer(load_text(spec))["input_ids"]
    return ids


def masked_batch(torch, ids, starts, length, mask_id, generator):
    """Windows at `starts`, each masked at rate t ~ U(eps, 1) (never its first token)."""
    x = torch.stack([torch.as_tensor(ids[s : s + length]) for s in starts])
    t = EPS + (1 - EPS) * torch.rand(len(starts), 1, generator=generator)
    masked = torch.rand(x.shape, generator=generator) < t
    masked[:, 0] = False
    noisy = torch.where(masked, torch.full_like(x, mask_id), x)
    return x, noisy, masked, t


def diffusion_loss(model, x, noisy, masked, t):
    """1/t-weighted cross-entropy of the masked tokens, each predicted from the previous position's
    hidden state (the shift), summed and divided by the tokens (LLaDA Eq. 3's estimator)."""
    import torch

    positions = torch.arange(x.shape[1]).expand_as(x)
    hidden = model.model.embed_tokens(noisy)
    cos, sin = model.rope(positions)
    for layer in model.model.layers:
        hidden, _, _ = layer(hidden, cos, sin)
    rows, cols = masked[:, 1:].nonzero(as_tuple=True)  # target position cols+1, read at cols
    logits = model.hidden_logits(hidden[rows, cols])  # the head only where it is scored
    losses = torch.nn.functional.cross_entropy(logits, x[rows, cols + 1], reduction="none")
    weighted = (losses / t[rows, 0]).sum() / (x.shape[0] * (x.shape[1] - 1))
    correct = (logits.argmax(-1) == x[rows, cols + 1]).float()
    return weighted, correct


def masked_accuracy(model, ids, cfg: TrainConfig, mask_id: int) -> float:
    """Accuracy of the argmax prediction on masked tokens of held-out windows, t ~ U(eps, 1), seeded."""
    import torch

    generator = torch.Generator().manual_seed(1234)
    stride = max(1, (len(ids) - cfg.length) // cfg.eval_windows)
    hits = total = 0
    with torch.no_grad():
        for k in range(0, cfg.eval_windows, cfg.batch):
            starts = [stride * j for j in range(k, min(k + cfg.batch, cfg.eval_windows))]
            x, noisy, masked, t = masked_batch(torch, ids, starts, cfg.length, mask_id, generator)
            _, correct = diffusion_loss(model, x, noisy, masked, t)
            hits += float(correct.sum())
            total += correct.numel()
    return hits / max(total, 1)


def train(steps: int | None = None, fresh: bool = False) -> Path:
    import shutil

    import torch

    from accelc import assets
    from accelc.families import diffusion_lm_model as dm

    cfg = TrainConfig(**({"steps": steps} if steps else {}))
    final = model_dir()
    if final.is_dir() and not fresh:
        progress.status(f"{NAME}: already trained in {final}")
        return final
    work = work_dir()
    if fresh:
        shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    with progress.step(f"{NAME}: SmolLM2-135M as a Dream-style denoiser"):
        model, tokenizer = initial_model()
    mask_id = model.config.mask_token_id
    with progress.step(f"{NAME}: tokenizing Austen ({HELD_OUT} held out)"):
        train_ids = token_stream(tokenizer, TRAIN_TEXTS)
        eval_ids = token_stream(tokenizer, [HELD_OUT])
    for p in model.model.embed_tokens.parameters():
        p.requires_grad_(False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: min(1.0, (s + 1) / cfg.warmup) * 0.5 * (1 + math.cos(math.pi * min(s, cfg.steps) / cfg.steps)),
    )
    checkpoint = work / "checkpoint.pt"
    record = {"steps_done": 0, "seconds": 0.0, "losses": []}
    if checkpoint.exists():
        saved = torch.load(checkpoint, weights_only=True)
        model.load_state_dict(saved["model"], strict=False)
        optimizer.load_state_dict(saved["optimizer"])
        schedule.load_state_dict(saved["schedule"])
        record = json.loads((work / "record.json").read_text())
        progress.status(f"{NAME}: resuming at step {record['steps_done']}")
    else:
        model.eval()
        with progress.step(f"{NAME}: masked-token accuracy of the unadapted model on {HELD_OUT}"):
            record["accuracy_before"] = masked_accuracy(model, eval_ids, cfg, mask_id)
    generator = torch.Generator().manual_seed(cfg.seed)
    for _ in range(record["steps_done"]):  # the data position: the same batches as an unbroken run
        torch.randint(0, len(train_ids) - cfg.length, (cfg.batch,), generator=generator)
        masked_batch(torch, train_ids, [0] * cfg.batch, cfg.length, mask_id, generator)
    model.train()
    bar = progress.bar(total=cfg.steps, initial=record["steps_done"], desc=f"{NAME} training", unit="step")
    while record["steps_done"] < cfg.steps:
        t0 = time.perf_counter()
        starts = torch.randint(0, len(train_ids) - cfg.length, (cfg.batch,), generator=generator).tolist()
        x, noisy, masked, t = masked_batch(torch, train_ids, starts, cfg.length, mask_id, generator)
        loss, correct = diffusion_loss(model, x, noisy, masked, t)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        schedule.step()
        record["steps_done"] += 1
        record["seconds"] += time.perf_counter() - t0
        loss = float(loss.detach())
        record["losses"].append(round(loss, 4))
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}", acc=f"{float(correct.mean()):.3f}")
        if record["steps_done"] % CHECKPOINT_EVERY == 0 or record["steps_done"] == cfg.steps:
            state = {"model": {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}}
            tmp = work / "checkpoint.pt.tmp"
            torch.save({**state, "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict()}, tmp)
            tmp.replace(checkpoint)
            (work / "record.json").write_text(json.dumps(record))
    bar.close()
    model.eval()
    with progress.step(f"{NAME}: masked-token accuracy on {HELD_OUT}"):
        record["accuracy_after"] = masked_accuracy(model, eval_ids, cfg, mask_id)
    progress.status(
        f"{NAME}: masked-token accuracy on {HELD_OUT} {record['accuracy_before']:.3f} -> {record['accuracy_after']:.3f} "
        f"after {cfg.steps} steps ({record['seconds'] / 60:.1f} min, {torch.get_num_threads()} threads)"
    )
    tmp = assets.temp_sibling_dir(final)
    dm.save(model, tmp)
    tokenizer.save_pretrained(tmp)
    cost = {
        "steps": cfg.steps,
        "tokens": cfg.steps * cfg.batch * cfg.length,
        "train_seconds": round(record["seconds"], 1),
        "threads": torch.get_num_threads(),
        "config": cfg.__dict__,
    }
    info = {"name": NAME, "cost": cost, "held_out": HELD_OUT, "train_texts": list(TRAIN_TEXTS)}
    info["masked_token_accuracy"] = {"before": record["accuracy_before"], "after": record["accuracy_after"]}
    info["loss_first_last"] = [record["losses"][:10], record["losses"][-10:]]
    (tmp / "accelc_builtin.json").write_text(json.dumps(info, indent=2))
    return assets.publish_dir(tmp, final)
