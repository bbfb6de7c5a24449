"""speculative: rewrite the generation loop into draft-then-verify decoding, if it pays.

The draft is a model folder named in the recipe, or derived from the target: by keeping a subset
of its layers (layer skip), or as a subnet found by architecture search and reformation at a
given removal ratio (the pruning passes, run on the target). The pass checks that both share one vocabulary, estimates the
acceptance rate alpha = 1 - E[TV(p, q)] along the target's own continuations of calibration
prompts, measures the cost ratio c (draft step / target step on this machine: on the ONNX
Runtime graphs when the pass follows export_onnx, which is what deploys; torch eager otherwise),
and picks the draft length gamma that maximises the predicted speedup: for one draft sequence a
round (speculative, stairs), the measured per-position acceptance replayed through the loop
(replay.replayed_speedup); for PEARL, the same acceptance replayed through its two modes;
for batch speculative, replayed with its candidates' acceptance at each round's first position. When no
gamma predicts a gain, the plan stays autoregressive and says why. With `draft.lookup`, rounds
of the speculative, stairs and PEARL loops first copy drafts from the context (decoding/lookup.py)
and the replay prices that too; copying stays on only where it predicts a 5% gain. Every figure lands in
decode/plan.json and the manifest. Output is unchanged by construction: greedy plans give the
target's greedy tokens exactly, which validation then checks on every backend.
"""

from __future__ import annotations

import os
from typing import Literal

from pydantic import Field, model_validator

from accelc import progress
from accelc.compiler import registry
from accelc.errors import UsageError
from accelc.loops import registry as loop_registry

MAX_CALIBRATION_TOKENS = 128  # per calibration prompt: alpha's continuations follow decode.max_new_tokens up to this


class DraftSpec(registry.Params):
    """Where the draft comes from: exactly one of `path` (a draft checkpoint folder), `keep_layers`
    (layer skip), `subnet_ratio` (a subnet found by architecture search + reformation) or
    `from_target` (the target's own weights). Then, when the pass follows export_onnx, the draft's
    graph can be made cheaper still: `weights` (8- or 4-bit MatMulNBits) and `vocab` (a head that
    scores only the most frequent tokens). Neither changes the output: speculative decoding is exact
    for any draft; they trade acceptance (alpha) for draft cost (c), both measured."""

    path: str | None = Field(None, description="Hugging Face folder of a draft sharing the target's tokenizer")
    keep_layers: list[int] | None = Field(
        None, min_length=1, description="derive the draft from the target, keeping these layers"
    )
    subnet_ratio: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="derive the draft by removing this fraction "
        "of the target's attention + MLP weights (importance, arch_search, reform, "
        "materialize: the pruning passes, run on the target)",
    )
    from_target: bool = Field(
        False, description="the target's own weights as the draft, made cheaper by `weights` and/or `vocab`"
    )
    weights: Literal["fp32", "int8", "int4", "gguf"] = Field(
        "fp32",
        description="weight precision of the draft's ONNX graph (ORT MatMulNBits); gguf: the source GGUF's own "
        "4-bit blocks with int8 compute (passes/gguf_weights.py); needs the pass after export_onnx",
    )
    block_size: Literal[16, 32, 64, 128, 256] = Field(
        32,
        description="input channels per quantisation block of "
        "`weights` (one scale each): larger blocks are cheaper to run "
        "and cost acceptance",
    )
    symmetric: bool = Field(False, description="`weights` without zero points (cheaper kernels, coarser levels)")
    vocab: int | None = Field(
        None,
        ge=16,
        description="the draft's head scores only the N most frequent tokens "
        "of data.calibration (plus special tokens); needs the pass after export_onnx and a "
        "fused graph (llama, qwen2)",
    )
    lookup: int | None = Field(
        None,
        ge=1,
        le=64,
        description="each round first tries to copy up to N drafts "
        "from the context: what followed the latest earlier occurrence of the sequence's "
        "last tokens (prompt lookup decoding, no model call); the draft model drafts where "
        "nothing matches (PEARL verifies copies in a round of their own, alone). Not batch_speculative",
    )
    lookup_ngram: int = Field(
        3, ge=1, le=8, description="longest suffix `lookup` matches (it tries down to 2 tokens, or 1 when this is 1)"
    )
    search_generations: int = Field(4, ge=1, description="arch_search generations for a subnet draft")
    search_population: int = Field(12, ge=4, description="arch_search candidates per generation for a subnet draft")

    @model_validator(mode="after")
    def _one(self):
        given = [k for k in ("path", "keep_layers", "subnet_ratio") if getattr(self, k) is not None]
        given += ["from_target"] if self.from_target else []
        if len(given) != 1:
            raise ValueError("give exactly one of 'path', 'keep_layers', 'subnet_ratio' or 'from_target'")
        if self.weights in ("fp32", "gguf") and (self.block_size != 32 or self.symmetric):
            raise ValueError(
                "'block_size' and 'symmetric' describe re-quantised 8- or 4-bit draft weights; set 'weights' "
                "too (int8 or int4: gguf keeps the file's own blocks of 32)"
            )
        if self.lookup is None and self.lookup_ngram != 3:
            raise ValueError("'lookup_ngram' tunes drafts copied from the context; set 'lookup' too")
        if self.from_target and not self.compressed:
            raise ValueError(
                "'from_target' needs 'weights' (int8/int4) or 'vocab': an unchanged copy of the "
                "target cannot be a cheaper draft"
            )
        return self

    @property
    def compressed(self) -> bool:
        return self.weights != "fp32" or self.vocab is not None

    def copying(self):
        """The Lookup the loops use, or None."""
        from accelc.loops.lookup import Lookup

        if self.lookup is None:
            return None
        return Lookup(tokens=self.lookup, max_ngram=self.lookup_ngram, min_ngram=min(2, self.lookup_ngram))


