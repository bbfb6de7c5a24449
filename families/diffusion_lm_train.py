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

Two stages, each its own cached model (the second starts from the first):

1. `text`: plain windows of the novels, every token but the first maskable;
2. `sft`: the examples of LLaDA's SFT (arXiv 2502.09992 §2.3 and App. B): a prompt (a span of
   16-48 tokens of text), the response (the rest of the sentence the prompt stops in and up to
   `max_sentences` - 1 more) and `<|endoftext|>` padding up to the training length, which covers
   the benchmark's 32-token prompt plus 256 generated positions. Only response and padding are
   masked, and each example's loss is divided by their length (LLaDA's SFT estimator). The model
   learns where a text ends, and that after an end-of-text everything is end-of-text, so a sampler
   can commit the padding in parallel or stop at the end-of-text;
3. `sft-short`: the same examples, continuing `sft`, with every response at least
   `min_response` tokens long (it ends at one of the first sentence ends past that). Trained on
   responses that may end anywhere, the weak `sft` model puts its end-of-text prior above its
   text confidence at the far end of the first block and writes nothing (docs/diffusion.md);
   here no response ends inside the first `min_response` positions. That prior is only learned
   where the model sees it: the sampler's first call has the whole response masked, which
   t ~ U(eps, 1) rarely draws, so one example of each batch is fully masked (`full_mask`), and
   the padding after the end-of-text, ~80% of the positions, weighs 0.1 in the loss
   (`padding_weight`) so the text's tokens and its end carry the stage.

An sft-format stage ends with a response check: the benchmark's sampler (Fast-dLLM's factor rule,
factor 2, block 32) writes responses to `CHECK_PROMPTS` held-out prompts, and the check passes
when their median length reaches the stage's shortest training response. Training is not
reproducible across machines (another CPU sums its matmuls in another order), and this small
model sometimes lands where its end-of-text prior beats its text (docs/diffusion.md): then every
sampler "decodes" a response of a few tokens in a few calls, and a benchmark on it measures the
stop, not parallel decoding. `accelc train` exits 5 naming the lengths when the model it was
asked for fails the check (the model stays in the cache with its record).

The text is Jane Austen's novels with `persuasion` held out for evaluation. A run checkpoints
every `CHECKPOINT_EVERY` steps (weights, optimiser, step) and resumes from it; each step draws its
batch from its own seeded generator, so a resumed run sees the batches an unbroken one would. A
stage's cache key covers its data format, its threads and its starting point, so a changed format
trains anew instead of resuming an incompatible checkpoint. The finished model is a Dream folder in the asset
cache; `accelc_builtin.json` records the format, the cost (steps, tokens, seconds, threads,
precision) and the masked-token accuracy on the held-out novel before and after training.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import math
import re
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from accelc import progress
from accelc.errors import ValidationFailed

NAME = "smollm2-dream"
MASK_TOKEN = "<empty_output>"
EOS_TOKEN = "<|endoftext|>"
TRAIN_TEXTS = ("austen:prideprejudice", "austen:sensesensibility", "austen:emma", "austen:mansfieldpark")
HELD_OUT = "austen:persuasion"
CHECKPOINT_EVERY = 5
EPS = 1e-3
EVAL_LENGTH = 64  # the plain-window accuracy is measured at one length for every stage
CHECK_PROMPTS = 4  # held-out prompts of the response check
CHECK_PROMPT_TOKENS = 32  # the benchmark's prompt length; the rest of the training length is generated
# a full stop after these is not the end of a sentence
ABBREVIATIONS = ("Mr", "Mrs", "Dr", "St", "Messrs")
SENTENCE_END = re.compile(r"[.!?][\"'\u201d\u2019)_]*(?=\s)")
LINE_WRAP = re.compile(r"(?<=\S)[ \t]*\n(?=[ \t]*\S)")  # a line break inside a paragraph


