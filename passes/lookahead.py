"""lookahead: plan Jacobi or lookahead decoding where it pays on the deployed backend, else keep greedy.

Jacobi decoding (loops/jacobi.py) and lookahead decoding (loops/lookahead.py, Fu et al., arXiv
2402.02057) give the greedy output exactly and trade fewer calls for longer ones: a call feeds
a window of tokens and commits those of its guesses that hold. Whether that pays is a property
of the backend: the pass runs each configuration on calibration prompts (the tokens each call
fed and committed), times the backend's per-call cost curve (a k-token call over a one-token
call, k = 1 up to the longest call the runs made, timing.call_cost_curve) on the ONNX Runtime
graph when it follows export_onnx (what deploys; torch eager otherwise), prices every
configuration (loops/jacobi_pricing.py) and writes the fastest into decode/plan.json, or keeps
greedy decoding with the measured reason. The curve, the runs' figures and the decision go to
reports/lookahead.json. On a CPU a k-token call costs more than a one-token call from k = 2 on
(a GPU's stays near 1 up to dozens of tokens), so the pass may well keep greedy decoding;
docs/jacobi.md has the curve and figures measured on SmolLM2.
"""

from __future__ import annotations

import json
from typing import Annotated, Literal

from pydantic import Field, model_validator

from accelc import progress
from accelc.compiler import registry
from accelc.errors import UsageError
from accelc.loops.jacobi import DEFAULT_WINDOW
from accelc.loops.lookahead import DEFAULT_GUESS_SET, DEFAULT_NGRAM

MIN_CALIBRATION_TOKENS, MAX_CALIBRATION_TOKENS = 32, 128  # continuations follow decode.max_new_tokens within these


