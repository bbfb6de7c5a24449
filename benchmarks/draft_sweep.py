"""Which drafts derived from SmolLM2-135M-Instruct could pay for speculative decoding here?

    python -m benchmarks.draft_sweep [--artifact DIR] [--goal 1.5] [--set KEY.PATH=VALUE ...] --json OUT.json

Speculative decoding's speedup is set by two numbers (loops/replay.py): the acceptance
rate alpha of the draft's tokens and the cost c of a draft step in target steps. This sweep
builds the self-derived drafts that keep the target's width (the ones worth considering after
session 2: pruned subnets and deep layer skips are accepted too rarely, docs/notes.md) as fused
ONNX graphs with a head over the calibration text's 8,192 most frequent tokens, and measures for
each, against the target graph of a compiled speculative artifact on ONNX Runtime:

  - alpha (greedy, 4 held-out "Persuasion" prompts, along the target's own continuations; the
    full-width drafts start from the target's prompt cache, as their plans run),
  - c and the target's verify cost v(k) (medians of one-token steps),
  - the gamma and speedup the cost model predicts, and the c this alpha would need to reach
    `--goal` (the most expensive draft that still could).

Variants: 8-bit and 4-bit weights (ORT MatMulNBits, several block layouts), and the default
8-bit draft with its least harmful layer (or two) left out, chosen by how often the target's
argmax survives the removal on calibration text. Thread spinning stays off, as in every
benchmark here.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from benchmarks import common

# (name, bits, block, symmetric, layers left out); bits 32 = fp32 weights
VARIANTS = [
    ("fp32", 32, 0, False, 0),
    ("int8 b32", 8, 32, False, 0),
    ("int8 b64 sym", 8, 64, True, 0),
    ("int4 b32", 4, 32, False, 0),
    ("int4 b128 sym", 4, 128, True, 0),
    ("int8 b32, 1 layer out", 8, 32, False, 1),
    ("int8 b32, 2 layers out", 8, 32, False, 2),
]


def layers_kept(model, drop: list[int]) -> list[int]:
    from accelc.passes.speculative import _decoder_layers

    return [i for i in range(len(_decoder_layers(model))) if i not in drop]


def least_harmful_layers(model, ids, n: int) -> list[int]:
    """The n layers whose single removal keeps the target's argmax most often on `ids`
    (teacher-forced, one forward per layer; each removal is the speculative pass's layer skip)."""
    import torch

    from accelc.passes.speculative import layer_skip_model

    with torch.no_grad():
        reference = model(ids, use_cache=False).logits.argmax(-1)
        agreement = {}
        for i in range(len(layers_kept(model, []))):
            skipped = layer_skip_model(model, layers_kept(model, [i]))
            agreement[i] = (skipped(ids, use_cache=False).logits.argmax(-1) == reference).float().mean().item()
            del skipped
    return sorted(agreement, key=agreement.get, reverse=True)[:n]


def c_needed(alpha: float, verify, goal: float, gamma_max: int) -> float | None:
    """The largest c for which some gamma predicts `goal`: S = E(alpha, gamma) / (gamma c + v)."""
    from accelc.loops.replay import expected_accepted_length

    best = max((expected_accepted_length(alpha, g) / goal - verify(g)) / g for g in range(1, gamma_max + 1))
    return best if best > 0 else None


def main(argv: list[str] | None = None) -> int:
    p = common.parser(__doc__)
    p.add_argument(
        "--artifact", help="a compiled speculative artifact (default: compile recipes/bench/speculative.yaml)"
    )
    p.add_argument("--goal", type=float, default=1.5, help="the speedup whose required c is reported")
    p.add_argument("--gamma-max", type=int, default=8)
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY.PATH=VALUE", help="override a value of the compiled recipe"
    )
    args = p.parse_args(argv)
    environment = common.quiet_threads(args.threads)

    import torch
    from transformers import AutoModelForCausalLM

    from accelc import progress
    from accelc.compiler import fused_decoder
    from accelc.data import describe, mixture_text
    from accelc.loops import pricing, registry
    from accelc.loops.calibration import estimate_alpha
    from accelc.loops.timing import measure_loop_costs
    from accelc.passes.quantize import quantize_matmul_nbits
    from accelc.passes.speculative import frequent_tokens, layer_skip_model
    from accelc.runtime.artifact import Artifact
    from accelc.runtime.ort_backend import OrtStepModel

    work = Path(tempfile.mkdtemp(prefix="accelc-draft-sweep-"))
    artifact = Path(args.artifact) if args.artifact else work / "artifact"
    overrides = [common.override("passes.1.gamma_max", args.gamma_max), *args.set]
    recipe = common.load_bench_recipe("speculative", overrides)
    draft_vocab = next(step for step in recipe.passes if step.type == "speculative").draft.vocab
    if not (artifact / "manifest.json").exists():
        common.compile_bench_recipe("speculative", artifact, overrides)
    art = Artifact(artifact)
    target = art.step_model("ort")
    checkpoint = art.dir / "model" / "hf"
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    calibration = mixture_text(recipe.data.calibration)
    subset = frequent_tokens(art.tokenizer, calibration, draft_vocab)
    calib_ids = torch.tensor(art.tokenizer.encode(calibration, add_special_tokens=False)[10_000:10_512]).view(2, 256)
    # a draft keeps at least one layer: a model shallower than a variant asks skips that variant
    variants = [v for v in VARIANTS if v[4] < len(layers_kept(model, []))]
    for name, *_ in (v for v in VARIANTS if v not in variants):
        progress.status(f"draft sweep: {name} skipped, the model has too few layers")
    with progress.step("draft sweep: ranking layers by how little their removal changes the argmax"):
        drop_order = least_harmful_layers(model, calib_ids, max(v[4] for v in variants))
    prompts = common.persuasion_prompts(art.tokenizer, 4)

    rows = []
    for name, bits, block, symmetric, n_drop in variants:
        with progress.step(f"draft sweep: {name}"):
            folder = work / name.replace(" ", "_").replace(",", "")
            source = layer_skip_model(model, layers_kept(model, drop_order[:n_drop])) if n_drop else model
            graph = fused_decoder.build(source, folder, vocab_subset=subset)
            if bits < 32:
                graph = quantize_matmul_nbits(
                    graph, graph.with_name(f"model.q{bits}.onnx"), bits=bits, block_size=block, symmetric=symmetric
                )
            draft = OrtStepModel(graph, art.backends()["ort"]["runtime"]["session"])
            # full-width drafts start from the target's prompt cache, as their plans run
            est = estimate_alpha(target, draft, prompts, prompt_kv_from_target=not n_drop)
            cost = measure_loop_costs(target, draft, prompts[0], gamma_max=args.gamma_max, copying=False)
            # the gamma the speculative pass would plan for this draft, by the same replay
            loop = registry.get("speculative")
            measured = pricing.measured_for(loop.pricing, est, cost)
            choice = pricing.decide(loop.pricing, measured, args.gamma_max).choice
            alpha = est.alpha
        row = {
            "draft": name,
            "weights": "fp32" if bits == 32 else f"int{bits}",
            "block": block or None,
            "symmetric": symmetric,
            "layers_left_out": drop_order[:n_drop],
            "vocab": draft_vocab,
            "prompt_kv_from_target": not n_drop,
            "alpha": alpha,
            "cost_ratio": cost.cost_ratio,
            "draft_step_ms": cost.draft_step_seconds * 1e3,
            "target_step_ms": cost.target_step_seconds * 1e3,
            "gamma": choice.gamma,
            "predicted_speedup": choice.predicted_speedup,
            "c_needed_for_goal": c_needed(alpha, cost.verify, args.goal, args.gamma_max),
        }
        rows.append(row)
        need = row["c_needed_for_goal"]
        print(
            f"{name:24s} alpha {alpha:.3f}  c {cost.cost_ratio:.3f} ({row['draft_step_ms']:.1f} ms)  "
            f"gamma {choice.gamma}  predicted {choice.predicted_speedup:.2f}x  "
            f"c for {args.goal}x: {'unreachable' if need is None else f'{need:.3f}'}",
            flush=True,
        )
    record = common.protocol(
        model=art.manifest["model"]["description"] + " fp32 (fused ONNX graph)",
        backend="onnxruntime CPU",
        artifact=str(artifact),
        recipe="recipes/bench/speculative.yaml",
        overrides=overrides,
        session=art.backends()["ort"]["runtime"]["session"],
        prompts=len(prompts),
        prompt_text="austen:persuasion",
        vocab_text=describe(recipe.data.calibration),
        goal=args.goal,
        layer_ranking_text=f"{describe(recipe.data.calibration)}, 2 x 256 tokens",
        environment=environment,
    )
    common.write_results(args.json, rows, record)
    return 0


if __name__ == "__main__":
    sys.exit(common.run(main))