@dataclass(frozen=True)
class TrainConfig:
    stage: str  # the cache name's suffix
    format: str  # "text" (plain windows) or "sft" (prompt + sentences + end-of-text padding)
    steps: int
    batch: int
    length: int
    lr: float = 1e-4
    warmup: int = 5
    seed: int = 0
    eval_examples: int = 16
    prompt_tokens: tuple[int, int] = (16, 48)  # sft: the prompt's length range, both ends included
    max_sentences: int = 4  # sft: the response ends after 1..max_sentences sentence ends
    min_response: int = 0  # sft: ...counted from the first past this many response tokens
    bf16: bool = False  # autocast the matmuls to bfloat16 (the weights stay float32)
    # join the novels' fixed-width line wraps: a break every ~70 characters is typesetting, and a
    # weak denoiser fills uncertain positions with that frequent token (runs of newlines)
    unwrap: bool = False
    start: str = ""  # the stage whose model this one continues ("": SmolLM2 itself)
    # sft: examples per batch whose whole response is masked (t = 1). The sampler's first call on a
    # response is that case, and U(eps, 1) draws it rarely: a model trained without it reads a mask
    # among masks as padding (true of partly masked examples) and puts end-of-text first
    full_mask: int = 0
    # sft: the loss weight of the padding after the first end-of-text (that one is the text's end and
    # keeps weight 1); the padding is ~80% of an example's positions
    padding_weight: float = 1.0
    # torch threads while training, part of the cache key: a matmul's sums are split by thread
    # count, so another count trains another model (session 18: the sft stage reached held-out text
    # accuracy 0.140 at one thread, 0.109 at two); one thread stepped as fast as two on 2 cores
    threads: int = 1

    def data_format(self) -> dict:
        """What an example is: the fields a checkpoint is only valid for (the cache key's input)."""
        fields = {"format": self.format, "length": self.length, "start": self.start, "threads": self.threads}
        if self.unwrap:
            fields["unwrap"] = True
        if self.format == "sft":
            fields |= {"prompt_tokens": list(self.prompt_tokens), "max_sentences": self.max_sentences}
            if self.min_response:
                fields["min_response"] = self.min_response
            if self.full_mask:
                fields["full_mask"] = self.full_mask
            if self.padding_weight != 1.0:
                fields["padding_weight"] = self.padding_weight
        return fields


# the first stage: 120 steps of plain windows (about 15 minutes on two shared cores)
TEXT = TrainConfig(stage="text", format="text", steps=120, batch=4, length=64)
# the second: prompt + response + padding at the benchmark's 32 + 256 positions
SFT = TrainConfig(stage="sft", format="sft", steps=430, batch=2, length=288, bf16=True, unwrap=True, start="text")
# the third: responses of at least 24 tokens (most of the first 32-token block), 1-2 sentences
SFT_SHORT = replace(
    SFT,
    stage="sft-short",
    steps=200,
    min_response=24,
    max_sentences=2,
    start="sft",
    full_mask=1,
    padding_weight=0.1,
)
STAGES = {cfg.stage: cfg for cfg in (TEXT, SFT, SFT_SHORT)}
# The built-ins `accelc train` makes. The SFT stage learned the padding but, at 430 steps, not yet
# where a text ends (it writes 0-1 tokens; docs/diffusion.md), so the default model is the text
# stage, which writes text; `smollm2-dream-sft` resumes the SFT stage for a longer run.
BUILTINS = {NAME: TEXT, f"{NAME}-sft": SFT, f"{NAME}-sft-short": SFT_SHORT}


def model_dir(cfg: TrainConfig) -> Path:
    """Where a stage's model is published, keyed by the SmolLM2 it starts from and its data format
    (the format of every stage it continues included)."""
    from accelc import assets

    chain = [cfg]
    while chain[-1].start:
        chain.append(STAGES[chain[-1].start])
    formats = json.dumps([c.data_format() for c in chain], sort_keys=True)
    digest = hashlib.sha256((assets.SMOLLM2_WHEEL.sha256 + formats).encode()).hexdigest()
    return assets.cache_root() / "models" / f"{NAME}-{cfg.stage}-{assets.key(digest)}"


