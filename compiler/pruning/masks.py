"""The subnet: which attention heads and MLP channels each layer keeps, and what it costs.

A subnet is explicit index sets per layer (more general than the contiguous windows over
importance-sorted channels of Shen et al., arXiv 2409.17372, and needing no permutation): `heads` are the kept query heads and `channels` the kept MLP intermediate channels.
Pruning is structured:

    attention  a removed query head h drops rows h*d:(h+1)*d of q_proj and the same columns of
               o_proj (d = head_dim); a removed KV group g drops its rows of k_proj and v_proj.
    MLP        a removed channel c drops row c of gate_proj and up_proj and column c of down_proj.

GQA. Query head h reads KV head h // G (G = heads per group; SmolLM2: 9 heads, 3 KV heads, G=3).
Hugging Face's attention repeats each KV head `num_key_value_groups` times, consecutively, so a
physically smaller layer needs the same number r of query heads in every KV group it keeps. Two
rule sets, both materialisable (see materialize.py):

    gqa="query" (default)  every KV head is kept; each layer keeps r of the G query heads of every
                           group (1 <= r <= G; which r heads may differ per group). The KV cache
                           keeps one shape [1, kv_heads, P, head_dim] in every layer, which is what
                           the ORT and TVM runtimes, optimum's dummy past inputs and the decode
                           plan assume, so a pruned model exports and runs unchanged.
    gqa="group"            whole KV groups are kept or removed with all their query heads. Saves
                           the K/V projections and KV-cache too, but the KV heads then differ per
                           layer, which those runtimes do not support yet.

Widths are snapped: MLP widths are multiples of `multiple` (GEMM tiles: 8/16/64), head counts are
whole heads (head_dim is already a tile multiple). A subnet's cost depends only on its *shape*
(per layer: query heads, KV heads, MLP width), never on which channels are kept, so budgets are
functions of shapes: `ParamBudget` counts parameters in closed form; a latency budget measured per
layer width on a target can implement the same `Budget` interface.

Parameter counts: "prunable" = the seven projections of every layer (q, k, v, o, gate, up, down,
biases included); "total" = every parameter of the model, tied embeddings counted once.
"""

from __future__ import annotations

import hashlib
import json
import math
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from accelc.errors import UsageError

GQA_MODES = ("query", "group")
# MLP widths snap to this multiple unless a recipe says otherwise: keeps GEMM tiles full on
# AVX-512/AMX and cuBLAS.
DEFAULT_MULTIPLE = 8
# The candidate window below the limit: a search candidate whose cost falls further than this
# fraction of the dense prunable count below the budget wastes capacity and is not evaluated
# (the released code uses a [min, max] parameter window in the same way).
DEFAULT_SLACK = 0.01
ATTN_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJ = ("gate_proj", "up_proj", "down_proj")


# --------------------------------------------------------------------------- geometry


@dataclass(frozen=True)
class Geometry:
    """The prunable structure of a decoder of the Llama architecture (llama, qwen2: same module names)."""

    num_layers: int
    hidden: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate: int
    biased: frozenset  # names of the projections that carry a bias (e.g. qwen2: q, k, v)
    total_params: int  # dense model, every parameter once (tied embeddings once)

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads

    @classmethod
    def from_model(cls, model) -> Geometry:
        cfg = model.config
        layer = model.model.layers[0]
        mods = {**{n: getattr(layer.self_attn, n) for n in ATTN_PROJ}, **{n: getattr(layer.mlp, n) for n in MLP_PROJ}}
        heads = cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        return cls(
            num_layers=cfg.num_hidden_layers,
            hidden=cfg.hidden_size,
            num_heads=heads,
            num_kv_heads=getattr(cfg, "num_key_value_heads", None) or heads,
            head_dim=head_dim,
            intermediate=cfg.intermediate_size,
            biased=frozenset(n for n, m in mods.items() if m.bias is not None),
            total_params=sum(p.numel() for p in model.parameters()),
        )

    def layer_params(self, n_heads: int, n_kv: int, width: int) -> int:
        """Parameters of one layer's seven projections with these widths (biases included)."""
        h, d, b = self.hidden, self.head_dim, self.biased
        q = h * n_heads * d + (n_heads * d if "q_proj" in b else 0)
        kv = 2 * h * n_kv * d + (n_kv * d if "k_proj" in b else 0) + (n_kv * d if "v_proj" in b else 0)
        o = n_heads * d * h + (h if "o_proj" in b else 0)
        mlp = (
            3 * h * width
            + (width if "gate_proj" in b else 0)
            + (width if "up_proj" in b else 0)
            + (h if "down_proj" in b else 0)
        )
        return q + kv + o + mlp

    @property
    def dense_prunable(self) -> int:
        return self.num_layers * self.layer_params(self.num_heads, self.num_kv_heads, self.intermediate)

    @property
    def fixed_params(self) -> int:
        """Embeddings, norms, LM head: never pruned."""
        return self.total_params - self.dense_prunable


