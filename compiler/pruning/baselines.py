"""Training-free structured-pruning baselines, under the same Budget and calibration data as search.

    magnitude  uniform widths; heads and channels ranked by the squared L2 norm of their weights
               (q rows + o columns per head; gate/up rows + down column per MLP channel)
    wanda_sp   uniform widths; Wanda's |W_ij| * ||x_j||_2 summed over the consumer's rows
               (o_proj per head, down_proj per channel), as FLAP's Wanda-sp baseline
    flap       FLAP (An et al., AAAI 2024): fluctuation metric Var(x_j) * ||W[:, j]||^2, adaptive
               structure across layers and modules (scores standardised per layer and module,
               one global threshold chosen by parameter cost: FLAP's "AL-AM"), and bias
               compensation b += W[:, removed] @ mean(x[removed]) on o_proj and down_proj

"Uniform" means one head option and one MLP width for every layer: the largest pair that meets
the budget's limit, choosing, among head options, the one that prunes attention and MLP by the
most similar fractions (or keeping every head with prune_attention=False, the data README's
reference point). GQA rules and width snapping are the SearchSpace's, as for the search; FLAP's
attention unit under gqa="query" is "the k-th best query head of every KV group" (scored by the
mean of those heads), so its kept heads always form a legal GQA layout. Statistics come from the
dense model (FLAP computes its metrics once, before pruning).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from accelc.compiler.pruning.importance import CalibrationStats, Importance, scores, weight_norms
from accelc.compiler.pruning.masks import Budget, Geometry, LayerMask, SearchSpace, Subnet, check_feasible
from accelc.errors import UsageError

METHODS = ("magnitude", "wanda_sp", "flap")


@dataclass
class Pruned:
    """A baseline's result: the subnet and replacement consumer weights (for materialize.shrink)."""

    method: str
    subnet: Subnet
    overrides: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)


def uniform_shape(space: SearchSpace, budget: Budget, *, prune_attention: bool = True):
    """(head option, MLP width) used in every layer: the largest meeting the limit."""
    check_feasible(space, budget)
    g = space.geometry
    options = range(len(space.head_options)) if prune_attention else [len(space.head_options) - 1]
    best = None
    for option in options:
        n_q = space.option_shape(option, 0)[0]
        fitting = [
            w for w in space.widths if budget.cost((space.option_shape(option, w),) * g.num_layers) <= budget.limit
        ]
        if not fitting:
            continue
        width = fitting[-1]
        imbalance = abs(n_q / g.num_heads - width / g.intermediate)
        if best is None or imbalance < best[0] - 1e-12:
            best = (imbalance, option, width)
    if best is None:
        raise UsageError(
            f"no uniform subnet meets the budget ({budget.describe()['limit']:,.0f} "
            f"{budget.unit}) with prune_attention={prune_attention}; "
            f"lower the ratio or allow attention pruning"
        )
    return best[1], best[2]


def uniform(space: SearchSpace, budget: Budget, imp: Importance, *, prune_attention: bool = True) -> Subnet:
    option, width = uniform_shape(space, budget, prune_attention=prune_attention)
    L = space.geometry.num_layers
    return space.from_scores([option] * L, [width] * L, imp.head, imp.channel)


def magnitude(model, space: SearchSpace, budget: Budget, *, prune_attention: bool = True) -> Pruned:
    imp = scores(space.geometry, weight_norms(model), None, "magnitude")
    return Pruned("magnitude", uniform(space, budget, imp, prune_attention=prune_attention))


def wanda_sp(
    model, space: SearchSpace, budget: Budget, stats: CalibrationStats, *, prune_attention: bool = True
) -> Pruned:
    imp = scores(space.geometry, weight_norms(model), stats, "wanda")
    return Pruned("wanda_sp", uniform(space, budget, imp, prune_attention=prune_attention))


# --------------------------------------------------------------------------- FLAP


def _standardise(x: np.ndarray) -> np.ndarray:
    """Per layer (row): zero mean, unit standard deviation (FLAP's `standarlization`)."""
    std = x.std(axis=1, keepdims=True)
    return (x - x.mean(axis=1, keepdims=True)) / np.where(std > 0, std, 1.0)


def _head_units(space: SearchSpace, head_scores: np.ndarray):
    """Per layer: the nested attention units as (score, heads kept after adding the unit)."""
    g = space.geometry
    G = g.group_size
    units = []
    for row in head_scores:
        by_group = row.reshape(g.num_kv_heads, G)
        if space.gqa == "query":  # unit k: the k-th best head of every group
            order = np.argsort(-by_group, axis=1, kind="stable")
            layer = [(float(np.mean(by_group[np.arange(g.num_kv_heads), order[:, k]])), k) for k in range(G)]
        else:  # unit k: the k-th best whole group
            gs = by_group.mean(axis=1)
            layer = [(float(gs[j]), k) for k, j in enumerate(np.argsort(-gs, kind="stable"))]
        units.append(layer)
    return units


