"""Evolutionary search for a subnet under a budget (Shen et al., arXiv 2409.17372).

A candidate is a Subnet (explicit kept heads and MLP channels per layer, masks.py). Its *shape*
(per layer: head option, MLP width) decides its cost; its index sets decide its quality. The loop
is the released code's AutoFormer-style one with the paper's mask mutation:

    cands  = given seeds + the adaptive seed (FLAP's allocation from the importance z-scores)
             + uniform seeds (one per head option: the widest uniform MLP width that fits)
             + importance-aware random candidates around the adaptive allocation, P in all
    for gen in 1..G:
        evaluate every new candidate once (memo by content hash); fitness = perplexity on a small
        calibration slice, or its worst source's ratio to dense (lower is better)
        archive = best K of archive + cands                     (elitist: best never worsens)
        cands   = M mutations of archive members + C uniform crossovers of two members
                  + (P - M - C) fresh importance-aware random candidates

Operators (every candidate meets the budget before it is evaluated; `repair` makes it so):

  random     per layer, the adaptive seed's head count and MLP width times exp(sigma eps) (heads
             by randomised rounding between options); masks = the top-k channels/heads by
             importance ("importance-aware initialisation", 1(b).2).
  mutation   each layer's MLP width moves by 1..width_steps multiples with probability m_prob, its
             head option by one step with probability m_prob; then repair. Every layer whose size
             changed, and with probability m_prob any other layer, gets a new kept set that
             inherits ceil(alpha * min(|parent|, |child|)) of the parent's kept set, chosen
             uniformly, and fills the rest from all other indices by importance-weighted sampling
             without replacement (Gumbel top-k on log-scores at `fill_temperature`; "uniform"
             fills uniformly). So |child & parent| >= ceil(alpha * min(|parent|, |child|)): when
             the child is at least as wide, it keeps >= alpha of the parent's kept set. This
             samples the overlap directly instead of the paper's rejection loop (which conditions
             on overlap >= alpha N; here exactly the bound is forced and the fill may add more).
             For heads the bound is applied per KV group (per kept group in gqa="group").
  crossover  each layer (shape and masks together) from either parent with probability 1/2;
             then repair.
  repair     while over the limit: shrink a random layer's MLP by 1..width_steps multiples
             (or, with probability attn_prob, its heads by one option); while under the floor:
             grow a random layer by one multiple (or heads, if that does not overshoot). Repair
             acts on shapes; kept sets follow: a mutation re-samples them with the alpha bound,
             a crossover drops the least important members or adds the most important ones.

Determinism: one numpy Generator seeded from `seed` drives every choice; ties in fitness are
broken by the candidate hash, so a fixed seed and a deterministic fitness give the same result.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from accelc import progress
from accelc.compiler.pruning.importance import Importance
from accelc.compiler.pruning.masks import Budget, LayerMask, SearchSpace, Subnet, check_feasible
from accelc.errors import InternalError, UsageError

FILLS = ("importance", "uniform")
# repair gives up after this many single-layer steps per (layer x width) gene: far more than any
# feasible shape needs (a failing repair means the budget window is too narrow to hit)
REPAIR_STEPS_PER_GENE = 20
# scores are floored here before the log of importance-weighted filling (dead channels score 0)
SCORE_FLOOR = 1e-30


@dataclass(frozen=True)
class SearchSettings:
    """Search hyper-parameters. The released code's LLaMA-7B run uses G=30, P=500, K=300, M=350,
    C=100, m_prob=0.2; its argparse defaults are 20/50/10/25/25. These defaults (192
    evaluations) took 560-660 s for SmolLM2-135M on 2 shared CPU cores with a fitness of 2 x 512
    tokens and one-shot reformation."""

    generations: int = 8
    population: int = 24  # candidates per generation (P)
    parents: int = 8  # elitist archive size (K, "select_num")
    mutations: int = 12  # mutation offspring per generation (M)
    crossovers: int = 6  # crossover offspring per generation (C)
    m_prob: float = 0.2  # per-layer gene mutation probability (released code: 0.2)
    alpha: float = 0.9  # kept-set overlap bound of a mutation (paper's similarity ratio)
    width_steps: int = 4  # a width move is 1..width_steps multiples of the space's multiple
    init_spread: float = 0.15  # sigma of log per-layer keep ratio in random candidates
    attn_prob: float = 0.25  # probability that a repair step resizes heads instead of the MLP
    fill: str = "importance"  # how a mutation fills the non-inherited part of a kept set
    fill_temperature: float = 1.0
    seed: int = 0
    max_tries: int = 10  # attempts per wanted offspring (released code: 10x the quota)

    def check(self) -> None:
        if self.generations < 1 or self.population < 1 or self.parents < 1:
            raise UsageError("search needs generations, population and parents >= 1")
        if self.mutations < 0 or self.crossovers < 0 or self.mutations + self.crossovers > self.population:
            raise UsageError(
                f"mutations + crossovers ({self.mutations} + {self.crossovers}) must not "
                f"exceed the population ({self.population})"
            )
        for name in ("m_prob", "alpha", "attn_prob"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise UsageError(f"search {name} must be in [0, 1], got {v}")
        if self.fill not in FILLS:
            raise UsageError(f"search fill must be one of {', '.join(FILLS)}, got '{self.fill}'")
        if self.width_steps < 1 or self.fill_temperature <= 0:
            raise UsageError("search width_steps must be >= 1 and fill_temperature > 0")


@dataclass
class SearchResult:
    best: Subnet
    best_fitness: float
    finalists: list = field(default_factory=list)  # the final archive: (subnet, fitness), best first
    log: list = field(default_factory=list)  # one dict per evaluated candidate
    history: list = field(default_factory=list)  # one dict per generation
    settings: dict = field(default_factory=dict)
    budget: dict = field(default_factory=dict)
    seconds: float = 0.0


# --------------------------------------------------------------------------- the searcher


class Searcher:
    """Operators and state of one search (space, budget, importance, rng)."""

    def __init__(self, space: SearchSpace, budget: Budget, importance: Importance, settings: SearchSettings):
        settings.check()
        check_feasible(space, budget)
        self.space, self.budget, self.imp, self.s = space, budget, importance, settings
        self.rng = np.random.default_rng(settings.seed)
        self.L = space.geometry.num_layers
        from accelc.compiler.pruning.baselines import adaptive_subnet, standardised

        # the importance-aware centre of random candidates: FLAP's adaptive allocation of heads
        # and MLP channels across layers, computed from this search's importance scores (or the
        # scores it names for the allocation)
        alloc = importance if importance.allocation is None else importance.allocation
        self.adaptive = adaptive_subnet(space, budget, *standardised(space.geometry, alloc))
        self.center = self._shape_of(self.adaptive)

    # ---------------------------------------------------------------- shapes
    def _cost(self, shape) -> float:
        sp = self.space
        return self.budget.cost(tuple(sp.option_shape(o, w) for o, w in shape))

    def _step_width(self, w: int, steps: int) -> int:
        ws = self.space.widths
        i = int(np.searchsorted(ws, w))
        return ws[min(max(i + steps, 0), len(ws) - 1)]

    def repair(self, shape: list[list[int]]) -> list[list[int]] | None:
        """Move a shape into [floor, limit] with random one-layer steps; None if it cannot."""
        shape = [list(x) for x in shape]
        sp, s, rng = self.space, self.s, self.rng
        n_opt = len(sp.head_options)
        cost = self._cost(shape)
        for _ in range(REPAIR_STEPS_PER_GENE * self.L * len(sp.widths)):
            if cost > self.budget.limit:
                layer = int(rng.integers(self.L))
                if rng.random() < s.attn_prob and shape[layer][0] > 0:
                    shape[layer][0] -= 1
                else:
                    shape[layer][1] = self._step_width(shape[layer][1], -int(rng.integers(1, s.width_steps + 1)))
            elif cost < self.budget.floor:
                layer = int(rng.integers(self.L))
                trial = [list(x) for x in shape]
                if rng.random() < s.attn_prob and trial[layer][0] < n_opt - 1:
                    trial[layer][0] += 1
                else:
                    trial[layer][1] = self._step_width(trial[layer][1], 1)
                if self._cost(trial) <= self.budget.limit:
                    shape = trial
                elif all(x[1] == sp.widths[-1] for x in shape):
                    return None
            else:
                return shape
            cost = self._cost(shape)
        return None

    # ---------------------------------------------------------------- kept sets
    def _fill(self, n: int, exclude: set, scores: np.ndarray) -> list[int]:
        """n indices not in `exclude`: importance-weighted without replacement, or uniform."""
        if n <= 0:
            return []
        pool = np.setdiff1d(np.arange(len(scores)), np.fromiter(exclude, dtype=np.int64, count=len(exclude)))
        if self.s.fill == "uniform":
            return [int(i) for i in self.rng.choice(pool, size=n, replace=False)]
        logits = np.log(np.maximum(scores[pool], SCORE_FLOOR)) / self.s.fill_temperature
        keys = logits + self.rng.gumbel(size=len(pool))  # Gumbel top-k = sampling w/o replacement
        return [int(pool[i]) for i in np.argsort(-keys, kind="stable")[:n]]

    def _inherit(self, parent: list[int], k: int, scores: np.ndarray) -> list[int]:
        """A k-set keeping ceil(alpha * min(|parent|, k)) random members of `parent`."""
        c = min(math.ceil(self.s.alpha * min(len(parent), k) - 1e-9), len(parent), k)
        kept = [int(i) for i in self.rng.choice(np.asarray(parent, dtype=np.int64), size=c, replace=False)] if c else []
        return sorted(kept + self._fill(k - c, set(kept), scores))

    @staticmethod
    def _resize(current: list[int], k: int, scores: np.ndarray) -> list[int]:
        """Drop the least important members, or add the most important non-members."""
        current = sorted(current, key=lambda i: (-scores[i], i))
        if k <= len(current):
            return sorted(current[:k])
        members = set(current)
        rest = [int(i) for i in np.argsort(-scores, kind="stable") if i not in members]
        return sorted(current + rest[: k - len(current)])

    def _groups(self, heads) -> dict[int, list[int]]:
        G = self.space.geometry.group_size
        out: dict[int, list[int]] = {}
        for h in heads:
            out.setdefault(h // G, []).append(h)
        return out

    def _heads(self, layer: int, option: int, parent: tuple[int, ...] | None, mode: str) -> tuple[int, ...]:
        """Kept heads for `option`: top-k ('top'), resized from parent ('resize'), or inherited
        with the alpha bound per group ('inherit')."""
        sp, g = self.space, self.space.geometry
        scores = self.imp.head[layer]
        if parent is None or mode == "top":
            return sp.select_heads(option, scores)
        groups, per_group = sp.head_options[option]
        G = g.group_size
        by_group = self._groups(parent)
        if sp.gqa == "query":  # every group kept: act per group on its r heads
            heads = []
            for k in range(g.num_kv_heads):
                local = [h - k * G for h in by_group.get(k, [])]
                sc = scores[k * G : (k + 1) * G]
                pick = self._inherit(local, per_group, sc) if mode == "inherit" else self._resize(local, per_group, sc)
                heads += [k * G + j for j in pick]
            return tuple(sorted(heads))
        group_scores = scores.reshape(g.num_kv_heads, G).sum(axis=1)
        kept = sorted(by_group)
        pick = (
            self._inherit(kept, groups, group_scores) if mode == "inherit" else self._resize(kept, groups, group_scores)
        )
        return tuple(sorted(k * G + j for k in pick for j in range(G)))

    def _build(self, shape, parents: list[LayerMask | None], modes: list[str]) -> Subnet:
        layers = []
        for i, ((option, width), parent, mode) in enumerate(zip(shape, parents, modes)):
            heads = self._heads(i, option, parent.heads if parent else None, mode)
            ch_scores = self.imp.channel[i]
            if parent is None or mode == "top":
                channels = self.space.select_channels(width, ch_scores)
            elif mode == "inherit":
                channels = tuple(self._inherit(list(parent.channels), width, ch_scores))
            elif mode == "resize":
                channels = tuple(self._resize(list(parent.channels), width, ch_scores))
            else:  # "keep"
                channels = parent.channels
            layers.append(LayerMask(heads, channels))
        return Subnet(tuple(layers))

    def _shape_of(self, subnet: Subnet) -> list[list[int]]:
        return [[self.space.head_option_index(m), len(m.channels)] for m in subnet.layers]

    # ---------------------------------------------------------------- operators
    def uniforms(self) -> list[Subnet]:
        """Uniform seeds: for every head option, the widest uniform MLP width within the limit
        (top-k masks), moved into the budget window. The elitist archive then guarantees the
        search ends at least as fit as the best uniform subnet (MLP-only pruning included)."""
        sp, out = self.space, []
        for option in reversed(range(len(sp.head_options))):
            fitting = [w for w in sp.widths if self._cost([[option, w]] * self.L) <= self.budget.limit]
            if not fitting:
                continue
            shape = self.repair([[option, fitting[-1]] for _ in range(self.L)])
            if shape is not None:
                out.append(self._build(shape, [None] * self.L, ["top"] * self.L))
        return out

    def random(self) -> Subnet | None:
        """Per layer, the adaptive allocation's head count and MLP width times exp(sigma eps)
        (heads by randomised rounding between neighbouring options); top-k masks; repaired."""
        sp, rng = self.space, self.rng
        n_q = np.array([gr * r for gr, r in sp.head_options], dtype=float)
        shape = []
        for option, width in self.center:
            want = min(n_q[option] * math.exp(self.s.init_spread * rng.standard_normal()), n_q[-1])
            hi = int(np.searchsorted(n_q, want))
            if hi == 0:
                new_option = 0
            elif hi >= len(n_q):
                new_option = len(n_q) - 1
            else:
                frac = (want - n_q[hi - 1]) / (n_q[hi] - n_q[hi - 1])
                new_option = hi if rng.random() < frac else hi - 1
            w = min(width * math.exp(self.s.init_spread * rng.standard_normal()), sp.widths[-1])
            shape.append([new_option, sp.snap_width(w)])
        shape = self.repair(shape)
        return None if shape is None else self._build(shape, [None] * self.L, ["top"] * self.L)

    def fit(self, subnet: Subnet) -> Subnet | None:
        """A given subnet moved into the budget window (shape repaired, sets resized)."""
        self.space.check(subnet)
        if self.budget.meets(self.space.shape(subnet)):
            return subnet
        shape = self.repair(self._shape_of(subnet))
        return None if shape is None else self._build(shape, list(subnet.layers), ["resize"] * self.L)

    def mutate(self, parent: Subnet) -> Subnet | None:
        s, rng, n_opt = self.s, self.rng, len(self.space.head_options)
        before = self._shape_of(parent)
        shape = [list(x) for x in before]
        for layer in shape:
            if rng.random() < s.m_prob:
                steps = int(rng.integers(1, s.width_steps + 1)) * (1 if rng.random() < 0.5 else -1)
                layer[1] = self._step_width(layer[1], steps)
            if rng.random() < s.m_prob and n_opt > 1:
                layer[0] = int(min(max(layer[0] + (1 if rng.random() < 0.5 else -1), 0), n_opt - 1))
        shape = self.repair(shape)
        if shape is None:
            return None
        layers = []
        for i, ((option, width), (p_opt, p_width), p) in enumerate(zip(shape, before, parent.layers)):
            new_heads = option != p_opt or rng.random() < s.m_prob
            new_channels = width != p_width or rng.random() < s.m_prob
            heads = self._heads(i, option, p.heads, "inherit") if new_heads else p.heads
            channels = (
                tuple(self._inherit(list(p.channels), width, self.imp.channel[i])) if new_channels else p.channels
            )
            layers.append(LayerMask(heads, channels))
        return Subnet(tuple(layers))

    def crossover(self, a: Subnet, b: Subnet) -> Subnet | None:
        picks = [a.layers[i] if self.rng.random() < 0.5 else b.layers[i] for i in range(self.L)]
        child = Subnet(tuple(picks))
        shape = self.repair(self._shape_of(child))
        if shape is None:
            return None
        return self._build(shape, picks, ["resize"] * self.L)


# --------------------------------------------------------------------------- the loop


def search(
    space: SearchSpace,
    budget: Budget,
    importance: Importance,
    fitness,
    settings: SearchSettings = SearchSettings(),
    *,
    seeds=(),
    holdout=None,
    show_progress: bool = True,
) -> SearchResult:
    """Run the evolutionary search; `fitness(subnet) -> float` is minimised (perplexity).

    `seeds`: extra subnets for the first generation (e.g. a baseline's), fitted to the budget.
    `holdout(subnet) -> float`: scored on each generation's best (never used to select), so the
    history shows whether what the fitness rewards holds on text the search never saw.
    """
    start = time.perf_counter()
    sr = Searcher(space, budget, importance, settings)
    s, rng = settings, sr.rng
    memo: dict[str, dict] = {}
    subnets: dict[str, Subnet] = {}
    log: list[dict] = []
    history: list[dict] = []
    archive: list[str] = []

    def propose(make, wanted: int, origin: str, taken: set) -> list[tuple[Subnet, str]]:
        out = []
        for _ in range(s.max_tries * max(wanted, 1)):
            if len(out) >= wanted:
                break
            cand = make()
            if cand is None or cand.key in memo or cand.key in taken:
                continue
            taken.add(cand.key)
            out.append((cand, origin))
        return out

    taken: set = set()
    cands = []
    starts = [(x, "seed") for x in seeds] + [(sr.adaptive, "adaptive")] + [(x, "uniform") for x in sr.uniforms()]
    for start_subnet, origin in starts:
        start_subnet = sr.fit(start_subnet)
        if start_subnet is not None and start_subnet.key not in taken and len(cands) < s.population:
            taken.add(start_subnet.key)
            cands.append((start_subnet, origin))
    cands += propose(sr.random, s.population - len(cands), "random", taken)
    if not cands:
        raise UsageError(
            "the search could not build any subnet that meets the budget "
            f"({budget.describe()}); widen the budget window (slack)"
        )
    bar = progress.bar(
        total=s.generations, desc="architecture search", unit="gen", **({} if show_progress else {"disable": True})
    )
    for gen in range(s.generations):
        t0 = time.perf_counter()
        for cand, origin in cands:
            shape = space.shape(cand)
            space.check(cand)
            if not budget.meets(shape):
                raise InternalError(f"search candidate {cand.key} misses the budget it was built for")
            e0 = time.perf_counter()
            value = float(fitness(cand))
            count = space.count(shape)
            rec = {
                "generation": gen,
                "origin": origin,
                "key": cand.key,
                "cost": budget.cost(shape),
                "params_prunable": count.prunable,
                "params_total": count.total,
                "removed_ratio": count.removed_ratio,
                "fitness": value,
                "seconds": time.perf_counter() - e0,
                "heads": [q for q, _, _ in shape],
                "widths": [w for _, _, w in shape],
            }
            memo[cand.key] = rec
            subnets[cand.key] = cand
            log.append(rec)
        pool = sorted(set(archive) | {c.key for c, _ in cands}, key=lambda k: (_finite(memo[k]["fitness"]), k))
        archive = pool[: s.parents]
        best = memo[archive[0]]
        if holdout is not None and "holdout" not in best:
            best["holdout"] = float(holdout(subnets[archive[0]]))
        gen_values = [memo[c.key]["fitness"] for c, _ in cands]
        history.append(
            {
                "generation": gen,
                "evaluated": len(cands),
                "best_fitness": best["fitness"],
                "best_key": best["key"],
                "best_holdout": best.get("holdout"),
                "generation_best": float(np.min(gen_values)),
                "generation_median": float(np.median(gen_values)),
                "evaluations": len(memo),
                "seconds": time.perf_counter() - t0,
            }
        )
        bar.update(1)
        progress.status(
            f"search gen {gen + 1}/{s.generations}: best {best['fitness']:.4g} "
            f"({best['removed_ratio']:.1%} removed), this generation best "
            f"{history[-1]['generation_best']:.4g} median {history[-1]['generation_median']:.4g}"
            + (f", best on held-out text {best['holdout']:.4g}" if "holdout" in best else "")
            + ", "
            f"{len(cands)} evaluated ({len(memo)} total) in {history[-1]['seconds']:.0f}s"
        )
        if gen == s.generations - 1:
            break
        taken = set()
        parents = [subnets[k] for k in archive]
        cands = propose(lambda: sr.mutate(parents[int(rng.integers(len(parents)))]), s.mutations, "mutation", taken)
        cands += propose(
            lambda: sr.crossover(parents[int(rng.integers(len(parents)))], parents[int(rng.integers(len(parents)))]),
            s.crossovers,
            "crossover",
            taken,
        )
        cands += propose(sr.random, s.population - len(cands), "random", taken)
    bar.close()
    best_key = archive[0]
    return SearchResult(
        best=subnets[best_key],
        best_fitness=memo[best_key]["fitness"],
        finalists=[(subnets[k], memo[k]["fitness"]) for k in archive],
        log=log,
        history=history,
        settings=asdict(settings),
        budget=budget.describe(),
        seconds=time.perf_counter() - start,
    )


def _finite(x: float) -> float:
    return x if math.isfinite(x) else math.inf


# --------------------------------------------------------------------------- fitness


# Reformed layers kept for reuse by offspring (each 0.3-3 MB for SmolLM2): about 2.5 archives.
CACHE_ENTRIES = 512


class _LRU(dict):
    """A dict that forgets its least recently used entry beyond `size` entries."""

    def __init__(self, size: int):
        super().__init__()
        self.size = size

    def __getitem__(self, key):
        value = super().pop(key)
        super().__setitem__(key, value)  # move to the end: most recently used
        return value

    def __setitem__(self, key, value):
        super().pop(key, None)
        super().__setitem__(key, value)
        while len(self) > self.size:
            super().pop(next(iter(self)))


# "pooled": perplexity over all fitness windows together. "worst_source": the largest ratio of a
# source's perplexity to the dense model's on the same windows (minimax over calibration domains).
# The mean over sources of log(ratio) is not offered: with the same tokens from every source it
# equals the pooled log-perplexity minus a constant, so it ranks candidates exactly as "pooled" does.
AGGREGATES = ("pooled", "worst_source")


class PerplexityFitness:
    """Perplexity of the shrunk subnet on a few calibration windows (each scores window-1 tokens).

    With `grams` ({(layer, "o_proj"|"down_proj"): H} of the dense model, importance.collect with
    gram=True) every candidate is first given a one-shot closed-form reformation, so the search
    ranks masks by what they are worth after reformation.

    `sources` labels each window with its calibration source; with aggregate="worst_source" the
    value is max over sources of ppl_source(subnet) / ppl_source(dense), so a mask that is good
    on average but poor on the source least like the others ranks by that source.
    """

    def __init__(
        self,
        model,
        windows,
        *,
        grams: dict | None = None,
        damp: float | None = None,
        cache_entries: int = CACHE_ENTRIES,
        sources: list[str] | None = None,
        aggregate: str = "pooled",
    ):
        from accelc.compiler.pruning.reform import DEFAULT_DAMP

        damp = DEFAULT_DAMP if damp is None else damp
        self.cache = _LRU(cache_entries)
        if not windows:
            raise UsageError("fitness needs at least one calibration window")
        if aggregate not in AGGREGATES:
            raise UsageError(f"fitness aggregate must be one of {', '.join(AGGREGATES)}, got '{aggregate}'")
        sources = ["calibration"] * len(windows) if sources is None else list(sources)
        if len(sources) != len(windows):
            raise InternalError(f"{len(sources)} source labels for {len(windows)} fitness windows")
        self.model, self.windows, self.grams, self.damp = model, windows, grams, damp
        self.sources, self.aggregate = sources, aggregate
        self.dense = self.perplexities(model) if aggregate == "worst_source" else None

    def on(self, windows, sources: list[str] | None = None) -> PerplexityFitness:
        """The same fitness on other windows (a held-out text, or other windows of the calibration
        sources labelled by `sources`), sharing the reformed-layer cache."""
        other = PerplexityFitness(
            self.model,
            windows,
            grams=self.grams,
            damp=self.damp,
            cache_entries=0,
            sources=sources,
            aggregate=self.aggregate,
        )
        other.cache = self.cache
        return other

    def perplexities(self, model) -> dict[str, float]:
        """Perplexity of a torch model on each source's windows ({"pooled": one perplexity over
        all windows} for the pooled fitness)."""
        import torch

        nll: dict[str, float] = {}
        tokens: dict[str, int] = {}
        with torch.inference_mode():
            for win, source in zip(self.windows, self.sources):
                ids = torch.as_tensor(np.asarray(win, dtype=np.int64)).unsqueeze(0)
                logits = model(input_ids=ids, use_cache=False).logits[0, :-1].float()
                nll[source] = nll.get(source, 0.0) + float(
                    torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum")
                )
                tokens[source] = tokens.get(source, 0) + ids.shape[1] - 1
        if self.aggregate == "pooled":
            return {"pooled": math.exp(sum(nll.values()) / sum(tokens.values()))}
        return {source: math.exp(nll[source] / tokens[source]) for source in nll}

    def __call__(self, subnet: Subnet) -> float:
        from accelc.compiler.pruning.materialize import shrink
        from accelc.compiler.pruning.reform import oneshot

        overrides = oneshot(self.model, subnet, self.grams, damp=self.damp, cache=self.cache) if self.grams else None
        ppl = self.perplexities(shrink(self.model, subnet, overrides))
        if self.aggregate == "pooled":
            return ppl["pooled"]
        return max(ppl[source] / self.dense[source] for source in ppl)


# --------------------------------------------------------------------------- plot


def plot(result: SearchResult | list, path, *, title: str = "architecture search") -> None:
    """PNG: fitness of every candidate per generation with the best so far, and cost vs fitness
    (the budget/fitness front: candidates no other beats in both)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    log = result.log if isinstance(result, SearchResult) else result
    if not log:
        raise ValueError("empty search log")
    gens = np.array([r["generation"] for r in log])
    fit = np.array([r["fitness"] for r in log])
    total = np.array([r["params_total"] for r in log]) / 1e6
    jitter = np.random.default_rng(0).uniform(-0.2, 0.2, len(gens))
    best = np.minimum.accumulate([fit[gens == g].min() for g in range(gens.max() + 1)])
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    origins = sorted({r["origin"] for r in log})
    for o in origins:
        sel = np.array([r["origin"] == o for r in log])
        ax1.scatter(gens[sel] + jitter[sel], fit[sel], s=10, alpha=0.6, label=o)
    ax1.plot(range(len(best)), best, "k-", lw=2, label="best so far")
    history = result.history if isinstance(result, SearchResult) else []
    held = [(h["generation"], h["best_holdout"]) for h in history if h.get("best_holdout") is not None]
    if held:
        ax1.plot(*zip(*held), "r--", lw=2, label="best so far, held-out text")
    ax1.set_xlabel("generation")
    ax1.set_ylabel("perplexity (fitness: calibration windows)")
    ax1.set_yscale("log")
    ax1.legend(fontsize=8)
    sc = ax2.scatter(total, fit, c=gens, s=10, cmap="viridis")
    front_x, front_y, low = [], [], math.inf
    for i in np.argsort(total, kind="stable"):  # cheapest first: keep what beats every cheaper one
        if fit[i] < low:
            low = fit[i]
            front_x.append(total[i])
            front_y.append(fit[i])
    ax2.step(front_x, front_y, "r-", where="post", label="front")
    ax2.set_xlabel("total parameters (M)")
    ax2.set_ylabel("fitness")
    ax2.set_yscale("log")
    ax2.legend(fontsize=8)
    fig.colorbar(sc, ax=ax2, label="generation")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