def work_dir(cfg: TrainConfig) -> Path:
    return model_dir(cfg).with_name(model_dir(cfg).name + ".work")


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
        eos_token_id=tokenizer.convert_tokens_to_ids(EOS_TOKEN),
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


def unwrap(text: str) -> str:
    """`text` with the line breaks inside its paragraphs replaced by spaces (blank lines kept)."""
    return LINE_WRAP.sub(" ", text)


def sentences(text: str) -> list[str]:
    """`text` cut after each sentence end; the whitespace that follows goes with the next piece,
    so the pieces tokenise as the text does."""
    pieces, begin = [], 0
    for end in SENTENCE_END.finditer(text):
        words = text[begin : end.start()].split()
        if words and words[-1] in ABBREVIATIONS:
            continue
        pieces.append(text[begin : end.end()])
        begin = end.end()
    if begin < len(text):
        pieces.append(text[begin:])
    return pieces


def token_stream(tokenizer, specs, unwrapped: bool) -> tuple[list[int], list[int]]:
    """The texts' token ids and the positions just after each sentence end (ascending)."""
    from accelc.data import load_text

    ids: list[int] = []
    ends: list[int] = []
    for spec in specs:
        text = unwrap(load_text(spec)) if unwrapped else load_text(spec)
        for piece in tokenizer(sentences(text), add_special_tokens=False)["input_ids"]:
            ids += piece
            ends.append(len(ids))
    return ids, ends


def randint(torch, low: int, high: int, generator) -> int:
    """An integer in [low, high)."""
    return int(torch.randint(low, high, (1,), generator=generator))


def text_example(torch, stream, cfg: TrainConfig, generator) -> tuple[list[int], int]:
    """A plain window; only its first token is kept unmasked (the context the shift needs)."""
    ids, _ = stream
    start = randint(torch, 0, len(ids) - cfg.length, generator)
    return ids[start : start + cfg.length], 1


def sft_example(torch, stream, cfg: TrainConfig, eos_id: int, generator) -> tuple[list[int], int]:
    """A prompt of `prompt_tokens` tokens from a random position, the response up to the n-th
    sentence end at least `min_response` tokens after it (n in 1..max_sentences, fewer when they
    do not fit), end-of-text padding to `length` (at least one). Returns the ids and the prompt's
    length."""
    ids, ends = stream
    low, high = cfg.prompt_tokens
    while True:
        prompt = randint(torch, low, high + 1, generator)
        start = randint(torch, 0, len(ids) - cfg.length, generator)
        first = bisect.bisect_right(ends, start + prompt + cfg.min_response)  # the first end it may stop at
        fitting = [e for e in ends[first : first + cfg.max_sentences] if e - start < cfg.length]
        if fitting:
            end = fitting[randint(torch, 0, len(fitting), generator)]
            return ids[start:end] + [eos_id] * (cfg.length - (end - start)), prompt


def training_batch(torch, stream, cfg: TrainConfig, eos_id: int, mask_id: int, generator):
    """`batch` examples, their response (and padding) masked at rate t ~ U(eps, 1) per example.
    Returns the clean ids, the noisy ids, the masked positions, t, and each example's maskable length."""
    examples = [
        sft_example(torch, stream, cfg, eos_id, generator)
        if cfg.format == "sft"
        else text_example(torch, stream, cfg, generator)
        for _ in range(cfg.batch)
    ]
    x = torch.tensor([ids for ids, _ in examples])
    prompt = torch.tensor([[p] for _, p in examples])
    maskable = torch.arange(cfg.length).expand_as(x) >= prompt
    t = EPS + (1 - EPS) * torch.rand(cfg.batch, 1, generator=generator)
    t[: cfg.full_mask] = 1.0
    masked = (torch.rand(x.shape, generator=generator) < t) & maskable
    noisy = torch.where(masked, torch.full_like(x, mask_id), x)
    return x, noisy, masked, t, maskable.sum(1)


