"""`accelc bench` on a masked-diffusion LM artifact: its planned sampler beside LLaDA's baseline and
the other samplers, on each backend, on held-out prompts.

The baseline is LLaDA's sampler as published (one token a call, no early stop); every other
configuration stops at the first committed end-of-text, with the plan's cache and block length.
Each configuration decodes the same `repeats` prompts (windows of `prompt_tokens` tokens of
Persuasion), `new_tokens` positions each, interleaved prompt by prompt so that machine load hits
all alike; speedups are medians of per-prompt paired ratios against the baseline on the same backend.
"""

from __future__ import annotations

import statistics
from pathlib import Path

PROMPT_TEXT = "austen:persuasion"  # held out from `accelc train smollm2-dream`
SAMPLERS = ("fast_threshold", "fast_factor", "slowfast")


def prompts(tokenizer, count: int, length: int) -> list[list[int]]:
    """`count` windows of `length` tokens, spread over the text (its line wraps joined, as the
    model's training text is)."""
    import numpy as np

    from accelc.data import load_text, token_windows
    from accelc.families.diffusion_lm_train import unwrap

    ids = np.asarray(tokenizer.encode(unwrap(load_text(PROMPT_TEXT)), add_special_tokens=False))
    windows = token_windows(ids, length, length, count * 5, what="bench prompt text")
    return [w.tolist() for w, _ in windows][::5][:count]


def configurations(plan, gen_length: int) -> list:
    """LLaDA's baseline first (the reference), then the plan, then the other samplers with its cache."""
    base = plan.model_copy(update={"gen_length": gen_length, "temperature": 0.0})
    reference = base.model_copy(update={"sampler": "baseline", "cache": "none", "steps": None, "stop_at_eos": False})
    configs = [reference, base.model_copy(update={"stop_at_eos": True})]
    configs += [base.model_copy(update={"sampler": s, "stop_at_eos": True}) for s in SAMPLERS]
    unique = []
    for opts in configs:
        if opts not in unique:
            unique.append(opts)
    for opts in unique:
        opts.check()  # a length the blocks do not tile is exit 2 before any session opens
    return unique


def bench(art, spec) -> dict:
    from accelc import progress
    from accelc.families.diffusion_lm import open_denoiser, plan_of
    from accelc.loops.diffusion import generate
    from accelc.passes.diffusion_sampling import agreement

    plan = plan_of(art.dir)
    configs = configurations(plan, spec.new_tokens)
    backends = [b for b in spec.backends if b in art.backends()]
    texts = prompts(art.tokenizer, spec.repeats, spec.prompt_tokens)
    rows = []
    for backend in backends:
        denoiser = open_denoiser(art, backend)
        runs = {i: [] for i in range(len(configs))}
        for prompt in progress.bar(texts, desc=f"bench {backend}", unit="prompt"):
            for i, opts in enumerate(configs):
                runs[i].append(generate(denoiser, prompt, opts))
        base = runs[0]
        for i, opts in enumerate(configs):
            mine = runs[i]
            calls = statistics.mean(r.calls for r in mine)
            rows.append(
                {
                    "backend": backend,
                    "sampler": opts.sampler,
                    "cache": opts.cache,
                    "stop_at_eos": opts.stop_at_eos,
                    "planned": opts == configs[1],
                    "calls": calls,
                    "padding_calls": statistics.mean(r.padding_calls for r in mine),
                    "tokens_per_call": opts.gen_length / calls,
                    "tok_s": sum(len(r.tokens) for r in mine) / sum(r.seconds for r in mine),
                    "calls_reduction": statistics.mean(r.calls for r in base) / calls,
                    "speedup": statistics.median(b.seconds / r.seconds for b, r in zip(base, mine)),
                    "agreement": statistics.mean(agreement(r.tokens, b.tokens) for r, b in zip(mine, base)),
                }
            )
    protocol = {
        "prompt_tokens": spec.prompt_tokens,
        "gen_length": spec.new_tokens,
        "block_length": plan.block_length,
        "prompts": f"{len(texts)} windows of {PROMPT_TEXT}",
        "reference": "LLaDA baseline: one token a call, no early stop",
    }
    return {"protocol": protocol, "rows": rows}


def report(result: dict, figure: Path) -> None:
    """The sampler table on stdout and its plot at `figure`."""
    p = result["protocol"]
    print(f"gen_length {p['gen_length']}, block {p['block_length']}, {p['prompts']} ({p['reference']}):")
    print(
        f"{'backend':<8} {'sampler':<15} {'cache':<10} {'stop':>5} {'calls':>7} {'padding':>8} {'tok/call':>9} "
        f"{'tok/s':>8} {'x calls':>8} {'x tok/s':>8} {'agree':>6}"
    )
    for r in result["rows"]:
        name = r["sampler"] + (" *" if r["planned"] else "")
        print(
            f"{r['backend']:<8} {name:<15} {r['cache']:<10} {'yes' if r['stop_at_eos'] else 'no':>5} "
            f"{r['calls']:>7.1f} {r['padding_calls']:>8.1f} {r['tokens_per_call']:>9.2f} {r['tok_s']:>8.1f} "
            f"{r['calls_reduction']:>8.2f} {r['speedup']:>8.2f} {r['agreement']:>6.3f}"
        )
    print("* the artifact's plan")
    plot(result, figure)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    fig, ax = plt.subplots(figsize=(max(6, len(rows)), 4))
    x = range(len(rows))
    ax.bar([i - 0.2 for i in x], [r["calls_reduction"] for r in rows], 0.4, label="fewer calls (x)")
    ax.bar([i + 0.2 for i in x], [r["speedup"] for r in rows], 0.4, label="tokens/s (x)")
    labels = [f"{r['sampler']}{'' if r['stop_at_eos'] else ' full'}\n{r['cache']} ({r['backend']})" for r in rows]
    ax.set_xticks(list(x), labels, rotation=90, fontsize=7)
    p = result["protocol"]
    ax.set_title(f"accelc bench: vs LLaDA's baseline, gen_length {p['gen_length']}, block {p['block_length']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
