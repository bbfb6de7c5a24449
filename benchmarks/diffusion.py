"""Diffusion-LM samplers side by side on ONNX Runtime: model calls, tokens per call, tokens/s,
agreement with the LLaDA baseline and the quality of what each one writes.

Run as `python -m benchmarks.diffusion [--quick] --json OUT.json` (the plot goes to OUT.png).

The model is the project's own small masked-diffusion LM (`accelc train smollm2-dream-sft-short`,
the stage that writes a response and ends it), or any LLaDA/Dream folder given by --model, its
denoiser exported to ONNX and run by ONNX Runtime. For
each generation length, every configuration (the baseline, SlowFast, Fast-dLLM threshold and
factor, each with no cache, the prefix cache and the dual cache) decodes the same held-out
prompts ("Persuasion", its line wraps joined as in the model's training text), interleaved
prompt by prompt so that machine load hits all alike.

Rows: `sampler`, `cache`, `stop_at_eos`, `stop_rule` (one row per `--stop-rules` value), `gen_length`, `block_length`, `threshold` (fast_threshold
rows, one per `--thresholds` value) and `factor` (fast_factor rows, one per `--factors`), `calls` and
`tokens_per_call` (means over prompts), `padding_calls` (mean calls that decoded nothing but
end-of-text), `text_tokens` (mean response length up to its first end-of-text), `tok_s` (response
tokens over generation seconds), `calls_reduction` (the baseline's calls over the configuration's)
and `speedup` (median of the per-prompt paired ratios of the baseline's seconds over the
configuration's), both against the baseline at the same `gen_length`; `agreement` (fraction of the
baseline's response tokens reproduced), `quality` (median perplexity, under SmolLM2-135M itself, of
the continuations up to end-of-text: lower is better) and `baseline_quality`, with
`quality_per_prompt` and `baseline_quality_per_prompt` (prompt by prompt, in one order),
`same_texts` (prompts whose text, up to end-of-text, is the baseline's) and `baseline_spread`:
greedy sampling gives the baseline no run-to-run spread on one prompt, so this is the spread of
the benchmark's own figure, the 95% interval of the baseline's median perplexity over prompts
resampled with replacement (what a run on another draw of as many prompts would read). On 8
prompts it is wide (docs/diffusion.md): judge a configuration by its texts, prompt by prompt,
and read the interval as the figure's resolution. Reference rows
(`smollm2_ar`: SmolLM2's own greedy continuations; `unigram`: tokens drawn from the training text's
unigram distribution) carry the quality figure only.

The baseline is LLaDA's sampler as published: one token a call (steps = gen_length) and no early
stop, so it spends calls on the end-of-text padding too. Every other configuration stops at the
end-of-text (`stop_at_eos`, by `stop_rule`: `settled` keeps the text the sampler writes without
the stop, `eos` stops sooner); the row `baseline` with `stop_at_eos` true separates what the early
stop saves from what parallel decoding saves. dLLM-Cache reuses per-layer features
and runs on torch only: its rows (`backend` torch) take their speedup against the baseline on
torch, run beside them; every other row's backend is ort. `--samplers` and `--caches` choose a
subset (the baseline without cache always runs: it is the reference).

A built-in model that failed the response check of `accelc train` (it writes a few tokens where its
training responses have at least 24) is refused (exit 2): on it every sampler stops after a few
calls, and the figures would be the stop's. `--allow-failed-model` measures it anyway; the
protocol records the check (`model_response_check`).
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
from pathlib import Path

from benchmarks import common

SAMPLERS = ("baseline", "slowfast", "fast_threshold", "fast_factor")
CACHES = ("none", "prefix", "dual", "dllm_cache")


def perplexity(scorer, prompt: list[int], continuation: list[int]) -> float | None:
    """exp(mean NLL) of `continuation` after `prompt` under the causal LM `scorer` (None if empty)."""
    import torch

    if not continuation:
        return None
    ids = torch.tensor([prompt + continuation])
    with torch.inference_mode():
        logits = scorer(ids).logits[0, len(prompt) - 1 : -1].float()
    nll = torch.nn.functional.cross_entropy(logits, torch.tensor(continuation))
    return float(torch.exp(nll))


def quality(values) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def spread(values, draws: int = 2000, seed: int = 0) -> list[float] | None:
    """95% bootstrap interval of `quality(values)` over the prompts, resampled with replacement."""
    import numpy as np

    values = np.array([v for v in values if v is not None])
    if not values.size:
        return None
    picks = np.random.default_rng(seed).integers(0, values.size, (draws, values.size))
    medians = np.median(values[picks], axis=1)
    return [float(np.quantile(medians, 0.025)), float(np.quantile(medians, 0.975))]


def reference_rows(scorer, prompts, gen_length, eos_id, unigram, rng) -> list[dict]:
    """SmolLM2's own greedy continuations and unigram samples, scored the same way."""
    import torch

    own, drawn = [], []
    for prompt in prompts:
        with torch.inference_mode():
            out = scorer.generate(
                torch.tensor([prompt]), max_new_tokens=gen_length, do_sample=False, eos_token_id=eos_id
            )
        continuation = out[0, len(prompt) :].tolist()
        if eos_id in continuation:
            continuation = continuation[: continuation.index(eos_id)]
        own.append(perplexity(scorer, prompt, continuation))
        drawn.append(perplexity(scorer, prompt, rng.choice(len(unigram), gen_length, p=unigram).tolist()))
    return [
        {"sampler": name, "cache": "none", "gen_length": gen_length, "quality": quality(values)}
        for name, values in (("smollm2_ar", own), ("unigram", drawn))
    ]


