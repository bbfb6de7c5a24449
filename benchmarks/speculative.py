"""Speculative family vs autoregressive decoding on SmolLM2-135M-Instruct (ONNX Runtime), side by side.

    python -m benchmarks.speculative [--quick] [--draft-ratio 0.6 | --draft-layers 0 1 2 27 28 29]
                                     [--draft-weights int8] [--draft-block 128] [--draft-symmetric]
                                     [--draft-vocab 8192] [--lookup 8 | 0] [--set KEY.PATH=VALUE ...]
                                     --json OUT.json

Compiles recipes/bench/speculative.yaml: the embedded model with the `speculative` pass (a draft derived from the target: by
default the target's own weights, a subnet from architecture search + reformation with
--draft-ratio, or a layer skip with --draft-layers; its ONNX graph with 8-bit weights in blocks
of 128 without zero points and a head over the 8,192 most frequent calibration tokens unless
--draft-weights fp32 / --draft-block / --no-draft-symmetric / --draft-vocab 0 say otherwise;
fallback off so the rewritten loops are measured even when they do not pay), then, on
continuations of real prompts (Austen, "Persuasion"), measures tokens/s of autoregressive,
speculative, batch speculative, PEARL and stairs decoding at each temperature, in one run,
interleaved prompt by prompt. Each row: measured speedup vs autoregressive (the median of the
per-prompt ratios), the cost model's predicted speedup (alpha and c measured on this backend at
that temperature, the acceptance replayed over the prompts' trajectories through each loop),
the acceptance rate, and for greedy rows whether the tokens equal the autoregressive ones.
The draft also copies up to 8 tokens (--lookup N; 0: never) from the context where its last
tokens recurred (draft.lookup, as README's recipe). Every loop of the loop table that the
speculative pass can price is measured (stairs, greedy only, at temperature 0), each with the
gamma and the copying that a compile with that strategy would choose from the costs measured at
the start of the run (loops/pricing.py `decide`, the pass's own decision), and run through its
table entry as `accelc run` runs it. PEARL's workers get one ORT thread each (two cores here) and
are priced with those workers' costs, timed while both run; its prefill and its rounds of copied
drafts run alone on the target's all-core session, as the pass plans (alone_session). The other
methods use the artifact's session (all cores). Batch speculative uses the plan's number of
candidates.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from benchmarks import common

if TYPE_CHECKING:
    from accelc.loops.calibration import AlphaEstimate
    from accelc.loops.timing import CostMeasurement

DRAFT_SOURCES = ("path", "keep_layers", "subnet_ratio", "from_target")


def draft_spec(args) -> dict:
    """The speculative pass's draft: recipes/bench/speculative.yaml's, with the command line's choices over it."""
    recipe = common.load_bench_recipe("speculative")
    step = next(step for step in recipe.passes if step.type == "speculative")
    draft = step.draft.model_dump(exclude_unset=True)
    if args.draft_ratio is not None or args.draft_layers is not None:
        for key in DRAFT_SOURCES:
            draft.pop(key, None)
        if args.draft_ratio is not None:
            draft["subnet_ratio"] = args.draft_ratio
        else:
            draft["keep_layers"] = args.draft_layers
    for key, value in (
        ("weights", args.draft_weights),
        ("block_size", args.draft_block),
        ("symmetric", args.draft_symmetric),
        ("vocab", args.draft_vocab),
    ):
        if value is not None:
            draft[key] = value
    if draft.get("weights", "fp32") == "fp32":  # the block layout describes 8- or 4-bit weights only
        draft.pop("block_size", None)
        draft.pop("symmetric", None)
    if not draft.get("vocab"):
        draft.pop("vocab", None)
    if args.lookup:
        draft["lookup"] = args.lookup
    return draft


def compile_overrides(draft: dict, gamma_max: int, extra: list[str] = ()) -> list[str]:
    """`--set` overrides of recipes/bench/speculative.yaml for this draft and gamma limit."""
    return [common.override("passes.1.draft", draft), common.override("passes.1.gamma_max", gamma_max), *extra]


@dataclass(frozen=True)
class Models:
    """The artifact's ORT sessions: the target and draft on the artifact's threads, and PEARL's
    workers, one thread each (two cores here), the target's with the artifact's session beside
    it for the calls made alone."""

    target: object
    draft: object
    pearl_target: object
    pearl_draft: object
    opened_mib: dict  # the process's resident memory growth as each one opened (PEARL's target: two sessions)

    @classmethod
    def open(cls, art) -> Models:
        from accelc.compiler.benchmark import rss_mb

        opened, models = {}, {}
        for name, args in (
            ("target", {}),
            ("draft", {"role": "draft"}),
            ("pearl_target", {"threads": 1, "alone_session": True}),
            ("pearl_draft", {"role": "draft", "threads": 1}),
        ):
            before = rss_mb()
            models[name] = art.step_model("ort", **args)
            opened[name] = rss_mb() - before
        return cls(**models, opened_mib=opened)