def diffusion_loss(model, x, noisy, masked, t, maskable, padding_weight: float = 1.0, eos_id: int | None = None):
    """1/t-weighted cross-entropy of the masked tokens, each predicted from the previous position's
    hidden state (the shift), summed per example over its maskable length and averaged over the
    batch (LLaDA Eq. 3's estimator; its SFT form, App. B, when only the response is maskable).
    Returns the loss, whether each masked token's argmax was right, and the targets."""
    import torch

    positions = torch.arange(x.shape[1]).expand_as(x)
    hidden = model.model.embed_tokens(noisy)
    cos, sin = model.rope(positions)
    for layer in model.model.layers:
        hidden, _, _ = layer(hidden, cos, sin)
    rows, cols = masked[:, 1:].nonzero(as_tuple=True)  # target position cols+1, read at cols
    logits = model.hidden_logits(hidden[rows, cols])  # the head only where it is scored
    targets = x[rows, cols + 1]
    losses = torch.nn.functional.cross_entropy(logits.float(), targets, reduction="none")
    if padding_weight != 1.0:  # a target after an end-of-text is padding
        losses = torch.where((targets == eos_id) & (x[rows, cols] == eos_id), losses * padding_weight, losses)
    weighted = (losses / t[rows, 0] / maskable[rows]).sum() / x.shape[0]
    return weighted, logits.argmax(-1) == targets, targets