# --------------------------------------------------------------------------- subnet


@dataclass(frozen=True)
class LayerMask:
    heads: tuple[int, ...]  # kept query heads, sorted
    channels: tuple[int, ...]  # kept MLP channels, sorted


@dataclass(frozen=True)
class Subnet:
    layers: tuple[LayerMask, ...]

    @property
    def key(self) -> str:
        """A short content hash: the memo key and the name of a candidate in logs."""
        return hashlib.sha1(json.dumps(self.to_json(), separators=(",", ":")).encode()).hexdigest()[:16]

    def to_json(self) -> dict:
        return {"heads": [list(m.heads) for m in self.layers], "channels": [list(m.channels) for m in self.layers]}

    @classmethod
    def from_json(cls, data: dict) -> Subnet:
        return cls(
            tuple(
                LayerMask(tuple(int(i) for i in h), tuple(int(i) for i in c))
                for h, c in zip(data["heads"], data["channels"], strict=True)
            )
        )


# A layer's shape: (query heads, KV heads, MLP width). Costs are functions of shapes only.
LayerShape = tuple[int, int, int]
Shape = tuple[LayerShape, ...]


@dataclass(frozen=True)
class ParamCount:
    prunable: int
    total: int
    dense_prunable: int
    dense_total: int

    @property
    def removed_ratio(self) -> float:
        """Fraction of the prunable (projection) weights removed."""
        return 1.0 - self.prunable / self.dense_prunable

    def to_json(self) -> dict:
        return {
            "prunable": self.prunable,
            "total": self.total,
            "dense_prunable": self.dense_prunable,
            "dense_total": self.dense_total,
            "removed_ratio": self.removed_ratio,
        }