@dataclass(frozen=True)
class Costs:
    """What a prediction is priced with, measured together: the sequential pair's costs, PEARL's
    workers' (timed while both run; baseline_ratio: their target step over the all-core step
    autoregressive decoding takes), and the prompt's prefill (seconds, all cores: every loop's)."""

    sequential: CostMeasurement
    workers: CostMeasurement
    prefill: float

    @classmethod
    def measure(cls, models: Models, prompt: list[int], gamma_max: int, copying: bool) -> Costs:
        from accelc.loops.timing import measure_loop_costs

        timing = {"gamma_max": gamma_max, "copying": copying}
        return cls(
            measure_loop_costs(models.target, models.draft, prompt, **timing),
            measure_loop_costs(
                models.pearl_target, models.pearl_draft, prompt, concurrent=True, baseline=models.target, **timing
            ),
            _prefill_seconds(models.target, prompt),
        )

    @classmethod
    def median(cls, measured: list[Costs]) -> Costs:
        """The medians of costs measured through a run: its typical state, where one measurement
        catches whichever state the machine is in."""
        from accelc.loops.timing import CostMeasurement

        return cls(
            CostMeasurement.median([m.sequential for m in measured]),
            CostMeasurement.median([m.workers for m in measured]),
            statistics.median(m.prefill for m in measured),
        )

    def to_dict(self) -> dict:
        return {
            "sequential": self.sequential.to_dict(),
            "pearl_workers": self.workers.to_dict(),
            "prefill_seconds": self.prefill,
        }


def _prefill_seconds(model, prompt: list[int], repeats: int = 3) -> float:
    import numpy as np

    ids, times = np.asarray(prompt, dtype=np.int64), []
    for _ in range(repeats):
        t = time.perf_counter()
        model.prefill(ids)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


@dataclass(frozen=True)
class Predictor:
    """Each loop's speedup as the speculative pass prices it (loops/pricing.py): its own replay of
    the prompts' measured acceptance (`est`) at given costs."""

    est: AlphaEstimate
    candidates: int
    new_tokens: int

    def measured(self, loop, costs: Costs):
        from accelc.loops.pricing import measured_for

        return measured_for(loop.pricing, self.est, costs.sequential, costs.workers, candidates=self.candidates)

    def decode(self, name: str, costs: Costs, copying: bool, g: int | None) -> float:
        """The decode phase's speedup at draft length `g` (what the pass's plan predicts)."""
        from accelc.loops import registry

        loop = registry.get(name)
        if loop is None or loop.pricing is None:  # autoregressive decoding, the baseline
            return 1.0
        lookups = self.est.lookups if copying else ()
        return loop.pricing.choose(self.measured(loop, costs), g, lookups).curve[g]

    def tokens_per_second(self, name: str, costs: Costs, copying: bool, g: int | None) -> float:
        """The speedup in tokens/s as the benchmark measures it, prefill included: every loop
        prefills the prompt on the all-core target, as autoregressive decoding does."""
        decode = (self.new_tokens - 1) * costs.sequential.target_step_seconds  # autoregressive, after prefill
        return (costs.prefill + decode) / (costs.prefill + decode / self.decode(name, costs, copying, g))


def decide(predictor: Predictor, costs: Costs, loops: list, lookup, gamma_max: int) -> dict:
    """Per loop, its Decision (gamma, and copies from the context where its replay predicts they
    pay) as a compile with that strategy makes it (pricing.decide), from costs measured before the run."""
    from accelc.loops.pricing import decide as choose

    return {
        loop.name: choose(
            loop.pricing,
            predictor.measured(loop, costs),
            gamma_max,
            lookup if loop.copies_from_context else None,
        )
        for loop in loops
    }


def run_interleaved(methods: dict, prompts: list[list[int]], greedy: bool, measure) -> tuple[dict, list]:
    """Every method on a prompt before the next prompt, so a machine that speeds up or slows down
    during the run moves every column alike; `measure()` (the costs) runs before every prompt.
    Returns per method its per-prompt results (tok/s with prefill, decode tok/s, acceptance,
    whether greedy tokens equal autoregressive decoding's), and the costs measured."""
    results = {name: {"rate": [], "decode_rate": [], "acceptance": [], "identical": []} for name in methods}
    measured = []
    for i, prompt in enumerate(prompts):
        measured.append(measure())
        ar_tokens = None
        for name, run in methods.items():
            t = time.perf_counter()
            result = run(prompt, i)
            out = results[name]
            out["rate"].append(len(result.tokens) / (time.perf_counter() - t))  # prefill included
            out["decode_rate"].append(result.decode_tokens_per_second)
            out["acceptance"].append(result.stats.get("acceptance_rate", float("nan")))
            if name == "ar":
                ar_tokens = result.tokens
            elif greedy:
                out["identical"].append(result.tokens == ar_tokens)
    return results, measured


