"""diffusion_sampling: choose a masked-diffusion LM's sampler by measuring it.

On calibration prompts (windows of data.calibration) it runs the LLaDA baseline as published
(one token a call, every response position decoded) and every candidate configuration: the
baseline stopping at the first committed end-of-text, and each sampler of `samplers` with each
cache of `caches`, block length of `block_lengths`, and threshold of `thresholds` (fast_threshold) or
factor of `factors` (fast_factor), each with each early-stop rule of `stop_rules` (`settled`, the
default, keeps the text the sampler writes without the stop; `eos` stops a few calls sooner).
It records each one's model calls and its agreement with the baseline's output (the fraction
of response positions holding the baseline's token), and plans the configuration with the
fewest calls, then the fewest tokens fed, among those whose agreement reaches `min_agreement`.
Where none does, the plan is the baseline, with the reason. The measurements go to
reports/diffusion_sampling.json.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Annotated, Literal

from pydantic import Field, model_validator

from accelc import progress
from accelc.compiler import registry


@dataclass(frozen=True)
class Measured:
    options: dict
    calls: float  # per prompt, mean
    tokens_fed: float
    agreement: float  # with the baseline's tokens, mean over prompts


def agreement(a: list[int], b: list[int]) -> float:
    return sum(x == y for x, y in zip(a, b)) / max(len(b), 1)


def measure(denoiser, prompts, options, reference: list[list[int]]) -> Measured:
    from accelc.loops.diffusion import generate

    results = [generate(denoiser, ids, options) for ids in prompts]
    n = len(results)
    return Measured(
        options.model_dump(mode="json"),
        sum(r.calls for r in results) / n,
        sum(r.tokens_fed for r in results) / n,
        sum(agreement(r.tokens, ref) for r, ref in zip(results, reference)) / n,
    )


def candidates(params, base):
    """Every configuration the params name, built on `base` (the baseline's options)."""
    for sampler in params.samplers:
        for cache in params.caches:
            for block in params.block_lengths:
                for knob in knobs(params, sampler):
                    for rule in params.stop_rules:
                        yield base.model_copy(
                            update={
                                "sampler": sampler,
                                "cache": cache,
                                "block_length": block,
                                "stop_rule": rule,
                                **knob,
                            }
                        )


def knobs(params, sampler: str) -> list[dict]:
    """The settings of a sampler's own knob the params name: one candidate each."""
    if sampler == "fast_threshold":
        return [{"threshold": t} for t in params.thresholds]
    if sampler == "fast_factor":
        return [{"factor": f} for f in params.factors]
    return [{}]


def choose(denoiser, prompts, params) -> tuple[dict, list[Measured]]:
    """(plan, measurements): the cheapest configuration meeting the agreement bound, else the baseline."""
    from accelc.loops.diffusion import SamplerOptions

    base = SamplerOptions(gen_length=params.gen_length, block_length=params.baseline_block_length)
    base.check()
    # the anchor is LLaDA as published: every response position decoded, one a call, no early stop
    # (the early stop conditions what precedes an end-of-text on padding, so it is a candidate too)
    published = base.model_copy(update={"stop_at_eos": False})
    reference = [measure_one(denoiser, ids, published) for ids in prompts]
    baseline = measure(denoiser, prompts, published, reference)
    measured = []
    stopped = [base.model_copy(update={"stop_rule": rule}) for rule in params.stop_rules]
    configs = [*stopped, *(c for c in candidates(params, base) if c not in stopped)]
    for options in progress.bar(configs, desc="diffusion_sampling", unit="config"):
        options.check()
        measured.append(measure(denoiser, prompts, options, reference))
    good = [m for m in measured if m.agreement >= params.min_agreement]
    if not good:
        reason = f"no configuration reached agreement {params.min_agreement} with the baseline; the baseline is planned"
        return {"sampler": baseline.options, "fallback": True, "reason": reason}, [baseline, *measured]
    best = min(good, key=lambda m: (m.calls, m.tokens_fed))
    knob = {
        "fast_threshold": f" threshold {best.options['threshold']}",
        "fast_factor": f" factor {best.options['factor']}",
    }
    reason = (
        f"{best.options['sampler']}{knob.get(best.options['sampler'], '')}/{best.options['cache']} "
        f"(block {best.options['block_length']}, stop {best.options['stop_rule']}): "
        f"{best.calls:.1f} calls against the baseline's {baseline.calls:.1f}, agreement {best.agreement:.3f}"
    )
    return {"sampler": best.options, "fallback": False, "reason": reason}, [baseline, *measured]


def measure_one(denoiser, ids, options) -> list[int]:
    from accelc.loops.diffusion import generate

    return generate(denoiser, ids, options).tokens


@registry.register_pass
class DiffusionSampling(registry.Pass):
    """Choose a diffusion LM's sampler, block length, threshold and cache by calls and agreement with the baseline."""

    name = "diffusion_sampling"
    version = 4
    families = ("diffusion_lm",)
    reads = ("data.calibration",)

    class Params(registry.Params):
        samplers: list[Literal["baseline", "fast_threshold", "fast_factor", "slowfast"]] = Field(
            default_factory=lambda: ["fast_threshold", "fast_factor", "slowfast"], min_length=1
        )
        caches: list[Literal["none", "prefix", "dual"]] = Field(default_factory=lambda: ["none", "prefix", "dual"])
        block_lengths: list[Annotated[int, Field(ge=1)]] = Field(default_factory=lambda: [32], min_length=1)
        thresholds: list[float] = Field(default_factory=lambda: [0.9], min_length=1)
        factors: list[Annotated[float, Field(gt=0)]] = Field(default_factory=lambda: [1.0, 2.0], min_length=1)
        stop_rules: list[Literal["settled", "eos"]] = Field(default_factory=lambda: ["settled"], min_length=1)
        gen_length: int = Field(64, ge=1, description="response length of the calibration runs and the plan")
        baseline_block_length: int = Field(32, ge=1, description="the baseline's block length (one token a call)")
        calibration_prompts: int = Field(4, ge=1)
        prompt_tokens: int = Field(32, ge=1)
        min_agreement: float = Field(
            0.9, ge=0, le=1, description="quality bound: the fraction of the baseline's tokens a plan must reproduce"
        )

        @model_validator(mode="after")
        def _blocks_tile_the_response(self):
            for block in [self.baseline_block_length, *self.block_lengths]:
                if self.gen_length % block:
                    raise ValueError(
                        f"block length {block} does not divide gen_length {self.gen_length}: blocks must tile the response"
                    )
            return self

    def run(self, bundle, ctx):
        from transformers import AutoTokenizer

        from accelc.data import load_text
        from accelc.families import diffusion_lm_model as dm
        from accelc.families.diffusion_lm_proof import encode
        from accelc.runtime.denoiser import TorchDenoiser

        p = self.params
        tokenizer = AutoTokenizer.from_pretrained(bundle.model_dir, local_files_only=True)
        ids = encode(tokenizer, load_text(ctx.recipe.data.calibration))
        stride = max(p.prompt_tokens, len(ids) // (p.calibration_prompts + 1))
        prompts = [ids[k * stride : k * stride + p.prompt_tokens] for k in range(1, p.calibration_prompts + 1)]
        denoiser = TorchDenoiser(dm.load(bundle.model_dir))
        plan, measured = choose(denoiser, [q for q in prompts if q], p)
        report = ctx.workdir / "diffusion_sampling.json"
        report.write_text(json.dumps({"plan": plan, "measured": [asdict(m) for m in measured]}, indent=2))
        progress.status(f"diffusion_sampling: {plan['reason']}")
        return bundle.evolve(
            plan={**bundle.plan, **plan}, reports={**bundle.reports, "diffusion_sampling.json": report}
        )