class SearchSpace:
    """Geometry plus the rules a legal subnet follows (GQA mode, width multiple, minimum widths)."""

    def __init__(
        self, geometry: Geometry, gqa: str = "query", multiple: int = DEFAULT_MULTIPLE, min_width: int | None = None
    ):
        if gqa not in GQA_MODES:
            raise UsageError(f"gqa must be one of {', '.join(GQA_MODES)}, got '{gqa}'")
        if multiple < 1:
            raise UsageError(f"width multiple must be at least 1, got {multiple}")
        self.geometry, self.gqa, self.multiple = geometry, gqa, multiple
        g = geometry
        # allowed (kept KV groups, query heads per kept group), by increasing head count
        if gqa == "query":
            self.head_options = [(g.num_kv_heads, r) for r in range(1, g.group_size + 1)]
        else:
            self.head_options = [(k, g.group_size) for k in range(1, g.num_kv_heads + 1)]
        lo = min_width if min_width is not None else multiple
        widths = [w for w in range(multiple, g.intermediate + 1, multiple) if w >= lo]
        if not widths or widths[-1] != g.intermediate:
            widths.append(g.intermediate)  # the dense width is always allowed
        self.widths = widths

    # ---------------------------------------------------------------- shapes and costs
    def layer_shape(self, mask: LayerMask) -> LayerShape:
        kv = {h // self.geometry.group_size for h in mask.heads}
        return (len(mask.heads), len(kv), len(mask.channels))

    def shape(self, subnet: Subnet) -> Shape:
        return tuple(self.layer_shape(m) for m in subnet.layers)

    def option_shape(self, option: int, width: int) -> LayerShape:
        groups, per_group = self.head_options[option]
        return (groups * per_group, groups, width)

    def count(self, shape: Shape) -> ParamCount:
        g = self.geometry
        prunable = sum(g.layer_params(q, kv, w) for q, kv, w in shape)
        return ParamCount(prunable, g.fixed_params + prunable, g.dense_prunable, g.total_params)

    def params(self, subnet: Subnet) -> ParamCount:
        return self.count(self.shape(subnet))

    def dense_shape(self) -> Shape:
        g = self.geometry
        return ((g.num_heads, g.num_kv_heads, g.intermediate),) * g.num_layers

    def smallest_shape(self) -> Shape:
        return (self.option_shape(0, self.widths[0]),) * self.geometry.num_layers

    def dense(self) -> Subnet:
        g = self.geometry
        return Subnet((LayerMask(tuple(range(g.num_heads)), tuple(range(g.intermediate))),) * g.num_layers)

    # ---------------------------------------------------------------- legality
    def check(self, subnet: Subnet) -> None:
        """Raise ValueError naming the first rule a subnet breaks."""
        g = self.geometry
        if len(subnet.layers) != g.num_layers:
            raise ValueError(f"subnet has {len(subnet.layers)} layers, the model {g.num_layers}")
        for i, m in enumerate(subnet.layers):
            for name, idx, n in (("heads", m.heads, g.num_heads), ("channels", m.channels, g.intermediate)):
                if list(idx) != sorted(set(idx)) or (idx and not 0 <= idx[0] <= idx[-1] < n):
                    raise ValueError(f"layer {i}: {name} must be sorted distinct indices in [0, {n})")
            if not m.heads:
                raise ValueError(f"layer {i}: keeps no attention head (at least one is needed)")
            per_group: dict[int, int] = {}
            for h in m.heads:
                per_group[h // g.group_size] = per_group.get(h // g.group_size, 0) + 1
            counts = set(per_group.values())
            if len(counts) != 1:
                raise ValueError(
                    f"layer {i}: kept query heads {list(m.heads)} must keep the same "
                    f"number of heads in every kept KV group (GQA)"
                )
            option = (len(per_group), counts.pop())
            if option not in self.head_options:
                raise ValueError(
                    f"layer {i}: {option[0]} KV groups x {option[1]} heads is not "
                    f"allowed with gqa='{self.gqa}' (allowed: {self.head_options})"
                )
            if len(m.channels) not in self.widths:
                raise ValueError(
                    f"layer {i}: MLP width {len(m.channels)} is not a multiple of "
                    f"{self.multiple} in [{self.widths[0]}, {g.intermediate}]"
                )

    def head_option_index(self, mask: LayerMask) -> int:
        n_q, n_kv, _ = self.layer_shape(mask)
        return self.head_options.index((n_kv, n_q // n_kv))

    # ---------------------------------------------------------------- selection by scores
    def select_heads(self, option: int, head_scores: np.ndarray) -> tuple[int, ...]:
        """The best legal head set for a head option: per group top-r heads ("query"), or the
        top groups by summed score ("group"). head_scores [num_heads], higher = more important."""
        g = self.geometry
        groups, per_group = self.head_options[option]
        by_group = np.asarray(head_scores, dtype=np.float64).reshape(g.num_kv_heads, g.group_size)
        # stable sorts with a fixed tie order keep selection deterministic
        group_order = np.argsort(-by_group.sum(axis=1), kind="stable")[:groups]
        heads = []
        for k in group_order:
            best = np.argsort(-by_group[k], kind="stable")[:per_group]
            heads += [int(k * g.group_size + j) for j in best]
        return tuple(sorted(heads))

    @staticmethod
    def select_channels(width: int, channel_scores: np.ndarray) -> tuple[int, ...]:
        """The top-`width` channels by score (stable order for ties)."""
        order = np.argsort(-np.asarray(channel_scores, dtype=np.float64), kind="stable")[:width]
        return tuple(sorted(int(i) for i in order))

    def from_scores(
        self, options: Sequence[int], widths: Sequence[int], head_scores: np.ndarray, channel_scores: np.ndarray
    ) -> Subnet:
        """Top-k masks per layer for the given head options and MLP widths.

        head_scores [L, num_heads], channel_scores [L, intermediate]: higher = keep.
        """
        return Subnet(
            tuple(
                LayerMask(self.select_heads(o, head_scores[i]), self.select_channels(w, channel_scores[i]))
                for i, (o, w) in enumerate(zip(options, widths, strict=True))
            )
        )

    def snap_width(self, width: float) -> int:
        """The allowed MLP width nearest to `width` (ties go to the wider one)."""
        widths = np.asarray(self.widths)
        return int(widths[np.argmin(np.abs(widths - width) - 1e-9 * widths)])


# --------------------------------------------------------------------------- budgets


class Budget(ABC):
    """A constraint on a subnet's shape: `floor <= cost(shape) <= limit`.

    The search and the baselines only call `cost` and `meets`; a latency budget (a per-layer
    width table measured once on the target) implements the same two methods.
    """

    unit: str = ""
    limit: float
    floor: float

    @abstractmethod
    def cost(self, shape: Shape) -> float: ...

    def meets(self, shape: Shape) -> bool:
        c = self.cost(shape)
        return self.floor <= c <= self.limit

    def describe(self) -> dict:
        return {"kind": type(self).__name__, "unit": self.unit, "limit": self.limit, "floor": self.floor}


class ParamBudget(Budget):
    """At most `limit` prunable parameters (and, for search candidates, at least `floor`)."""

    unit = "prunable parameters"

    def __init__(self, space: SearchSpace, limit: float, floor: float | None = None):
        self.space = space
        self.limit = float(limit)
        self.floor = float(limit if floor is None else min(floor, limit))
        check_feasible(space, self)

    @classmethod
    def from_ratio(cls, space: SearchSpace, ratio: float, slack: float = DEFAULT_SLACK) -> ParamBudget:
        """Remove at least `ratio` of the prunable weights (attention and MLP projections)."""
        check_ratio(ratio)
        if not 0.0 <= slack < 1.0:
            raise UsageError(f"budget slack must be in [0, 1), got {slack}")
        dense = space.geometry.dense_prunable
        limit = math.floor((1.0 - ratio) * dense)
        return cls(space, limit, limit - slack * dense)

    def cost(self, shape: Shape) -> float:
        return float(self.space.count(shape).prunable)

    def describe(self) -> dict:
        g = self.space.geometry
        return {
            **super().describe(),
            "dense_prunable": g.dense_prunable,
            "dense_total": g.total_params,
            "removed_ratio_at_limit": 1.0 - self.limit / g.dense_prunable,
        }


def check_ratio(ratio: float) -> None:
    if not (isinstance(ratio, (int, float)) and 0.0 < float(ratio) < 1.0):
        raise UsageError(
            f"removal ratio must be strictly between 0 and 1 (the fraction of "
            f"attention+MLP weights to remove), got {ratio}"
        )


def check_feasible(space: SearchSpace, budget: Budget) -> None:
    """UsageError when no subnet of the space can meet the budget."""
    smallest = budget.cost(space.smallest_shape())
    if smallest > budget.limit:
        g = space.geometry
        raise UsageError(
            f"no subnet can meet the budget: limit {budget.limit:,.6g} {budget.unit}, but the smallest "
            f"legal subnet ({space.head_options[0][0] * space.head_options[0][1]} query heads and "
            f"{space.widths[0]} MLP channels per layer, gqa='{space.gqa}') costs {smallest:,.6g} "
            f"(dense {budget.cost(space.dense_shape()):,.6g}, {g.num_layers} layers); "
            f"loosen the budget (a smaller removal ratio, more parameters or a larger latency ratio)"
        )


def overlap_ok(parent: Iterable[int], child: Iterable[int], alpha: float) -> bool:
    """The mutation bound: |child & parent| >= ceil(alpha * min(|parent|, |child|))."""
    parent, child = set(parent), set(child)
    return len(parent & child) >= math.ceil(alpha * min(len(parent), len(child)) - 1e-9)