def main(argv: list[str] | None = None) -> int:
    p = common.parser(__doc__)
    p.add_argument("--quick", action="store_true", help="2 prompts, 32 tokens")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--temperatures", type=float, nargs="+", default=[0.0, 0.8])
    draft = p.add_mutually_exclusive_group()
    draft.add_argument("--draft-layers", type=int, nargs="+", help="layer-skip draft keeping these layers")
    draft.add_argument(
        "--draft-ratio",
        type=float,
        help="subnet draft: remove this fraction of the target's attention + MLP weights (search + reformation)",
    )
    p.add_argument(
        "--draft-weights",
        choices=["fp32", "int8", "int4"],
        help="weight precision of the draft's ONNX graph (default: the recipe's, int8)",
    )
    p.add_argument("--draft-block", type=int, help="quantisation block of the draft's weights (default: the recipe's)")
    p.add_argument(
        "--draft-symmetric",
        action=argparse.BooleanOptionalAction,
        help="draft weights without zero points (default: the recipe's)",
    )
    p.add_argument(
        "--draft-vocab",
        type=int,
        help="the draft's head scores this many most frequent calibration tokens (0: the whole vocabulary; "
        "default: the recipe's)",
    )
    p.add_argument(
        "--lookup",
        type=int,
        default=8,
        help="speculative, PEARL and stairs rounds first copy up to N "
        "drafts from the context (draft.lookup, as README's recipe; batch speculative cannot); 0: the "
        "draft model alone",
    )
    p.add_argument("--gamma-max", type=int, default=8)
    p.add_argument("--artifact", help="reuse a compiled artifact")
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY.PATH=VALUE", help="override a value of the compiled recipe"
    )
    args = p.parse_args(argv)
    if args.quick:
        args.prompts, args.new_tokens = 2, 32
    environment = common.quiet_threads(args.threads)

    from accelc.loops import registry
    from accelc.loops.autoregressive import Sampler
    from accelc.loops.calibration import estimate_alpha
    from accelc.loops.lookup import Lookup
    from accelc.loops.plan import CopySpec
    from accelc.runtime.artifact import Artifact

    artifact = Path(args.artifact) if args.artifact else Path(tempfile.mkdtemp(prefix="accelc-spec-")) / "artifact"
    draft_section = draft_spec(args)
    if not (artifact / "manifest.json").exists():
        common.compile_bench_recipe("speculative", artifact, compile_overrides(draft_section, args.gamma_max, args.set))
    art = Artifact(artifact)
    plan = art.plan
    models = Models.open(art)
    target, draft = models.target, models.draft
    prompts = common.persuasion_prompts(art.tokenizer, args.prompts)
    gamma, candidates = plan.gamma, plan.num_candidates
    # the copies --lookup asks for (an artifact compiled with other ones is measured with these)
    lookup = Lookup(tokens=args.lookup) if args.lookup else None

    def measure() -> Costs:
        return Costs.measure(models, prompts[0], args.gamma_max, copying=lookup is not None)

    start_costs = measure()  # what the decisions are made with, as a compile makes them
    costs = {"start": start_costs.to_dict()}
    rows = []
    for temp in args.temperatures:
        sampler = Sampler(temp) if temp > 0 else Sampler()
        # the same prompts, continued as far as the runs go: how much text repeats itself, and so
        # what copied drafts keep, differs from prompt to prompt and grows with length
        est = estimate_alpha(
            target,
            draft,
            prompts,
            sampler=sampler,
            lookup=lookup,
            new_tokens=args.new_tokens,
            candidates=candidates,
            prompt_kv_from_target=plan.prompt_kv_from_target,
        )
        predictor = Predictor(est, candidates, args.new_tokens)
        # every loop the table can price that runs at this temperature, as the pass would plan it
        loops = [
            loop
            for loop in registry.loops()
            if loop.needs_draft and loop.pricing is not None and not (loop.greedy_only and temp > 0)
        ]
        decisions = decide(predictor, start_costs, loops, lookup, args.gamma_max)
        baseline = registry.get("sample" if temp > 0 else "greedy")

        def run(loop, decision=None):
            """The loop as run_plan runs it, from the artifact's plan with this row's decision."""
            target_model, draft_model = (
                (models.pearl_target, models.pearl_draft)
                if loop.pricing and loop.pricing.parallel_workers
                else (target, draft)
            )
            update = {"strategy": loop.name}
            if decision is not None:
                copies = decision.lookup and CopySpec(**decision.lookup.to_dict())
                update |= {"gamma": decision.choice.gamma, "lookup": copies}
            return lambda prompt, seed: loop.run(
                plan.model_copy(update={**update, "seed": seed}),
                target_model,
                draft_model,
                prompt,
                args.new_tokens,
                sampler=sampler,
                eos_ids=(),
            )

        methods = {"ar": run(baseline), **{loop.name: run(loop, decisions[loop.name]) for loop in loops}}
        copies = {name: d.lookup for name, d in decisions.items()}
        gammas = {"ar": None, **{name: d.choice.gamma for name, d in decisions.items()}}
        results, measured = run_interleaved(methods, prompts, temp == 0, measure)
        # predictions replay each loop with the run's median costs; speedups are medians of the
        # per-prompt ratios to autoregressive decoding on that same prompt
        run_costs = Costs.median(measured)
        costs[f"during T={temp} (medians)"] = run_costs.to_dict()
        ar = results["ar"]
        for name, out in results.items():
            copying, g = copies.get(name) is not None, gammas[name]
            ratios = common.paired_ratios(out["rate"], ar["rate"])
            predicted = predictor.tokens_per_second(name, run_costs, copying, g)
            row = {
                "method": name,
                "temperature": temp,
                "tok_s": common.median(out["rate"]),
                "speedup_vs_ar": common.median(ratios),
                "predicted_speedup": predicted,
                "predicted_with_start_costs": predictor.tokens_per_second(name, start_costs, copying, g),
                # the decode phase alone (what the pass's plan predicts): the prompt's prefill left out
                "decode_speedup_vs_ar": common.median_ratio(out["decode_rate"], ar["decode_rate"]),
                "predicted_decode_speedup": predictor.decode(name, run_costs, copying, g),
                "acceptance": None if name == "ar" else common.median(out["acceptance"]),
                "identical_to_ar": all(out["identical"]) if temp == 0 else None,
                "alpha_estimate": est.alpha,
                "cost_ratio": run_costs.sequential.cost_ratio,
                "gamma": g,
                "lookup": copies[name].to_dict() if copying else None,
                "speedup_per_prompt": ratios,
            }
            rows.append(row)
            print(
                f"T={temp:<4} {name:<18} {row['tok_s']:7.2f} tok/s  x{row['speedup_vs_ar']:.2f} (predicted "
                f"{predicted:.2f})  gamma {g}  acceptance "
                f"{row['acceptance'] if row['acceptance'] is None else round(row['acceptance'], 3)}  "
                f"copies {'on' if copying else 'off'}  identical {row['identical_to_ar']}",
                flush=True,
            )
    record = common.protocol(
        model=art.manifest["model"]["description"],
        backend="onnxruntime CPU",
        artifact=str(artifact),
        recipe="recipes/bench/speculative.yaml",
        draft=draft_section,
        overrides=args.set,
        prompts=len(prompts),
        prompt_tokens=48,
        prompt_text="austen:persuasion",
        new_tokens=args.new_tokens,
        gamma=gamma,
        num_candidates=candidates,
        schedule="interleaved: every method on a prompt, then the next prompt; costs measured "
        "before the run (decisions) and before every prompt (predictions: their medians)",
        costs=costs,  # pearl_workers: one ORT thread each, timed while both run
        lookup=lookup.to_dict() if lookup else None,
        opened_mib=models.opened_mib,
        environment=environment,
        plan=plan.to_json_dict(),
    )
    rows_path, _ = common.write_results(args.json, rows, record)
    plot(rows, rows_path.with_suffix(".png"))
    return 0


def plot(rows, path: Path) -> None:
    temps = sorted({r["temperature"] for r in rows})
    fig, axes = common.pyplot().subplots(1, len(temps), figsize=(5 * len(temps), 3.5), squeeze=False)
    for ax, t in zip(axes[0], temps):
        sel = [r for r in rows if r["temperature"] == t]
        ax.bar([r["method"] for r in sel], [r["speedup_vs_ar"] for r in sel], color="#2a7", label="measured")
        ax.scatter(
            [r["method"] for r in sel],
            [r["predicted_speedup"] or float("nan") for r in sel],
            color="k",
            zorder=3,
            label="predicted",
        )
        ax.axhline(1.0, color="#888", lw=0.8)
        ax.set_title(f"temperature {t}: speedup vs autoregressive", fontsize=9)
        ax.tick_params(axis="x", labelsize=7, rotation=20)
        ax.legend(fontsize=7)
    common.save_figure(fig, path)


if __name__ == "__main__":
    sys.exit(common.run(main))
