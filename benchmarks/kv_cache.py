"""In-place vs copied KV cache on ONNX Runtime, by prompt length, side by side in one run.

    python -m benchmarks.kv_cache [--artifact DIR] [--prompt-tokens 48 512 1024] [--set KEY.PATH=VALUE ...]
                                  --json OUT.json

The fused graph lets the runtime keep its KV cache in one arena bound as both past and present
(runtime/ort_backend.py); `kv_cache: copy` is the classic loop, where every step copies the
whole cache into a fresh present tensor. Both run the same graph of the speculative artifact
(recipes/bench/speculative.yaml, compiled when missing), on "Persuasion" prompts of each
length, interleaved prompt by prompt: greedy autoregressive decoding and speculative decoding
with the artifact's draft and gamma. Reported: decode tokens/s (prefill excluded, it is the same
computation), prefill seconds, and the in-place / copy ratio; every in-place output must equal
the copying one.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from benchmarks import common


def main(argv: list[str] | None = None) -> int:
    p = common.parser(__doc__)
    p.add_argument("--artifact", help="a compiled speculative artifact (default: compile one)")
    p.add_argument("--prompt-tokens", type=int, nargs="+", default=[48, 512, 1024])
    p.add_argument("--prompts", type=int, default=3)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY.PATH=VALUE", help="override a value of the compiled recipe"
    )
    args = p.parse_args(argv)
    environment = common.quiet_threads(args.threads)

    from accelc import progress
    from accelc.loops.plan import run_plan
    from accelc.runtime.artifact import Artifact
    from accelc.runtime.ort_backend import OrtStepModel

    artifact = Path(args.artifact) if args.artifact else Path(tempfile.mkdtemp(prefix="accelc-kv-")) / "artifact"
    if not (artifact / "manifest.json").exists():
        common.compile_bench_recipe("speculative", artifact, args.set)
    art = Artifact(artifact)
    runtime = art.backends()["ort"]["runtime"]
    graph = {role: art.dir / art.manifest["graphs"][name] for role, name in runtime["graphs"].items()}
    gamma = art.plan.gamma
    models = {
        mode: {role: OrtStepModel(path, {**runtime["session"], "kv_cache": mode}) for role, path in graph.items()}
        for mode in ("copy", "auto")
    }
    if not models["auto"]["target"].in_place:
        raise SystemExit("this artifact's graphs do not declare an in-place KV cache (re-export with graph: fused)")
    # autoregressive decoding and the artifact's own plan, each run as `accelc run` runs it
    plans = {"ar": art.plan.model_copy(update={"strategy": "greedy"}), art.plan.strategy: art.plan}
    loops = {
        name: lambda m, prompt, plan=plan: run_plan(plan, m["target"], m.get("draft"), prompt, args.new_tokens)
        for name, plan in plans.items()
    }
    rows = []
    for length in args.prompt_tokens:
        prompts = common.persuasion_prompts(art.tokenizer, args.prompts, length)
        for loop, run in loops.items():
            rates, prefill, same = {"copy": [], "auto": []}, {"copy": [], "auto": []}, []
            with progress.step(f"kv cache: {args.prompts} prompts of {length} tokens, {loop}"):
                for prompt in prompts:
                    out = {}
                    for mode in ("copy", "auto"):
                        out[mode] = run(models[mode], prompt)
                        rates[mode].append(out[mode].decode_tokens_per_second)
                        prefill[mode].append(out[mode].prefill_seconds)
                    same.append(out["copy"].tokens == out["auto"].tokens)
            row = {
                "prompt_tokens": length,
                "loop": loop,
                "copy_tok_s": common.median(rates["copy"]),
                "in_place_tok_s": common.median(rates["auto"]),
                "copy_prefill_s": common.median(prefill["copy"]),
                "in_place_prefill_s": common.median(prefill["auto"]),
                "identical": all(same),
            }
            row["ratio"] = row["in_place_tok_s"] / row["copy_tok_s"]  # of the medians, as docs/notes.md reports it
            row["paired_ratio"] = common.median_ratio(rates["auto"], rates["copy"])  # prompt by prompt
            rows.append(row)
            print(
                f"{length:5d} prompt tokens  {loop:12s} copy {row['copy_tok_s']:6.1f} tok/s  in place "
                f"{row['in_place_tok_s']:6.1f} tok/s  x{row['ratio']:.2f}  prefill {row['copy_prefill_s']:.2f} / "
                f"{row['in_place_prefill_s']:.2f} s  identical {row['identical']}",
                flush=True,
            )
    record = common.protocol(
        model=art.manifest["model"]["description"] + " fp32 (fused ONNX graph)",
        artifact=str(artifact),
        recipe="recipes/bench/speculative.yaml",
        overrides=args.set,
        passes=art.manifest["passes"],  # the draft and gamma limit the artifact was compiled with
        gamma=gamma,
        prompts=args.prompts,
        new_tokens=args.new_tokens,
        prompt_text="austen:persuasion",
        session=runtime["session"],
        environment=environment,
    )
    common.write_results(args.json, rows, record)
    return 0 if all(r["identical"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(common.run(main))
