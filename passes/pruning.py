"""Training-free structured pruning as passes: statistics, search or a baseline, reformation, materialisation.

A recipe chains them; each leaves its result for the next as a file in the bundle's
`intermediates` (cached with the step like any pass output):

    importance        calibration statistics at the inputs of o_proj/down_proj  -> calibration_stats
    arch_search       evolutionary search for a subnet under a budget            -> subnet (+ search log, plot)
    magnitude_prune   uniform structured pruning by weight norm                  -> subnet
    wanda_sp          uniform structured pruning by |W| * ||x||                  -> subnet
    flap              adaptive structure + bias compensation                     -> subnet, consumer_weights
    reform            layer-by-layer least-squares rectification                 -> consumer_weights
    materialize       physically smaller checkpoint (per-layer widths)           -> model_dir

Every subnet-producing pass shares one budget definition (BudgetSpec) and one search space
(gqa, multiple), and every calibration-driven step reads the recipe's `data.calibration` text,
so baselines and search compare on the same data. Each pass declares what it reads, consumes and
produces (registry.Step), which is how `accelc validate` refuses, say, reform before any subnet.
The algorithms live in accelc.compiler.pruning; these classes only load, call and save.
"""

from __future__ import annotations

import json
from typing import Literal

from pydantic import Field, model_validator

from accelc import progress
from accelc.compiler import registry
from accelc.errors import UsageError

STATS, SUBNET, CONSUMERS = "calibration_stats", "subnet", "consumer_weights"