@registry.register_pass
class Speculative(registry.Pass):
    """Speculative decoding plan: draft model, measured alpha and cost ratio, gamma by predicted speedup."""

    name = "speculative"
    version = 14  # cache key: bumped when the output changes for the same params (CHANGELOG.md)
    reads = ("data.calibration", "decode")  # alpha's prompts and sampler, the draft's vocabulary
    produces = ("draft", "plan")

    class Params(registry.Params):
        draft: DraftSpec
        strategy: Literal[loop_registry.names(needs_draft=True, priced=True)] = "speculative"
        gamma_max: int = Field(8, ge=1, le=16, description="largest draft length considered")
        calibration_prompts: int = Field(4, ge=1, description="prompts from data.calibration for alpha")
        prompt_tokens: int = Field(48, ge=4, description="tokens per calibration prompt")
        num_candidates: int = Field(2, ge=2, description="draft sequences per step (batch_speculative)")
        fallback: bool = Field(
            True,
            description="decode autoregressively when no gamma predicts a gain "
            "(false: use the strategy anyway, e.g. to measure it)",
        )
        pearl_threads: list[int] | None = Field(
            None,
            min_length=2,
            max_length=2,
            description="ORT intra-op threads of PEARL's [target, draft] "
            "workers, which run at once (default: the cores split in two)",
        )
        pearl_alone_session: bool = Field(
            True,
            description="PEARL on ORT: a second session of the target on "
            "the artifact's threads for the calls no worker runs beside (the "
            "prefill, rounds of copied drafts); it costs the target's weights "
            "once more in memory (false: those calls run on the worker's threads)",
        )

        @model_validator(mode="after")
        def _lookup_loops(self):
            if self.draft.lookup is not None and not loop_registry.copying(self.strategy):
                able = [name for name in loop_registry.names(needs_draft=True) if loop_registry.copying(name)]
                raise ValueError(
                    f"draft 'lookup' (drafts copied from the context) works with the {', '.join(able)} "
                    f"strategies, not {self.strategy}"
                )
            return self

    @classmethod
    def flow(cls, params):
        # a compressed draft is a rewritten copy of the target's exported graph
        return ("onnx_graph",) if params.draft.compressed else (), cls.produces, cls.drops

    @classmethod
    def files(cls, params):
        return (params.draft.path,) if params.draft.path is not None else ()

    def run(self, bundle, ctx):
        from accelc.families.causal_lm import check_checkpoint, load_model, load_tokenizer

        trust = bool(bundle.source.get("trust_remote_code"))
        target_model = load_model(bundle.model_dir, trust)
        if self.params.draft.path is not None:
            draft_dir = ctx.resolve(self.params.draft.path)
            if not draft_dir.is_dir():
                raise UsageError(f"speculative: draft path {draft_dir} is not a checkpoint folder")
            check_checkpoint(draft_dir, trust)
            _check_same_tokenizer(load_tokenizer(bundle.model_dir, trust), load_tokenizer(draft_dir, trust), draft_dir)
        elif self.params.draft.from_target:
            draft_dir = bundle.model_dir
        elif self.params.draft.keep_layers is not None:
            draft_dir = _layer_skip_draft(
                target_model, self.params.draft.keep_layers, bundle.model_dir, ctx.workdir / "draft"
            )
        else:
            draft_dir, reports = _subnet_draft(bundle, ctx, self.params.draft)
            bundle = bundle.evolve(reports={**bundle.reports, **{f"draft_{k}": v for k, v in reports.items()}})
        draft_model = load_model(draft_dir, trust)
        if draft_model.config.vocab_size != target_model.config.vocab_size:
            raise UsageError(
                f"speculative: the draft's vocabulary has {draft_model.config.vocab_size} tokens, the "
                f"target's {target_model.config.vocab_size}; draft and target must share a tokenizer"
            )
        graphs, metas = {}, {}
        if "decoder" in bundle.graphs:
            # placed after export_onnx: export the draft too, and measure alpha and c on the graphs
            # that will be deployed (ORT's cost ratio differs from torch eager's per-op overhead)
            from accelc.runtime.ort_backend import OrtStepModel

            graphs["draft"], metas["draft"] = self._draft_graph(bundle, draft_model, draft_dir, ctx)
            target, draft, backend = OrtStepModel(bundle.graphs["decoder"]), OrtStepModel(graphs["draft"]), "ort"

            def workers(target_threads: int, draft_threads: int):
                return (
                    OrtStepModel(bundle.graphs["decoder"], {"intra_op_threads": target_threads}),
                    OrtStepModel(graphs["draft"], {"intra_op_threads": draft_threads}),
                )
        elif self.params.draft.compressed:
            raise UsageError(
                "speculative: draft 'weights'/'vocab' compress the draft's ONNX graph; put the "
                "speculative pass after export_onnx"
            )
        else:
            from accelc.runtime.torch_backend import TorchStepModel

            target, draft, backend = TorchStepModel(target_model), TorchStepModel(draft_model), "torch"
            workers = None  # torch's thread pool is process-wide: PEARL's workers cannot be given a share
        plan = self._plan(target, draft, backend, load_tokenizer(bundle.model_dir, trust), ctx, workers)
        if self.params.draft.from_target and not plan["fallback"]:
            # the draft's keys and values are the target's own (compressed): it starts from the
            # target's prompt cache, so a long prompt is prefilled once, not twice
            plan["draft_prompt_kv"] = "target"
        if plan["fallback"]:
            return bundle.evolve(plan={**bundle.plan, **plan})
        plan["draft_source"] = next(
            k
            for k in ("path", "keep_layers", "subnet_ratio", "from_target")
            if getattr(self.params.draft, k) not in (None, False)
        )
        # a draft made from the target's own weights differs from it only in its compressed graph:
        # as a torch checkpoint (or a TVM library) it would be the target itself, a draft that only
        # adds work, so the bundle carries no draft checkpoint and those backends decode plainly
        checkpoint = None if self.params.draft.from_target else draft_dir
        return bundle.evolve(
            draft_dir=checkpoint,
            plan={**bundle.plan, **plan},
            graphs={**bundle.graphs, **graphs},
            graph_meta={**bundle.graph_meta, **metas},
        )

    def _draft_graph(self, bundle, draft_model, draft_dir, ctx):
        """The draft as an ONNX graph written the way the target's was, then compressed as asked."""
        from accelc.families.causal_lm import load_tokenizer
        from accelc.passes.export_onnx import export_checkpoint
        from accelc.passes.quantize import quantize_matmul_nbits

        spec, target_meta = self.params.draft, bundle.graph_meta.get("decoder", {})
        subset = None
        if spec.vocab is not None:
            from accelc.data import mixture_text

            tokenizer = load_tokenizer(bundle.model_dir, bool(bundle.source.get("trust_remote_code")))
            subset = frequent_tokens(tokenizer, mixture_text(ctx.recipe.data.calibration), spec.vocab)
        graph, meta = export_checkpoint(
            draft_model,
            draft_dir,
            ctx.workdir / "draft_onnx",
            target_meta.get("opset"),
            target_meta.get("graph", "auto"),
            vocab_subset=subset,
        )
        compression = []
        if subset is not None:
            compression.append(f"head scores {len(subset)} of {draft_model.config.vocab_size} tokens")
        if spec.weights == "gguf":
            from accelc.gguf_blocks import GGUFBlocks
            from accelc.passes.gguf_weights import carry_blocks, source_gguf

            with progress.step("speculative: the draft's weights as the GGUF's own 4-bit blocks"):
                blocks = GGUFBlocks(source_gguf(bundle.source))
                dst = graph.with_name("model.gguf4.onnx")
                # a draft need not be exact (verification is): int8 compute, the cheaper kernel
                carry_blocks(graph, dst, blocks, "split", accuracy_level=4)
                graph = dst
            compression.append("the GGUF's own 4-bit blocks (MatMulNBits, int8 compute)")
        elif spec.weights != "fp32":
            bits = {"int8": 8, "int4": 4}[spec.weights]
            with progress.step(f"speculative: draft weights to {spec.weights}"):
                graph = quantize_matmul_nbits(
                    graph,
                    graph.with_name(f"model.{spec.weights}.onnx"),
                    bits=bits,
                    block_size=spec.block_size,
                    symmetric=spec.symmetric,
                )
            compression.append(
                f"{spec.weights} weights (MatMulNBits, block {spec.block_size}"
                f"{', symmetric' if spec.symmetric else ''})"
            )
        return graph, {**meta, **({"compression": "; ".join(compression)} if compression else {})}

    def _plan(self, target, draft, backend: str, tokenizer, ctx, workers=None) -> dict:
        """Calibrate alpha, measure costs, let the loop's pricing choose, and build the plan."""
        from accelc.loops import pricing
        from accelc.loops.plan import DecodePlan

        loop = loop_registry.get(self.params.strategy)
        decode = DecodePlan.of(ctx.recipe.decode.model_dump())
        lookup = self.params.draft.copying()
        prompts = self._calibration_prompts(tokenizer, ctx)
        alpha = self._calibrate(target, draft, prompts, decode, lookup, loop.pricing)
        with progress.step(f"speculative: cost ratio c ({backend})"):
            cost = self._measure_costs(target, draft, prompts[0], lookup)
        measured, records = self._loop_costs(loop.pricing, alpha, cost, prompts[0], lookup, target, workers)
        decision = pricing.decide(loop.pricing, measured, self.params.gamma_max, lookup)
        plan = pricing.plan_fields(
            self.params.strategy,
            decision,
            measured,
            cost,
            autoregressive=decode.strategy,
            fallback_allowed=self.params.fallback,
            num_candidates=self.params.num_candidates,
            backend=backend,
            records=records,
        )
        plan["calibration_prompts"] = {"count": len(prompts), "form": self._prompt_form(tokenizer, ctx)}
        progress.status(
            f"speculative: alpha={alpha.alpha:.3f}±{alpha.stderr:.3f}, c={cost.cost_ratio:.3f}: {plan['reason']}"
        )
        return plan

    def _calibration_prompts(self, tokenizer, ctx) -> list[list[int]]:
        """Calibration windows, as the plan will see prompts: wrapped in the chat template when the
        decode plan applies one (`accelc run`, `accelc serve`). An instruction-tuned model answers a
        chat turn in another register than it continues raw text, and the draft's acceptance
        follows: raw windows of a novel overstated it for chat use (0.95 against 0.70 measured)."""
        import numpy as np

        from accelc.data import calibration_windows
        from accelc.families.causal_lm import encode_prompt

        n = self.params.prompt_tokens
        windows = calibration_windows(
            tokenizer, ctx.recipe.data.calibration, window=n, max_windows=self.params.calibration_prompts
        )
        if self._prompt_form(tokenizer, ctx) == "raw":
            return [np.asarray(w).tolist() for w in windows]
        return [encode_prompt(tokenizer, tokenizer.decode(np.asarray(w).tolist()), True) for w in windows]

    @staticmethod
    def _prompt_form(tokenizer, ctx) -> Literal["chat", "raw"]:
        chat = ctx.recipe.decode.chat_template and getattr(tokenizer, "chat_template", None)
        return "chat" if chat else "raw"

    def _calibrate(self, target, draft, prompts, decode, lookup, loop_pricing):
        """alpha along the target's continuations, as long as the plan's own (within limits): text
        repeats itself more the longer it runs, which is what copied drafts live on."""
        from accelc.loops.calibration import CALIBRATION_NEW_TOKENS, estimate_alpha

        new_tokens = min(max(CALIBRATION_NEW_TOKENS, decode.max_new_tokens), MAX_CALIBRATION_TOKENS)
        with progress.step(f"speculative: alpha on {len(prompts)} calibration prompts x {new_tokens} tokens"):
            return estimate_alpha(
                target,
                draft,
                prompts,
                sampler=decode.sampler(),
                new_tokens=new_tokens,
                prompt_kv_from_target=self.params.draft.from_target,
                lookup=lookup,
                candidates=self.params.num_candidates if loop_pricing.candidates else 1,
            )

    def _measure_costs(self, target, draft, prompt, lookup, **timing):
        from accelc.loops.timing import measure_loop_costs

        return measure_loop_costs(
            target, draft, prompt, gamma_max=self.params.gamma_max, copying=lookup is not None, **timing
        )

    def _loop_costs(self, loop_pricing, alpha, cost, prompt, lookup, target, workers):
        """What the loop is priced with, and what the plan records of it: a loop whose target and
        draft run at once (PEARL) on workers that each get a share of the cores is priced with
        the workers' costs, timed while both run, each slowed by the other's use of the caches
        and memory bandwidth."""
        from accelc.loops.pricing import measured_for

        candidates = self.params.num_candidates
        if not loop_pricing.parallel_workers or workers is None:
            return measured_for(loop_pricing, alpha, cost, candidates=candidates), {}
        cores = os.cpu_count() or 2
        threads = self.params.pearl_threads or [max(1, cores - cores // 2), max(1, cores // 2)]
        with progress.step(f"speculative: PEARL workers' costs ({threads[0]}+{threads[1]} threads)"):
            # the slowdown against the all-core target is timed in the same repeats
            worker_cost = self._measure_costs(*workers(*threads), prompt, lookup, concurrent=True, baseline=target)
        records = {
            "worker_threads": {"target": threads[0], "draft": threads[1]},
            "worker_slowdown": worker_cost.baseline_ratio,
            "worker_cost_ratio": worker_cost.cost_ratio,
            "alone_session": self.params.pearl_alone_session,
        }
        measured = measured_for(
            loop_pricing,
            alpha,
            cost,
            worker_cost,
            candidates=candidates,
            alone_session=self.params.pearl_alone_session,
        )
        return measured, records


def frequent_tokens(tokenizer, text: str, n: int) -> list[int]:
    """The n most frequent token ids of `text`, plus every special token (end of sequence must
    stay proposable), sorted."""
    import collections

    counts = collections.Counter(tokenizer.encode(text, add_special_tokens=False))
    if len(counts) < n:
        raise UsageError(
            f"speculative: draft vocab {n} exceeds the {len(counts)} distinct tokens of the calibration "
            "text; use a smaller vocab or a longer text"
        )
    return sorted({t for t, _ in counts.most_common(n)} | set(tokenizer.all_special_ids))


def _check_same_tokenizer(target_tok, draft_tok, draft_dir) -> None:
    if target_tok.get_vocab() != draft_tok.get_vocab():
        raise UsageError(
            f"speculative: the draft at {draft_dir} uses a different tokenizer from the target's "
            f"({len(draft_tok)} vs {len(target_tok)} tokens or different ids); draft and target "
            "must share one vocabulary"
        )


def _subnet_draft(bundle, ctx, spec: DraftSpec):
    """The target pruned by the pruning passes themselves, run by the pass manager as a recipe
    chaining them would run them (each step cached, and named on failure), kept as the draft
    instead of the target."""
    from accelc.compiler.bundle import chain

    n = spec.search_population
    steps = [
        ("importance", {}),
        (
            "arch_search",
            {
                "budget": {"remove_ratio": spec.subnet_ratio},
                "generations": spec.search_generations,
                "population": n,
                "parents": max(2, n // 3),
                "mutations": n // 2,
                "crossovers": n // 4,
            },
        ),
        ("reform", {}),
        ("materialize", {}),
    ]
    # the pruning passes work on torch, without the target's graphs; a chain of its own keeps
    # these steps' cache entries apart from the same passes run on the target in a recipe
    draft = bundle.evolve(id=chain(bundle.id, "speculative:draft_subnet", {}), intermediates={}, reports={}, graphs={})
    draft = ctx.run_passes(draft, steps, "speculative draft subnet: ")
    return draft.model_dir, dict(draft.reports)


def layer_skip_model(model, keep: list[int]):
    """A deep copy of the target that keeps only the decoder layers `keep` (same embeddings and
    head): the layer-skip draft in memory; the target is left as it was."""
    import copy

    import torch

    layers = _decoder_layers(model)
    n = len(layers)
    if not keep or sorted(set(keep)) != list(keep) or keep[0] < 0 or keep[-1] >= n:
        raise UsageError(f"speculative: keep_layers must be increasing layer indices in 0..{n - 1}, got {keep}")
    draft = copy.deepcopy(model)
    kept = torch.nn.ModuleList([_decoder_layers(draft)[i] for i in keep])
    _set_decoder_layers(draft, kept)
    draft.config.num_hidden_layers = len(keep)
    if getattr(draft.config, "layer_types", None):
        draft.config.layer_types = [draft.config.layer_types[i] for i in keep]
    return draft


def _layer_skip_draft(model, keep: list[int], source_dir, out_dir):
    """A draft made of a subset of the target's layers (shared embeddings and head), saved as a folder."""
    import shutil

    layer_skip_model(model, keep).save_pretrained(out_dir, safe_serialization=True)
    for name in (
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "generation_config.json",
        "vocab.json",
        "merges.txt",
        "tokenizer.model",
    ):
        if (source_dir / name).exists():
            shutil.copy2(source_dir / name, out_dir / name)
    return out_dir


def _decoder_layers(model):
    for path in ("model.layers", "transformer.h", "model.decoder.layers"):
        obj = model
        try:
            for part in path.split("."):
                obj = getattr(obj, part)
            return obj
        except AttributeError:
            continue
    raise UsageError(f"speculative: cannot find the decoder layers of a {type(model).__name__}")


def _set_decoder_layers(model, layers) -> None:
    for path in ("model.layers", "transformer.h", "model.decoder.layers"):
        *parents, last = path.split(".")
        obj = model
        try:
            for part in parents:
                obj = getattr(obj, part)
            getattr(obj, last)
        except AttributeError:
            continue
        setattr(obj, last, layers)
        return
