"""How a masked-diffusion LM artifact is proved and run: denoiser parity of every backend against
torch, the planned sampler's tokens on each, and `accelc run`'s text and call statistics."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from accelc import progress
from accelc.errors import UsageError


def encode(tokenizer, prompt: str) -> list[int]:
    """The prompt's tokens as the model saw text in training: no special tokens (SmolLM2's
    tokenizer would prepend `<|im_start|>`, which no trained prompt starts with)."""
    ids = list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    if not ids:
        raise UsageError("the prompt is empty after tokenization: a diffusion sampler needs a non-empty prompt")
    return ids


def parity(reference, other, ids: list[int], gen_length: int, block_length: int) -> float:
    """Largest logit difference of `other` against `reference`: a call over the whole masked
    sequence, and a dual-cache call over its first block with the other positions' cached keys
    and values (each backend's own)."""
    x = np.asarray(ids + [reference.mask_id] * gen_length, dtype=np.int64)
    full_ref, kv_ref = reference(x)
    full_other, kv_other = other(x)
    start, end = len(ids) - reference.shift, len(ids) + block_length

    def window(denoiser, kv):
        context = [
            (np.concatenate([k[:, :, :start], k[:, :, end:]], 2), np.concatenate([v[:, :, :start], v[:, :, end:]], 2))
            for k, v in kv
        ]
        return denoiser(x[start:end], start, context)[0]

    return float(
        max(np.abs(full_ref - full_other).max(), np.abs(window(reference, kv_ref) - window(other, kv_other)).max())
    )


def prove(directory: Path, recipe, manifest: dict) -> tuple[dict, bool]:
    from accelc.families.diffusion_lm import open_denoiser, plan_of
    from accelc.loops.diffusion import generate
    from accelc.runtime.artifact import Artifact

    art = Artifact(directory)
    plan = plan_of(directory)
    spec = recipe.eval.parity
    prompts = [encode(art.tokenizer, p) for p in spec.prompts]
    reference = open_denoiser(art, "torch")
    expected = [generate(reference, ids, plan).tokens for ids in prompts]
    report = {"atol": spec.atol, "plan": plan.model_dump(mode="json"), "backends": {}}
    ok = True
    for backend in art.backends():
        if backend == "torch":
            continue
        denoiser = open_denoiser(art, backend)
        diff = max(parity(reference, denoiser, ids, plan.gen_length, plan.block_length) for ids in prompts)
        same = [generate(denoiser, ids, plan).tokens == want for ids, want in zip(prompts, expected)]
        verdict = diff <= spec.atol and all(same)
        ok &= verdict
        report["backends"][backend] = {
            "max_abs_diff": diff,
            "same_tokens": same,
            "verdict": "pass" if verdict else "fail",
        }
    report["verdict"] = "pass" if ok else "fail"
    (directory / "reports").mkdir(exist_ok=True)
    (directory / "reports" / "validation.json").write_text(json.dumps(report, indent=2))
    metrics = {
        "validation": {b: r["verdict"] for b, r in report["backends"].items()},
        "max_abs_diff": {b: r["max_abs_diff"] for b, r in report["backends"].items()},
    }
    if not ok:
        metrics["failure"] = "a backend's denoiser or sampled tokens disagree with torch (reports/validation.json)"
    return metrics, ok


def run(art, args) -> int:
    from accelc.families.diffusion_lm import open_denoiser, plan_of
    from accelc.loops.diffusion import generate
    from accelc.runtime import limits

    if args.prompt is None:
        raise UsageError("accelc run: a masked-diffusion LM artifact needs --prompt")
    limits.at_least("--max-new-tokens", args.max_new_tokens)
    limits.temperature(args.temperature)
    plan = plan_of(art.dir)
    update = {}
    if args.max_new_tokens is not None:
        update["gen_length"] = args.max_new_tokens
    if args.temperature is not None:
        update["temperature"] = args.temperature
    if args.seed is not None:
        update["seed"] = args.seed
    plan = plan.model_copy(update=update)
    plan.check()  # a length the blocks do not tile is exit 2 before any session opens
    ids = encode(art.tokenizer, args.prompt)
    limits.check_generation(art.context_length, len(ids), plan.gen_length, "--max-new-tokens")
    backend = args.backend or ("ort" if "ort" in art.backends() else "torch")
    denoiser = open_denoiser(art, backend)
    result = generate(denoiser, ids, plan)
    print(art.tokenizer.decode(result.text_tokens(denoiser.eos_id), skip_special_tokens=True))
    progress.status(
        f"{backend} [{plan.label()}, block {plan.block_length}]: {len(result.tokens)} tokens, "
        f"{result.calls} calls, {result.tokens_per_call:.2f} tokens per call, {result.tokens_per_second:.1f} tok/s"
    )
    if args.show_tokens:
        print(json.dumps(result.tokens))
    return 0