class BudgetSpec(registry.Params):
    """Exactly one of `remove_ratio`, `max_params` or `latency_ratio`."""

    remove_ratio: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="fraction of the prunable (attention + "
        "MLP projection) weights to remove; embeddings, norms and LM head are kept",
    )
    max_params: int | None = Field(None, gt=0, description="total parameters at most (embeddings included)")
    latency_ratio: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="decode latency at most this fraction of "
        "the dense model's, from a per-layer latency table measured once on "
        "ONNX Runtime CPU and cached",
    )
    slack: float = Field(0.01, ge=0, lt=1, description="search candidates cost at least (limit - slack x dense)")
    latency_threads: int = Field(0, ge=0, description="ORT threads for the latency table (0: all cores)")
    latency_past: int = Field(128, ge=1, description="KV-cache length the latency table's attention reads")

    @model_validator(mode="after")
    def _one(self):
        given = [k for k in ("remove_ratio", "max_params", "latency_ratio") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of 'remove_ratio', 'max_params' or 'latency_ratio'")
        return self


class SubnetParams(registry.Params):
    """What every subnet-producing pass takes: the budget and the search space."""

    budget: BudgetSpec
    gqa: Literal["query", "group"] = Field(
        "query",
        description="query: prune query heads inside every KV "
        "group (exportable); group: whole KV groups (torch only for now)",
    )
    multiple: int = Field(8, ge=1, le=256, description="MLP widths snap to multiples of this (GEMM tiles)")


class UniformParams(SubnetParams):
    """The uniform baselines (one head count and MLP width in every layer)."""

    prune_attention: bool = Field(True, description="also remove heads (false: MLP channels only)")


# --------------------------------------------------------------------------- shared loading


def _dense_model(bundle, pass_name: str):
    from accelc.compiler.pruning import materialize
    from accelc.families.causal_lm import load_model, load_tokenizer

    if bundle.graphs:
        raise UsageError(f"{pass_name} changes the torch model: put it before export_onnx in the recipe")
    if materialize.is_pruned(bundle.model_dir):
        raise UsageError(
            f"{pass_name}: the model is already pruned (materialize ran earlier); "
            "prune the dense model once, with one search or baseline"
        )
    trust = bool(bundle.source.get("trust_remote_code"))
    model = load_model(bundle.model_dir, trust)
    if (
        not hasattr(getattr(model, "model", None), "layers")
        or not hasattr(model.model.layers[0], "mlp")
        or not hasattr(model.model.layers[0].mlp, "gate_proj")
    ):
        raise UsageError(
            f"{pass_name}: structured pruning supports Llama-style decoders (llama, qwen2: "
            f"q/k/v/o and gate/up/down projections); this is '{model.config.model_type}'"
        )
    return model, load_tokenizer(bundle.model_dir, trust)


def _calibration(ctx, tokenizer, windows: int, window: int, *, skip: int = 0, spread: bool = False):
    from accelc.data import calibration_windows

    return calibration_windows(
        tokenizer, ctx.recipe.data.calibration, window=window, max_windows=windows, skip=skip, spread=spread
    )


def _mixture_record(ctx, tokenizer, windows: int) -> dict:
    """What a protocol records of the calibration: its name (`text`) and each source's weight,
    tokens and windows."""
    from accelc.data import calibration_record

    record = calibration_record(tokenizer, ctx.recipe.data.calibration, windows)
    return {"text": record["calibration"], "sources": record["sources"]}


def _stats(bundle, model, pass_name: str):
    from accelc.compiler.pruning.importance import CalibrationStats
    from accelc.compiler.pruning.masks import Geometry

    path = bundle.intermediate(STATS, pass_name, "the importance pass")
    return CalibrationStats.load(path, Geometry.from_model(model)), json.loads(path.with_suffix(".json").read_text())


def _space_and_budget(params: SubnetParams, model):
    from accelc.compiler.pruning import masks

    space = masks.SearchSpace(masks.Geometry.from_model(model), gqa=params.gqa, multiple=params.multiple)
    spec = params.budget
    if spec.remove_ratio is not None:
        return space, masks.ParamBudget.from_ratio(space, spec.remove_ratio, spec.slack)
    if spec.max_params is not None:
        geo = space.geometry
        limit = spec.max_params - geo.fixed_params
        if limit <= 0:
            raise UsageError(
                f"budget max_params {spec.max_params:,} is below the parameters that are never "
                f"pruned ({geo.fixed_params:,}: embeddings, norms, LM head); no subnet can meet it"
            )
        return space, masks.ParamBudget(space, limit, limit - spec.slack * geo.dense_prunable)
    from accelc.compiler.pruning import latency

    table = latency.measure(
        space.geometry,
        space,
        model.config.vocab_size,
        latency.Protocol(past=spec.latency_past, threads=spec.latency_threads),
    )
    return space, latency.LatencyBudget.from_ratio(space, table, spec.latency_ratio, spec.slack)


def _subnet_out(bundle, ctx, subnet, space, budget, method: str, overrides=None, **report):
    """Save the subnet (and replacement consumer weights) for materialize; describe it."""
    from accelc.compiler.pruning.reform import save_overrides

    path = ctx.workdir / "subnet.json"
    shape = space.shape(subnet)
    count = space.count(shape)
    info = {
        "method": method,
        "budget": budget.describe(),
        "budget_cost": budget.cost(shape),
        "params": count.to_json(),
        "gqa": space.gqa,
        "multiple": space.multiple,
        "heads": [q for q, _, _ in shape],
        "kv_heads": [kv for _, kv, _ in shape],
        "mlp_widths": [w for _, _, w in shape],
        **report,
    }
    path.write_text(json.dumps({"subnet": subnet.to_json(), "info": info}))
    progress.status(
        f"{method}: {count.removed_ratio:.1%} of prunable weights removed, "
        f"{count.total / 1e6:.1f}M parameters in total (dense {space.geometry.total_params / 1e6:.1f}M)"
    )
    intermediates = {k: v for k, v in bundle.intermediates.items() if k != CONSUMERS}
    intermediates[SUBNET] = path
    if overrides:
        save_overrides(overrides, ctx.workdir / "consumer_weights.safetensors")
        intermediates[CONSUMERS] = ctx.workdir / "consumer_weights.safetensors"
    summary = ctx.workdir / f"{method}.json"
    summary.write_text(json.dumps(info, indent=2, default=str))
    return bundle.evolve(intermediates=intermediates, reports={**bundle.reports, f"{method}.json": summary})


def load_subnet(path):
    from accelc.compiler.pruning.masks import Subnet

    data = json.loads(path.read_text())
    return Subnet.from_json(data["subnet"]), data["info"]


# --------------------------------------------------------------------------- passes


@registry.register_pass
class CalibrationStatistics(registry.Pass):
    """Calibration statistics (per-channel mean and variance at the o_proj/down_proj inputs)."""

    name = "importance"
    reads = ("data.calibration",)
    produces = (STATS,)

    class Params(registry.Params):
        windows: int = Field(16, ge=1, description="calibration windows from data.calibration")
        window: int = Field(512, ge=8, description="tokens per window")

    def run(self, bundle, ctx):
        from accelc.compiler.pruning.importance import collect

        model, tok = _dense_model(bundle, self.name)
        wins = _calibration(ctx, tok, self.params.windows, self.params.window)
        stats = collect(model, wins)
        path = ctx.workdir / f"{STATS}.npz"
        stats.save(path)
        protocol = {
            **_mixture_record(ctx, tok, len(wins)),
            "windows": len(wins),
            "window": self.params.window,
            "tokens": stats.tokens,
        }
        path.with_suffix(".json").write_text(json.dumps(protocol))
        return bundle.evolve(intermediates={**bundle.intermediates, STATS: path})


@registry.register_pass
class ArchSearch(registry.Pass):
    """Evolutionary search for a subnet under a budget; fitness = perplexity after one-shot reformation."""

    name = "arch_search"
    version = 4  # cache key: bumped when the output changes for the same params (CHANGELOG.md)
    reads = ("data.calibration", "data.evaluation")
    consumes = (STATS,)
    produces = (SUBNET,)
    drops = (CONSUMERS,)  # weights reformed for an earlier subnet do not fit this one

    class Params(SubnetParams):
        metric: Literal["energy", "fluctuation", "wanda", "magnitude"] = Field(
            "energy", description="importance that ranks heads/channels for initial masks and mutation fills"
        )
        # pooled: per-source scores did not lower the worst held-out text (20% removed: mean
        # 1.462x, max_in_layer 1.466x, max 1.597x vs 1.469x; 10%: mean 1.216x vs 1.197x;
        # docs/pruning.md, session 21)
        importance_sources: Literal["pooled", "max", "mean", "max_in_layer"] = Field(
            "pooled",
            description="pooled: importance from the statistics of every calibration window pooled; max / "
            "mean: each calibration source's scores (the importance pass's windows, grouped by source), "
            "normalised per layer, and their maximum / mean, so a channel one source relies on is not "
            "averaged away by the others; max_in_layer: max ranks within each layer, the pooled scores "
            "allocate widths across layers",
        )
        generations: int = Field(8, ge=1)
        population: int = Field(24, ge=2)
        parents: int | None = Field(None, ge=1, description="elitist archive size (default: population / 3)")
        mutations: int | None = Field(
            None, ge=0, description="mutation offspring per generation (default: population / 2)"
        )
        crossovers: int | None = Field(
            None, ge=0, description="crossover offspring per generation (default: population / 4)"
        )
        m_prob: float = Field(0.2, ge=0, le=1, description="per-layer mutation probability")
        alpha: float = Field(
            0.9, ge=0, le=1, description="a mutation keeps at least this fraction of the parent's kept heads/channels"
        )
        seed: int = 0
        # restarts and select_windows default off: 3 seeds chosen on 16 held-out calibration
        # windows picked seed 0's own best at 20% removed (the same subnet) and, at 10%, a subnet
        # level on the worst held-out text (1.196x vs 1.197x) and worse on two others, at 3x the
        # search time (docs/pruning.md, session 17)
        restarts: int = Field(
            1,
            ge=1,
            description="independent searches (seeds seed, seed + 1, ...); their final archives are pooled "
            "and one subnet is chosen from them (see select_windows)",
        )
        select_windows: int = Field(
            0,
            ge=0,
            description="calibration windows that neither the fitness nor reformation scores (spread over "
            "each source after its first select_skip windows): the pooled final archives are rescored on "
            "them by the fitness and the best is returned (0: the best fitness wins)",
        )
        select_skip: int = Field(
            128,
            ge=0,
            description="calibration windows (of fitness_window tokens, shared among the sources like "
            "windows) that the selection windows leave to reformation (reform's default 128)",
        )
        # one 512-token window per source (4 for the four-source mixture): 16 x 128 (the same
        # tokens) and 8 x 512 did not lower the worst held-out text (1.54x, 1.53x vs 1.48x at 20%
        # removed; 8 x 512 middles 1.50x; docs/pruning.md, sessions 13-14); fewer windows than
        # sources would leave a source out of the fitness
        fitness_windows: int | None = Field(
            None,
            ge=1,
            description="calibration windows (the middles of equal parts of each source after the "
            "statistics' windows) scored by the fitness (default: one per calibration source, at least 4)",
        )
        fitness_window: int = Field(512, ge=8)
        # pooled: worst_source lowered the worst held-out text at 20% removed (1.460x vs 1.486x,
        # quick search) and raised it at 10% (1.200x vs 1.172x) and with a longer search at 20%
        # (1.547x); docs/pruning.md, session 14
        fitness: Literal["pooled", "worst_source"] = Field(
            "pooled",
            description="pooled: perplexity over all fitness windows; worst_source: the largest ratio "
            "of a calibration source's perplexity to the dense model's on its windows (minimax over domains)",
        )
        holdout_windows: int = Field(
            4,
            ge=0,
            description="windows of data.evaluation (spread over it) scored on each generation's best "
            "to record the search's held-out curve in search_log.json; never used to select (0: off)",
        )
        reform_in_fitness: bool = Field(
            True,
            description="score each candidate after one-shot closed-form "
            "reformation, so the search ranks masks by what they are worth reformed",
        )
        damp: float = Field(0.2, gt=0, description="reformation ridge, x mean(diag H)")
        seed_with_flap: bool = Field(True, description="FLAP's subnet joins the first generation")

        @model_validator(mode="after")
        def _offspring_follow_population(self):
            n = self.population
            for name, default in (("parents", max(1, n // 3)), ("mutations", n // 2), ("crossovers", n // 4)):
                if getattr(self, name) is None:
                    self.__dict__[name] = default  # frozen model: fill the unset default once, here
            if self.mutations + self.crossovers > n:
                raise ValueError(
                    f"mutations + crossovers ({self.mutations} + {self.crossovers}) exceed the population ({n}); "
                    "lower them or leave them unset (they default to 1/2 and 1/4 of the population)"
                )
            if self.importance_sources != "pooled" and self.metric == "magnitude":
                raise ValueError(
                    f"importance_sources '{self.importance_sources}' scores each calibration source's "
                    "statistics, and metric 'magnitude' reads the weights only; choose another metric "
                    "or importance_sources: pooled"
                )
            return self

    def run(self, bundle, ctx):
        from accelc.compiler.pruning import baselines, importance, search
        from accelc.data import calibration_sources, mixture

        p = self.params
        model, tok = _dense_model(bundle, self.name)
        stats, protocol = _stats(bundle, model, self.name)
        space, budget = _space_and_budget(p, model)
        by_source = None
        if p.importance_sources != "pooled":
            # the importance pass's windows (calibration_windows interleaves these same groups)
            groups = calibration_sources(
                tok, ctx.recipe.data.calibration, window=protocol["window"], max_windows=protocol["windows"]
            )
            by_source = importance.collect_by_source(model, groups)
            texts = [text for (text, _), group in zip(mixture(ctx.recipe.data.calibration), groups) if group]
            source_windows = {text: st.windows for text, st in zip(texts, by_source)}
        imp = importance.scores(
            space.geometry,
            importance.weight_norms(model),
            stats,
            p.metric,
            sources=by_source,
            combine="pooled" if by_source is None else p.importance_sources,
        )
        skip = -(-protocol["windows"] * protocol["window"] // p.fitness_window)  # after the statistics' tokens
        per_source = calibration_sources(
            tok,
            ctx.recipe.data.calibration,
            window=p.fitness_window,
            max_windows=p.fitness_windows or max(4, len(mixture(ctx.recipe.data.calibration))),
            skip=skip,
            spread=True,
        )
        fit_windows = [w for group in per_source for w in group]
        labels = [text for (text, _), group in zip(mixture(ctx.recipe.data.calibration), per_source) for _ in group]
        grams = None
        if p.reform_in_fitness:  # Gram matrices are too large to cache (hundreds of MB): recollect
            cal = _calibration(ctx, tok, protocol["windows"], protocol["window"])
            grams = importance.collect(model, cal, gram=True).grams()
        fitness = search.PerplexityFitness(
            model, fit_windows, grams=grams, damp=p.damp, sources=labels, aggregate=p.fitness
        )
        seeds = (
            [baselines.flap(model, space, budget, stats, bias_compensation=False).subnet] if p.seed_with_flap else []
        )
        holdout = None
        if p.holdout_windows:
            from accelc.data import load_text, text_windows

            text = ctx.recipe.data.evaluation
            held = text_windows(
                tok,
                load_text(text),
                window=p.fitness_window,
                max_windows=p.holdout_windows,
                text_name=text,
                spread=True,
            )
            holdout = fitness.on(held)
        results = []
        for restart in range(p.restarts):
            settings = search.SearchSettings(
                generations=p.generations,
                population=p.population,
                parents=p.parents,
                mutations=p.mutations,
                crossovers=p.crossovers,
                m_prob=p.m_prob,
                alpha=p.alpha,
                seed=p.seed + restart,
            )
            if p.restarts > 1:
                progress.status(f"search {restart + 1}/{p.restarts} (seed {settings.seed})")
            results.append(search.search(space, budget, imp, fitness, settings, seeds=seeds, holdout=holdout))
        finalists, selection = self._select(ctx, tok, fitness, fit_windows, results)
        chosen = finalists[0]
        result = results[chosen["restart"]]
        log = ctx.workdir / "search_log.json"
        log.write_text(
            json.dumps(
                {
                    "best": chosen["subnet"].to_json(),
                    "best_fitness": chosen["fitness"],
                    "history": result.history,
                    "log": [{**rec, "seed": r.settings["seed"]} for r in results for rec in r.log],
                    "settings": result.settings,
                    "budget": result.budget,
                    "seconds": sum(r.seconds for r in results),
                    "fitness": {
                        "windows": len(fit_windows),
                        "window": p.fitness_window,
                        **_mixture_record(ctx, tok, len(fit_windows)),
                        "spread": True,
                        "aggregate": p.fitness,
                        "dense_by_source": fitness.dense,
                        "reform_in_fitness": p.reform_in_fitness,
                    },
                    **(
                        {"importance": {"sources": p.importance_sources, "windows_by_source": source_windows}}
                        if by_source is not None
                        else {}  # the default's log as it was
                    ),
                    "holdout": {"text": ctx.recipe.data.evaluation, "windows": len(held)} if holdout else None,
                    "restarts": [
                        {
                            "seed": r.settings["seed"],
                            "best_fitness": r.best_fitness,
                            "best_key": r.best.key,
                            "history": r.history,
                            "seconds": r.seconds,
                        }
                        for r in results
                    ],
                    "selection": selection,
                    "finalists": [{**f, "subnet": f["subnet"].to_json()} for f in finalists],
                },
                default=str,
            )
        )
        search.plot(
            result,
            ctx.workdir / "search.png",
            title=f"architecture search: {result.budget['kind']}, {len(result.log)} candidates",
        )
        out = _subnet_out(
            bundle,
            ctx,
            chosen["subnet"],
            space,
            budget,
            self.name,
            best_fitness=chosen["fitness"],
            selection_score=chosen.get("selection"),
            evaluations=sum(len(r.log) for r in results),
            seconds=sum(r.seconds for r in results),
        )
        return out.evolve(reports={**out.reports, "search_log.json": log, "search.png": ctx.workdir / "search.png"})

    def _select(self, ctx, tok, fitness, fit_windows, results) -> tuple[list[dict], dict | None]:
        """The searches' final archives pooled (one entry per distinct subnet), chosen-first: by their
        score on the selection windows when select_windows is set, else by fitness (ties by key)."""
        from accelc.data import calibration_sources, mixture

        p = self.params
        finalists: dict[str, dict] = {}
        for restart, r in enumerate(results):
            for subnet, value in r.finalists:
                finalists.setdefault(
                    subnet.key,
                    {
                        "key": subnet.key,
                        "seed": r.settings["seed"],
                        "restart": restart,
                        "fitness": value,
                        "subnet": subnet,
                    },
                )
        pool = list(finalists.values())
        if not p.select_windows:
            return sorted(pool, key=lambda f: (f["fitness"], f["key"])), None
        fitted = {w.tobytes() for w in fit_windows}
        per_source = calibration_sources(
            tok,
            ctx.recipe.data.calibration,
            window=p.fitness_window,
            max_windows=p.select_windows,
            skip=p.select_skip,
            spread=True,
        )
        sources = mixture(ctx.recipe.data.calibration)
        kept = [[w for w in group if w.tobytes() not in fitted] for group in per_source]
        windows = [w for group in kept for w in group]
        labels = [text for (text, _), group in zip(sources, kept) for _ in group]
        if not windows:
            raise UsageError(
                f"arch_search select_windows: no calibration window is left after skipping {p.select_skip} "
                "and the fitness windows; lower select_skip"
            )
        rescore = fitness.on(windows, labels)
        progress.status(f"selection: {len(pool)} finalists rescored on {len(windows)} held-out calibration windows")
        for f in pool:
            f["selection"] = float(rescore(f["subnet"]))
        selection = {
            "windows": len(windows),
            "window": p.fitness_window,
            "skip": p.select_skip,
            "by_source": {text: len(group) for (text, _), group in zip(sources, kept)},
        }
        return sorted(pool, key=lambda f: (f["selection"], f["key"])), selection


class _Baseline(registry.Pass):
    """A structured-pruning baseline under the same budget, space and calibration data as the search."""

    consumes = (STATS,)
    produces = (SUBNET,)
    drops = (CONSUMERS,)  # weights reformed for an earlier subnet do not fit this one
    uses_stats: bool = True

    def prune(self, model, space, budget, stats):
        raise NotImplementedError

    def run(self, bundle, ctx):
        model, _ = _dense_model(bundle, self.name)
        stats = _stats(bundle, model, self.name)[0] if self.uses_stats else None
        space, budget = _space_and_budget(self.params, model)
        result = self.prune(model, space, budget, stats)
        return _subnet_out(bundle, ctx, result.subnet, space, budget, self.name, result.overrides)


@registry.register_pass
class MagnitudePrune(_Baseline):
    """Uniform structured pruning by weight L2 norm (no calibration data)."""

    name = "magnitude_prune"
    consumes = ()
    uses_stats = False
    Params = UniformParams

    def prune(self, model, space, budget, stats):
        from accelc.compiler.pruning import baselines

        return baselines.magnitude(model, space, budget, prune_attention=self.params.prune_attention)


@registry.register_pass
class WandaSP(_Baseline):
    """Wanda-sp: uniform structured pruning by |W| x ||x|| (needs the importance pass)."""

    name = "wanda_sp"
    Params = UniformParams

    def prune(self, model, space, budget, stats):
        from accelc.compiler.pruning import baselines

        return baselines.wanda_sp(model, space, budget, stats, prune_attention=self.params.prune_attention)


@registry.register_pass
class Flap(_Baseline):
    """FLAP: fluctuation metric, adaptive structure, bias compensation (needs the importance pass)."""

    name = "flap"

    class Params(SubnetParams):
        bias_compensation: bool = Field(True, description="fold the removed channels' mean output into a bias")

    @classmethod
    def flow(cls, params):
        # bias compensation replaces the consumers' weights (a bias on o_proj/down_proj)
        return cls.consumes, cls.produces + ((CONSUMERS,) if params.bias_compensation else ()), cls.drops

    def prune(self, model, space, budget, stats):
        from accelc.compiler.pruning import baselines

        return baselines.flap(model, space, budget, stats, bias_compensation=self.params.bias_compensation)


@registry.register_pass
class Reform(registry.Pass):
    """Rectify the kept o_proj/down_proj weights with the omitted ones, layer by layer (least squares)."""

    name = "reform"
    reads = ("data.calibration",)
    consumes = (SUBNET,)
    produces = (CONSUMERS,)

    class Params(registry.Params):
        method: Literal["closed_form", "admm"] = Field(
            "closed_form", description="closed form for column masks (exact); ADMM for general masks"
        )
        damp: float = Field(0.2, gt=0, description="ridge toward the inherited weights, x mean(diag H)")
        # 128, not 32: lower on every held-out text at 20% and 10% removed, and on the worst
        # (Opticks) by more than 64 windows' (1.489x -> 1.475x -> 1.469x; 1.208x -> 1.203x ->
        # 1.197x; 128 vs 64 there: 4-6 standard errors of the paired difference; docs/pruning.md,
        # session 16), at about 3x the reformation time of 32 and inputs held for all windows
        # (SmolLM2: 128 x 512 x 1536 floats at down_proj, 0.4 GB); a stronger ridge does not help,
        # nor an intercept, a ridge chosen per layer or the dense model's outputs as the target
        windows: int = Field(128, ge=1, description="calibration windows from data.calibration")
        window: int = Field(512, ge=8)
        rho: float | None = Field(None, gt=0, description="ADMM penalty (default: from the Gram spectrum)")
        iters: int = Field(20, ge=1, description="ADMM iterations")

    def run(self, bundle, ctx):
        from accelc.compiler.pruning import reform

        p = self.params
        model, tok = _dense_model(bundle, self.name)
        subnet, _ = load_subnet(bundle.intermediate(SUBNET, self.name, "arch_search or a baseline pass"))
        wins = _calibration(ctx, tok, p.windows, p.window)
        result = reform.reform(model, subnet, wins, method=p.method, damp=p.damp, rho=p.rho, iters=p.iters)
        path = ctx.workdir / "consumer_weights.safetensors"
        reform.save_overrides(result.overrides, path)
        report = ctx.workdir / "reform.json"
        report.write_text(
            json.dumps(
                {
                    "method": p.method,
                    "damp": p.damp,
                    "windows": len(wins),
                    "window": p.window,
                    **_mixture_record(ctx, tok, len(wins)),
                    "layers": result.report,
                },
                default=float,
            )
        )
        worse = [r for r in result.report if r["err_reformed"] > r["err_masked"] * (1 + 1e-6)]
        if worse:
            progress.status(f"warning: reformation raised the calibration error of {len(worse)} module(s)")
        return bundle.evolve(
            intermediates={**bundle.intermediates, CONSUMERS: path}, reports={**bundle.reports, "reform.json": report}
        )


@registry.register_pass
class Materialize(registry.Pass):
    """Physically smaller checkpoint: sliced Linears with per-layer head counts and MLP widths."""

    name = "materialize"
    consumes = (SUBNET,)  # and the reformed consumer weights, when a pass left them
    drops = (STATS, SUBNET, CONSUMERS)  # they describe the dense model, which this replaces

    def run(self, bundle, ctx):
        from accelc.compiler.pruning import materialize, reform

        model, _ = _dense_model(bundle, self.name)
        subnet, info = load_subnet(bundle.intermediate(SUBNET, self.name, "arch_search or a baseline pass"))
        consumers = bundle.intermediates.get(CONSUMERS)
        small = materialize.shrink(model, subnet, reform.load_overrides(consumers) if consumers else None)
        out = materialize.save(small, ctx.workdir / "model", source_dir=bundle.model_dir, subnet=subnet)
        total = sum(p.numel() for p in small.parameters())
        report = ctx.workdir / "pruned_model.json"
        report.write_text(
            json.dumps(
                {
                    **info,
                    "reformed": consumers is not None,
                    "params_total": total,
                    "dense_params_total": sum(p.numel() for p in model.parameters()),
                    "widths": materialize.widths(small),
                },
                indent=2,
                default=str,
            )
        )
        return bundle.evolve(model_dir=out, intermediates={}, reports={**bundle.reports, "pruned_model.json": report})