def masked_accuracy(model, stream, cfg: TrainConfig, eos_id: int, mask_id: int) -> dict:
    """Argmax accuracy on the masked tokens of seeded held-out examples in `cfg`'s format, t ~ U(eps, 1):
    of text tokens, and (sft) of the end-of-text padding, separately."""
    import torch

    generator = torch.Generator().manual_seed(1234)
    hits = {"text": 0.0, "padding": 0.0}
    total = {"text": 0, "padding": 0}
    with torch.no_grad():
        for _ in range(cfg.eval_examples // cfg.batch):
            batch = training_batch(torch, stream, cfg, eos_id, mask_id, generator)
            _, correct, targets = diffusion_loss(model, *batch)
            for kind, where in (("text", targets != eos_id), ("padding", targets == eos_id)):
                hits[kind] += float(correct[where].sum())
                total[kind] += int(where.sum())
    return {kind: hits[kind] / total[kind] for kind in hits if total[kind]}


def start_model(cfg: TrainConfig):
    """The model and tokenizer a stage begins with: SmolLM2, or the model of the stage it continues
    (trained first if it is not in the cache)."""
    if not cfg.start:
        return initial_model()
    from accelc.families import diffusion_lm_model as dm

    folder = train_stage(STAGES[cfg.start])
    return dm.load(folder), tokenizer_for(folder)


def train(name: str = NAME, steps: int | None = None, fresh: bool = False) -> Path:
    """Train built-in `name`'s stage and every stage before it not yet in the cache; `steps` and
    `fresh` apply to the last one. ValidationFailed (exit 5) when that stage's model fails its
    response check (a model published before the check existed is checked now)."""
    cfg = replace(BUILTINS[name], **({"steps": steps} if steps else {}))
    final = train_stage(cfg, fresh)
    info_file = final / "accelc_builtin.json"
    info = json.loads(info_file.read_text())
    if cfg.format == "sft" and "response_check" not in info:
        with torch_threads(cfg.threads), progress.step(f"{NAME} ({cfg.stage}): response check"):
            info["response_check"] = response_check_of(final, cfg)
        tmp = info_file.with_name(info_file.name + ".tmp")
        tmp.write_text(json.dumps(info, indent=2))
        tmp.replace(info_file)
    check = info.get("response_check")
    if check and not check["passed"]:
        raise ValidationFailed(
            f"{name} in {final} writes responses of {check['text_tokens']} tokens to {check['prompts']} held-out "
            f"prompts (median under the {check['expected_at_least']} its training responses have at least): "
            "it ends its responses before writing them, and a diffusion benchmark on it would measure the "
            "early stop, not parallel decoding (docs/diffusion.md). The model stays in the cache with this record."
        )
    return final


def response_check(denoiser, prompts: list[list[int]], eos_id: int, expected: int, gen_length: int) -> dict:
    """Whether a model writes responses: the lengths, up to the first end-of-text, that Fast-dLLM's
    factor rule (factor 2, block 32: the diffusion benchmark's sampler) writes after `prompts`;
    passed when their median reaches `expected` tokens."""
    import statistics

    from accelc.loops.diffusion import SamplerOptions, generate

    opts = SamplerOptions(sampler="fast_factor", factor=2.0, gen_length=gen_length, block_length=32)
    lengths = [len(generate(denoiser, prompt, opts).text_tokens(eos_id)) for prompt in prompts]
    return {
        "sampler": opts.sampler,
        "factor": opts.factor,
        "gen_length": gen_length,
        "block_length": opts.block_length,
        "prompts": len(prompts),
        "text_tokens": lengths,
        "expected_at_least": expected,
        "passed": statistics.median(lengths) >= expected,
    }


def response_check_of(folder: Path, cfg: TrainConfig) -> dict:
    """`response_check` of the Dream folder `folder` trained as `cfg`, on torch, over held-out
    Persuasion prompts, expecting the stage's shortest training response (at least one token)."""
    from accelc.families import diffusion_lm_model as dm
    from accelc.families.diffusion_lm_bench import prompts
    from accelc.runtime.denoiser import TorchDenoiser

    model = dm.load(folder)
    held_out = prompts(tokenizer_for(folder), CHECK_PROMPTS, CHECK_PROMPT_TOKENS)
    return response_check(
        TorchDenoiser(model),
        held_out,
        model.config.eos_token_id,
        max(1, cfg.min_response),
        cfg.length - CHECK_PROMPT_TOKENS,
    )


@contextmanager
def torch_threads(threads: int):
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def train_stage(cfg: TrainConfig, fresh: bool = False) -> Path:
    """Train one stage (the stages before it first, if they are not in the cache) on its threads."""
    with torch_threads(cfg.threads):
        return _train_stage(cfg, fresh)


def _train_stage(cfg: TrainConfig, fresh: bool = False) -> Path:
    import shutil

    import torch

    from accelc import assets
    from accelc.families import diffusion_lm_model as dm

    final = model_dir(cfg)
    if final.is_dir() and not fresh:
        progress.status(f"{NAME} ({cfg.stage}): already trained in {final}")
        return final
    work = work_dir(cfg)
    if fresh:
        shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    with progress.step(f"{NAME} ({cfg.stage}): the starting model"):
        model, tokenizer = start_model(cfg)
    mask_id, eos_id = model.config.mask_token_id, model.config.eos_token_id
    with progress.step(f"{NAME}: tokenizing Austen ({HELD_OUT} held out)"):
        train_stream = token_stream(tokenizer, TRAIN_TEXTS, cfg.unwrap)
        eval_stream = token_stream(tokenizer, [HELD_OUT], cfg.unwrap)
    plain = replace(TEXT, length=EVAL_LENGTH, batch=4)

    def accuracy() -> dict:
        model.eval()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
            scores = {"windows": masked_accuracy(model, eval_stream, plain, eos_id, mask_id)["text"]}
            if cfg.format == "sft":  # every stage scored on one draw of t, so the figures compare
                scores |= masked_accuracy(model, eval_stream, replace(cfg, full_mask=0), eos_id, mask_id)
        model.train()
        return scores

    for p in model.model.embed_tokens.parameters():
        p.requires_grad_(False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: min(1.0, (s + 1) / cfg.warmup) * 0.5 * (1 + math.cos(math.pi * min(s, cfg.steps) / cfg.steps)),
    )
    checkpoint = work / "checkpoint.pt"
    record = {"steps_done": 0, "seconds": 0.0, "losses": [], "data_format": cfg.data_format()}
    if checkpoint.exists():
        saved = torch.load(checkpoint, weights_only=True)
        model.load_state_dict(saved["model"], strict=False)
        optimizer.load_state_dict(saved["optimizer"])
        schedule.load_state_dict(saved["schedule"])
        record = json.loads((work / "record.json").read_text())
        progress.status(f"{NAME} ({cfg.stage}): resuming at step {record['steps_done']}")
    else:
        with progress.step(f"{NAME} ({cfg.stage}): masked-token accuracy on {HELD_OUT} before training"):
            record["accuracy_before"] = accuracy()
    model.train()
    bar = progress.bar(total=cfg.steps, initial=record["steps_done"], desc=f"{NAME} {cfg.stage}", unit="step")
    while record["steps_done"] < cfg.steps:
        t0 = time.perf_counter()
        generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + record["steps_done"])
        batch = training_batch(torch, train_stream, cfg, eos_id, mask_id, generator)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
            loss, correct, _ = diffusion_loss(model, *batch, cfg.padding_weight, eos_id)
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
        bar.set_postfix(loss=f"{loss:.3f}", acc=f"{float(correct.float().mean()):.3f}")
        if record["steps_done"] % CHECKPOINT_EVERY == 0 or record["steps_done"] == cfg.steps:
            state = {"model": {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}}
            tmp = work / "checkpoint.pt.tmp"
            torch.save({**state, "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict()}, tmp)
            tmp.replace(checkpoint)
            (work / "record.json").write_text(json.dumps(record))
    bar.close()
    with progress.step(f"{NAME} ({cfg.stage}): masked-token accuracy on {HELD_OUT}"):
        record["accuracy_after"] = accuracy()
    progress.status(
        f"{NAME} ({cfg.stage}): masked-token accuracy on {HELD_OUT} {record['accuracy_before']} -> "
        f"{record['accuracy_after']} after {cfg.steps} steps ({record['seconds'] / 60:.1f} min, "
        f"{torch.get_num_threads()} threads)"
    )
    model.eval()
    tmp = assets.temp_sibling_dir(final)
    dm.save(model, tmp)
    tokenizer.save_pretrained(tmp)
    cost = {
        "steps": cfg.steps,
        "tokens": cfg.steps * cfg.batch * cfg.length,
        "train_seconds": round(record["seconds"], 1),
        "threads": torch.get_num_threads(),
        "precision": "bf16 autocast" if cfg.bf16 else "fp32",
        "config": asdict(cfg),
    }
    info = {"name": NAME, "stage": cfg.stage, "data_format": cfg.data_format(), "cost": cost}
    if cfg.start:
        info["continues"] = json.loads((model_dir(STAGES[cfg.start]) / "accelc_builtin.json").read_text())
    info |= {"held_out": HELD_OUT, "train_texts": list(TRAIN_TEXTS)}
    info["masked_token_accuracy"] = {"before": record["accuracy_before"], "after": record["accuracy_after"]}
    info["loss_first_last"] = [record["losses"][:10], record["losses"][-10:]]
    if cfg.format == "sft":
        with progress.step(f"{NAME} ({cfg.stage}): response check"):
            info["response_check"] = response_check_of(tmp, cfg)
        progress.status(f"{NAME} ({cfg.stage}): response check {info['response_check']}")
    (tmp / "accelc_builtin.json").write_text(json.dumps(info, indent=2))
    return assets.publish_dir(tmp, final)
