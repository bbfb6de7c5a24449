"""`accelc run` on a causal-LM artifact: a prompt in, the continuation and its decode statistics out."""

from __future__ import annotations

import json
from pathlib import Path

from accelc import progress
from accelc.errors import UsageError


def run(art, args) -> int:
    from accelc.families.causal_lm import encode_prompt
    from accelc.loops.plan import run_plan
    from accelc.runtime import limits
    from accelc.runtime.torch_free import keep_torch_out

    if args.prompt is None:
        raise UsageError("accelc run: a causal-LM artifact needs --prompt")
    limits.at_least("--max-new-tokens", args.max_new_tokens)
    limits.temperature(args.temperature)
    backend = args.backend or ("ort" if "ort" in art.backends() else "torch")
    keep_torch_out(backend)  # before the tokenizer imports transformers
    plan = art.plan_for(backend)
    if plan.planned_strategy is not None:
        progress.status(plan.reason)
    tok = art.tokenizer
    ids = encode_prompt(tok, args.prompt, plan.chat_template and not args.raw)
    n = plan.max_new_tokens if args.max_new_tokens is None else args.max_new_tokens
    limits.check_generation(art.context_length, len(ids), n, "--max-new-tokens")  # before any session opens
    target, draft = art.decode_pair(backend)
    eos = art.eos_ids
    result = run_plan(plan, target, draft, ids, n, eos_ids=eos, sampler=plan.sampler(args.temperature))
    print(tok.decode([t for t in result.tokens if t not in eos], skip_special_tokens=True))
    stats = result.stats
    extra = ""
    if "acceptance_rate" in stats:
        extra = (
            f", acceptance {stats['acceptance_rate']:.2f}, mean accepted length "
            f"{stats['mean_accepted_length']:.2f}, target calls {stats['target_calls']}, "
            f"draft calls {stats['draft_calls']}"
        )
        if stats.get("lookup"):
            extra += f", rounds copied from the context {stats['lookup_rounds']} of {stats['rounds']}"
    elif "tokens_per_call" in stats:  # a window a call (jacobi, lookahead)
        extra = f", target calls {stats['target_calls']}, {stats['tokens_per_call']:.2f} tokens a call"
    progress.status(
        f"{backend} [{plan.strategy}]: {len(result.tokens)} tokens, prefill "
        f"{result.prefill_seconds * 1e3:.0f} ms, decode {result.decode_tokens_per_second:.1f} tok/s{extra}"
    )
    if args.show_tokens:
        print(json.dumps(result.tokens))
    if plan.sampler(args.temperature).temperature == 0.0:
        planned, plain = steady_state(plan, target, draft, ids, n, eos)
        versus = "" if plan.strategy == "greedy" else f", plain greedy {plain:.1f} tok/s ({planned / plain:.2f}x)"
        progress.status(
            f"{backend} steady state (warm sessions, median of {STEADY_ROUNDS} alternated runs): "
            f"[{plan.strategy}] {planned:.1f} tok/s{versus}"
        )
    return 0


STEADY_ROUNDS = 3


def steady_state(plan, target, draft, ids, n, eos) -> tuple[float, float]:
    """Decode tok/s of the plan and of plain greedy decoding on warm sessions, in this process.

    The first generation of a process pays for session set-up and first-touch allocations (the
    fp32 quick start reports ~29 tok/s cold, ~47 warm), so it is no rate to deploy by; rounds
    alternate the two so that a busy machine slows both alike."""
    import statistics

    from accelc.loops.autoregressive import generate
    from accelc.loops.plan import run_plan

    planned, plain = [], []
    for _ in range(STEADY_ROUNDS):
        planned.append(run_plan(plan, target, draft, ids, n, eos_ids=eos).decode_tokens_per_second)
        if plan.strategy != "greedy":
            plain.append(generate(target, ids, n, eos_ids=eos).decode_tokens_per_second)
    median = statistics.median(planned)
    return median, statistics.median(plain) if plain else median


def plan_coverage(directory: Path) -> list[str]:
    """Warn about the backends on which a rewritten loop cannot run (no draft there): they decode
    autoregressively (Artifact.plan_for), which a deployment on them should know."""
    from accelc.runtime.artifact import Artifact

    art = Artifact(directory)
    plain = {b: art.plan_for(b) for b in art.backends()}
    plain = {b: p.reason for b, p in plain.items() if p.planned_strategy is not None}
    for reason in plain.values():
        progress.status(reason)
    return list(plain.values())