def response_check_record(folder: Path) -> dict | None:
    """The response check `accelc train` recorded for a built-in model (None for other folders)."""
    info = folder / "accelc_builtin.json"
    return json.loads(info.read_text()).get("response_check") if info.is_file() else None


def main(argv=None) -> int:
    p = common.parser(__doc__)
    p.add_argument(
        "--quick", action="store_true", help="generation length 64 and 2 prompts (about 9 minutes on 2 shared cores)"
    )
    p.add_argument("--model", default="smollm2-dream-sft-short", help="a built-in diffusion LM or a LLaDA/Dream folder")
    p.add_argument("--prompts", type=int, help="prompts per generation length (default 8; 2 with --quick)")
    p.add_argument("--gen-lengths", type=int, nargs="+", help="default 64 256; 64 with --quick")
    p.add_argument("--block-length", type=int, default=32)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--samplers", nargs="+", choices=SAMPLERS, default=list(SAMPLERS))
    p.add_argument("--caches", nargs="+", choices=CACHES, default=list(CACHES), help="dllm_cache rows run on torch")
    p.add_argument(
        "--thresholds",
        type=float,
        nargs="+",
        default=[0.9],
        help="fast_threshold's confidence thresholds (one row each)",
    )
    p.add_argument("--factors", type=float, nargs="+", default=[1.0], help="fast_factor's factors (one row each)")
    p.add_argument(
        "--stop-rules",
        nargs="+",
        choices=("settled", "eos"),
        default=["settled"],
        help="early-stop rules of the stopping rows (one row each)",
    )
    p.add_argument(
        "--allow-failed-model",
        action="store_true",
        help="measure a built-in model whose response check failed (it writes a few tokens and ends); "
        "the protocol records the check",
    )
    args = p.parse_args(argv)
    env = common.quiet_threads(args.threads)

    import numpy as np
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from accelc import assets, progress
    from accelc.data import load_text
    from accelc.families import diffusion_lm_model as dm
    from accelc.families.diffusion_lm import builtin_dir
    from accelc.families.diffusion_lm_bench import prompts as held_out_prompts
    from accelc.families.diffusion_lm_train import TRAIN_TEXTS, unwrap
    from accelc.loops.diffusion import SamplerOptions, generate
    from accelc.passes.diffusion_sampling import agreement
    from accelc.passes.export_denoiser import export
    from accelc.runtime.denoiser import TorchDenoiser
    from accelc.runtime.ort_denoiser import OrtDenoiser

    folder = Path(args.model) if Path(args.model).is_dir() else builtin_dir(args.model)
    check = response_check_record(folder)
    if check and not check["passed"] and not args.allow_failed_model:
        print(
            f"error: {folder} failed its response check (responses of {check['text_tokens']} tokens where "
            f"its training responses have at least {check['expected_at_least']}): every sampler would stop "
            "after a few tokens, so the calls and speedups would be the early stop's, not parallel "
            "decoding's (docs/diffusion.md, session 19). Pass --allow-failed-model to measure it anyway.",
            file=sys.stderr,
        )
        return 2
    gen_lengths = args.gen_lengths or ([64] if args.quick else [64, 256])
    n_prompts = args.prompts or (2 if args.quick else 8)
    model = dm.load(folder)
    cfg = model.config
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    with tempfile.TemporaryDirectory() as tmp, progress.step("denoiser -> ONNX"):
        graph = export(model, Path(tmp))
        denoiser = OrtDenoiser(
            graph, common.ORT_SESSION, mask_id=cfg.mask_token_id, shift=cfg.shift, eos_id=cfg.eos_token_id
        )
    torch_denoiser = TorchDenoiser(model)
    scorer = AutoModelForCausalLM.from_pretrained(assets.smollm2_dir(), local_files_only=True).eval()
    prompts = held_out_prompts(tokenizer, n_prompts, args.prompt_tokens)
    text = unwrap(load_text(TRAIN_TEXTS[0]))
    counts = np.bincount(tokenizer(text)["input_ids"], minlength=cfg.vocab_size).astype(float)
    counts[cfg.mask_token_id] = 0
    unigram = counts / counts.sum()
    rng = np.random.default_rng(0)

    rows = []
    for gen_length in gen_lengths:

        def options(sampler, cache, stop=True, threshold=0.9, factor=1.0, rule="settled"):
            return SamplerOptions(
                sampler=sampler,
                cache=cache,
                gen_length=gen_length,
                block_length=args.block_length,
                stop_at_eos=stop,
                stop_rule=rule,
                threshold=threshold,
                factor=factor,
            )

        def variants(sampler):
            """(threshold, factor, stop rule) of every row a sampler gets: one per value of its own knob
            and per stop rule."""
            knob = [(0.9, 1.0)]
            if sampler == "fast_threshold":
                knob = [(t, 1.0) for t in args.thresholds]
            if sampler == "fast_factor":
                knob = [(0.9, f) for f in args.factors]
            return [(t, f, rule) for t, f in knob for rule in args.stop_rules]

        # (backend, options): LLaDA's baseline first (the reference), the baseline with the early stop,
        # every chosen sampler with every chosen ORT cache; dLLM-Cache and its baseline on torch
        reference = options("baseline", "none", stop=False)
        configs = [("ort", reference)] + [("ort", options("baseline", "none", rule=r)) for r in args.stop_rules]
        configs += [
            ("ort", options(s, c, threshold=t, factor=f, rule=r))
            for s in args.samplers
            for c in args.caches
            for t, f, r in variants(s)
            if c != "dllm_cache" and (s, c) != ("baseline", "none")
        ]
        if "dllm_cache" in args.caches:
            configs += [("torch", reference)] + [
                ("torch", options(s, "dllm_cache", threshold=t, factor=f, rule=r))
                for s in args.samplers
                for t, f, r in variants(s)
            ]
        denoisers = {"ort": denoiser, "torch": torch_denoiser}
        for _, opts in configs:
            opts.check()
        results = {config: [] for config in configs}
        for prompt in progress.bar(prompts, desc=f"gen_length {gen_length}", unit="prompt"):
            for backend, opts in configs:  # interleaved: every configuration on this prompt before the next
                results[backend, opts].append(generate(denoisers[backend], prompt, opts))
        base = results["ort", reference]
        base_quality = [perplexity(scorer, q, r.text_tokens(cfg.eos_token_id)) for q, r in zip(prompts, base)]
        base_spread = spread(base_quality)
        for backend, opts in configs:
            runs = results[backend, opts]
            timed_base = results[backend, reference]
            calls = statistics.mean(r.calls for r in runs)
            per_prompt = [perplexity(scorer, q, r.text_tokens(cfg.eos_token_id)) for q, r in zip(prompts, runs)]
            rows.append(
                {
                    "sampler": opts.sampler,
                    "cache": opts.cache,
                    "stop_at_eos": opts.stop_at_eos,
                    "stop_rule": opts.stop_rule if opts.stop_at_eos else None,
                    "backend": backend,
                    "gen_length": gen_length,
                    "block_length": opts.block_length,
                    "threshold": opts.threshold if opts.sampler == "fast_threshold" else None,
                    "factor": opts.factor if opts.sampler == "fast_factor" else None,
                    "calls": calls,
                    "tokens_per_call": gen_length / calls,
                    "padding_calls": statistics.mean(r.padding_calls for r in runs),
                    "text_tokens": statistics.mean(len(r.text_tokens(cfg.eos_token_id)) for r in runs),
                    "tok_s": sum(len(r.tokens) for r in runs) / sum(r.seconds for r in runs),
                    "calls_reduction": statistics.mean(r.calls for r in base) / calls,
                    "speedup": common.median_ratio([r.seconds for r in timed_base], [r.seconds for r in runs]),
                    "agreement": statistics.mean(agreement(r.tokens, b.tokens) for r, b in zip(runs, base)),
                    "quality": quality(per_prompt),
                    "quality_per_prompt": per_prompt,
                    "baseline_quality": quality(base_quality),
                    "baseline_quality_per_prompt": base_quality,
                    "baseline_spread": base_spread,
                    "same_texts": sum(
                        r.text_tokens(cfg.eos_token_id) == b.text_tokens(cfg.eos_token_id) for r, b in zip(runs, base)
                    ),
                }
            )
        rows += reference_rows(scorer, prompts, gen_length, cfg.eos_token_id, unigram, rng)

    record = common.protocol(
        benchmark="diffusion",
        model=str(folder),
        backend="ort (dllm_cache rows: torch)",
        session=common.ORT_SESSION,
        prompts=f"{n_prompts} windows of {args.prompt_tokens} tokens of austen:persuasion (held out; line wraps joined)",
        block_length=args.block_length,
        model_response_check=check,
        environment=env,
    )
    out, _ = common.write_results(args.json, rows, record)
    plot(rows, out.with_suffix(".png"))
    for row in rows:
        if "calls" in row:
            print(
                f"{row['gen_length']:4d} {row['backend']:5s} {row['sampler']:15s} {row['cache']:10s} "
                f"{row['threshold'] or row['factor'] or '':4} "
                f"{row['stop_rule'] or 'full':7s} calls {row['calls']:6.1f} (padding {row['padding_calls']:5.1f}) "
                f"text {row['text_tokens']:5.1f} tok/call {row['tokens_per_call']:5.2f} tok/s {row['tok_s']:7.1f} x{row['speedup']:5.2f} "
                f"calls/{row['calls_reduction']:5.2f} agree {row['agreement']:.3f} same {row['same_texts']}/{len(prompts)} "
                f"ppl {row['quality']} (baseline {row['baseline_quality']}, spread {row['baseline_spread']})"
            )
        else:
            print(f"{row['gen_length']:4d} {row['sampler']:15s} ppl {row['quality']}")
    return 0


def plot(rows, path: Path) -> None:
    plt = common.pyplot()
    lengths = sorted({r["gen_length"] for r in rows if "calls" in r})
    fig, axes = plt.subplots(1, len(lengths), figsize=(7 * len(lengths), 4), squeeze=False)
    for ax, length in zip(axes[0], lengths):
        mine = [r for r in rows if r["gen_length"] == length and "calls" in r]
        labels = [
            f"{r['sampler']} {r['threshold'] or r['factor'] or ''} {r['stop_rule'] or 'full'}\n"
            f"{r['cache']} ({r['backend']})"
            for r in mine
        ]
        x = range(len(mine))
        ax.bar([i - 0.2 for i in x], [r["calls_reduction"] for r in mine], 0.4, label="calls reduction")
        ax.bar([i + 0.2 for i in x], [r["speedup"] for r in mine], 0.4, label="speedup (tok/s)")
        ax.set_xticks(list(x), labels, rotation=90, fontsize=7)
        ax.set_title(f"gen_length {length}, block {mine[0]['block_length']}: x vs the baseline")
        ax.legend()
    common.save_figure(fig, path)


if __name__ == "__main__":
    raise SystemExit(main())