def standardised(geometry: Geometry, imp: Importance) -> tuple[np.ndarray, np.ndarray]:
    """FLAP's comparable scores: per-layer z-scores of the attention input channels averaged per
    head [L, H], and per-layer z-scores of the MLP channels [L, F]."""
    L = geometry.num_layers
    head = _standardise(imp.attn_channel).reshape(L, geometry.num_heads, geometry.head_dim).mean(axis=2)
    return head, _standardise(imp.channel)


def adaptive_subnet(space: SearchSpace, budget: Budget, head_z: np.ndarray, channel_z: np.ndarray) -> Subnet:
    """FLAP's adaptive structure: attention units and MLP channels of every layer ranked on one
    scale (z-scores), kept by decreasing score while the budget's limit allows; MLP widths then
    snapped down to the space's ladder and the best snapped blocks added back while they fit."""
    check_feasible(space, budget)
    geo = space.geometry
    L = geo.num_layers
    units = _head_units(space, head_z)
    items = [(sc, "a", i, k) for i in range(L) for sc, k in units[i]]
    items += [(float(channel_z[i, c]), "m", i, c) for i in range(L) for c in range(geo.intermediate)]
    items.sort(key=lambda t: (-t[0], t[1], t[2], t[3]))
    order_ch = [np.argsort(-channel_z[i], kind="stable") for i in range(L)]

    def shape_of(units_, widths_):
        return tuple(space.option_shape(u - 1, w) for u, w in zip(units_, widths_))

    # everything starts at the minimum legal size; add by decreasing score while it fits
    kept_units = np.ones(L, dtype=int)
    kept_ch = [[int(c) for c in order_ch[i][: space.widths[0]]] for i in range(L)]
    in_set = [set(c) for c in kept_ch]
    widths = [len(c) for c in kept_ch]
    for _, kind, i, k in items:
        if kind == "a":
            if k + 1 <= kept_units[i]:
                continue
            trial_units = kept_units.copy()
            trial_units[i] = k + 1
            if budget.cost(shape_of(trial_units, widths)) <= budget.limit:
                kept_units = trial_units
        elif k not in in_set[i]:
            trial = list(widths)
            trial[i] += 1
            if budget.cost(shape_of(kept_units, trial)) <= budget.limit:
                kept_ch[i].append(int(k))
                in_set[i].add(int(k))
                widths = trial
    # snap every MLP width down to the space's ladder, then grow the best blocks while they fit
    snapped = [_snap_down(space, len(c)) for c in kept_ch]
    while True:
        gains = []
        for i in range(L):
            nxt = next((w for w in space.widths if w > snapped[i]), None)
            if nxt is None:
                continue
            trial = list(snapped)
            trial[i] = nxt
            if budget.cost(shape_of(kept_units, trial)) <= budget.limit:
                gains.append((float(channel_z[i, order_ch[i][snapped[i] : nxt]].mean()), -i, nxt))
        if not gains:
            break
        _, neg_i, nxt = max(gains)
        snapped[-neg_i] = nxt
    return Subnet(
        tuple(
            LayerMask(
                space.select_heads(int(u) - 1, head_z[i]), tuple(sorted(int(c) for c in order_ch[i][: snapped[i]]))
            )
            for i, u in enumerate(kept_units)
        )
    )


def flap(
    model, space: SearchSpace, budget: Budget, stats: CalibrationStats, *, bias_compensation: bool = True
) -> Pruned:
    """FLAP with adaptive structure, then widths snapped to the space and fitted to the budget."""
    import torch

    geo: Geometry = space.geometry
    imp = scores(geo, weight_norms(model), stats, "fluctuation")
    subnet = adaptive_subnet(space, budget, *standardised(geo, imp))
    space.check(subnet)
    overrides = {}
    if bias_compensation:
        from accelc.compiler.pruning.materialize import _index_sets

        with torch.no_grad():
            for i, (layer, mask) in enumerate(zip(model.model.layers, subnet.layers)):
                q_rows, _, ch, _ = _index_sets(geo, mask.heads, mask.channels)
                for name, lin, keep, st in (
                    ("o_proj", layer.self_attn.o_proj, q_rows, stats.o_proj[i]),
                    ("down_proj", layer.mlp.down_proj, ch, stats.down_proj[i]),
                ):
                    W = lin.weight.detach().double()
                    removed = torch.ones(W.shape[1], dtype=torch.bool)
                    removed[keep] = False
                    mean = torch.as_tensor(st.mean, dtype=torch.float64)
                    b = W[:, removed] @ mean[removed]
                    if lin.bias is not None:
                        b = b + lin.bias.detach().double()
                    overrides[(i, name)] = (lin.weight.detach()[:, keep].clone(), b.to(lin.weight.dtype))
    return Pruned("flap", subnet, overrides)


def _snap_down(space: SearchSpace, width: int) -> int:
    fitting = [w for w in space.widths if w <= width]
    return fitting[-1] if fitting else space.widths[0]