@registry.register_pass
class Lookahead(registry.Pass):
    """Jacobi / lookahead decoding plan: runs on calibration prompts, the backend's call-cost curve, greedy unless it pays."""

    name = "lookahead"
    version = 1  # cache key: bumped when the output changes for the same params (CHANGELOG.md)
    reads = ("data.calibration", "decode")
    produces = ("plan",)

    class Params(registry.Params):
        strategies: list[Literal["jacobi", "lookahead"]] = Field(
            ["jacobi", "lookahead"], min_length=1, description="the loops to price (greedy decoding is always one)"
        )
        windows: list[Annotated[int, Field(ge=1)]] = Field(
            [DEFAULT_WINDOW],
            min_length=1,
            description="W values to price: positions iterated a call (1: lookahead verifies candidates only)",
        )
        ngrams: list[Annotated[int, Field(ge=2)]] = Field(
            [DEFAULT_NGRAM],
            min_length=1,
            description="N values to price: lookahead's n-gram size (candidates of N - 1 tokens)",
        )
        guess_set: int = Field(DEFAULT_GUESS_SET, ge=0, description="G: lookahead's n-grams kept per first token")
        lookup: int | None = Field(
            None,
            ge=1,
            le=64,
            description="also price lookahead with prompt lookup: up to N tokens copied from the context join "
            "its candidates (loops/lookup.py)",
        )
        calibration_prompts: int = Field(4, ge=1, description="prompts from data.calibration")
        prompt_tokens: int = Field(48, ge=4, description="tokens per calibration prompt")
        min_speedup: float = Field(
            1.0, ge=1.0, description="plan a window loop only where it is predicted faster than this x greedy"
        )
        fallback: bool = Field(
            True,
            description="keep greedy decoding where nothing pays (false: plan the best anyway, e.g. to measure it)",
        )

        @model_validator(mode="after")
        def _something_to_price(self):
            if "lookahead" not in self.strategies and max(self.windows) == 1:
                raise ValueError("Jacobi decoding with window 1 is greedy decoding: give a window above 1")
            return self

    def run(self, bundle, ctx):
        from accelc.families.causal_lm import load_model, load_tokenizer
        from accelc.loops.plan import DecodePlan

        decode = DecodePlan.of(ctx.recipe.decode.model_dump())
        if decode.samples:
            raise UsageError(
                f"lookahead: decode.strategy is {decode.strategy}, but Jacobi and lookahead decoding are greedy "
                "only; use strategy greedy"
            )
        trust = bool(bundle.source.get("trust_remote_code"))
        if "decoder" in bundle.graphs:
            from accelc.runtime.ort_backend import OrtStepModel

            model, backend = OrtStepModel(bundle.graphs["decoder"]), "ort"
        else:
            from accelc.runtime.torch_backend import TorchStepModel

            model, backend = TorchStepModel(load_model(bundle.model_dir, trust)), "torch"
        prompts = _calibration_prompts(load_tokenizer(bundle.model_dir, trust), ctx, self.params)
        new_tokens = min(max(MIN_CALIBRATION_TOKENS, decode.max_new_tokens), MAX_CALIBRATION_TOKENS)
        report = self._decide(model, backend, prompts, new_tokens)
        path = ctx.workdir / "lookahead.json"
        path.write_text(json.dumps(report, indent=2))
        return bundle.evolve(plan={**bundle.plan, **report["plan"]}, reports={**bundle.reports, "lookahead.json": path})

    def configurations(self) -> list[tuple[str, str, dict]]:
        """(name, loop, plan settings) of every configuration priced: Jacobi at each window but 1
        (greedy decoding), lookahead at each window and n-gram size, with prompt lookup too."""
        from accelc.loops.lookup import Lookup

        p = self.params
        out = []
        if "jacobi" in p.strategies:
            out += [(f"jacobi W={w}", "jacobi", {"window": w}) for w in p.windows if w > 1]
        if "lookahead" in p.strategies:
            copies = {"lookup": Lookup(tokens=p.lookup).to_dict()} if p.lookup is not None else None
            for w in p.windows:
                for n in p.ngrams:
                    settings = {"window": w, "ngram": n, "guess_set": p.guess_set}
                    out.append((f"lookahead W={w} N={n}", "lookahead", settings))
                    if copies:
                        out.append((f"lookahead+lookup W={w} N={n}", "lookahead", {**settings, **copies}))
        return out

    def _decide(self, model, backend: str, prompts: list[list[int]], new_tokens: int) -> dict:
        from accelc.loops import jacobi_pricing
        from accelc.loops import registry as loop_registry
        from accelc.loops.autoregressive import generate
        from accelc.loops.plan import DecodePlan
        from accelc.loops.timing import call_cost_curve

        with progress.step(f"lookahead: greedy on {len(prompts)} calibration prompts x {new_tokens} tokens"):
            greedy = [generate(model, prompt, new_tokens).tokens for prompt in prompts]
        runs = {}
        for name, strategy, settings in self.configurations():
            loop = loop_registry.get(strategy)
            with progress.step(f"lookahead: {name} on the calibration prompts"):
                plan = DecodePlan(strategy=strategy, **settings)
                runs[name] = [
                    loop.run(plan, model, None, prompt, new_tokens, sampler=plan.sampler(), eos_ids=())
                    for prompt in prompts
                ]
        longest = max(k for results in runs.values() for r in results for k in r.stats["call_tokens_fed"])
        with progress.step(f"lookahead: call cost curve k = 1..{longest} ({backend})"):
            curve = call_cost_curve(model, prompts[0], range(1, longest + 1))
        priced = [
            jacobi_pricing.Priced.of(
                name,
                strategy,
                settings,
                [jacobi_pricing.WindowRun.of(r) for r in runs[name]],
                curve,
                all(r.tokens == g for r, g in zip(runs[name], greedy)),
            )
            for name, strategy, settings in self.configurations()
        ]
        choice = jacobi_pricing.choose(priced, curve, self.params.min_speedup, self.params.fallback)
        progress.status(f"lookahead: {choice.reason}")
        plan = {
            "strategy": choice.strategy,
            **choice.settings,
            "fallback": choice.strategy == "greedy",  # nothing paid, and the recipe allowed it
            "reason": choice.reason,
            "predicted_speedup": choice.predicted_speedup,
            "prediction": "calibration runs of each loop priced with the backend's call-cost curve "
            "(loops/jacobi_pricing.py)",
            "cost_backend": backend,
            "call_cost_curve": {str(k): v for k, v in curve.items()},
        }
        return {
            "backend": backend,
            "calibration_prompts": len(prompts),
            "new_tokens": new_tokens,
            "call_cost_curve": {str(k): v for k, v in curve.items()},
            "priced": [p.to_dict() for p in priced],
            "plan": plan,
        }


def _calibration_prompts(tokenizer, ctx, params) -> list[list[int]]:
    import numpy as np

    from accelc.data import calibration_windows

    windows = calibration_windows(
        tokenizer, ctx.recipe.data.calibration, window=params.prompt_tokens, max_windows=params.calibration_prompts
    )
    return [np.asarray(w).tolist() for w in windows]
