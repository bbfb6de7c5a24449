"""Calibration statistics at the inputs of o_proj and down_proj, and importance scores from them.

The prunable units are the *input channels of the consumers*: the H*d inputs of o_proj (d per
query head) and the d_ff inputs of down_proj (one per MLP channel). Forward pre-hooks on those two
Linears see every calibration token's x [T, C]; per layer and per channel we accumulate, streaming
over windows:

    count, sum x_j, sum x_j^2      in float64 -> mean, variance (population), mean square
    X^T X  (optional, [C, C])      per-window fp32 GEMM, accumulated across windows in float64

Scores (higher = more important; W is the consumer's weight [out, C]):

    fluctuation   Var(x_j) * ||W[:, j]||^2          FLAP's metric (arXiv 2312.11983)
    energy        E[x_j^2] * ||W[:, j]||^2          output energy of the channel alone (the data
                                                    README's ranking for its reference points)
    wanda         ||x_j||_2 * mean_i |W_ij|         Wanda-sp (Wanda's |W|*||x|| summed over rows)
    magnitude     sum of squares of every weight that belongs to the channel: for an MLP channel
                  its gate/up rows and down column, for a head its q rows and o columns

A head's score is the sum of its d channel scores; a KV group's is the sum over its query heads.

Per calibration source (`scores(..., sources=, combine=)`): the moments above pool every window,
so each score is a mixture average in which a channel that only a minority source drives (the
one Shakespeare or Python-docs passage that needs it) can rank low. With one CalibrationStats
per source, each source's scores are taken on their own, divided by their layer's mean (so a
source whose activations are larger overall does not dominate), and combined: `max` keeps a
channel that any source ranks high (the source-wise union that held-out domains the mixture only
resembles may rely on), `mean` weighs every source equally whatever its activation scale.
`max_in_layer` ranks heads and channels within each layer by `max` but leaves the allocation of
widths across layers (FLAP's adaptive structure, the search's centre) to the pooled scores: on
SmolLM2 at 20% removed, `max` chose better channels for a given shape (the uniform seeds' fitness
35.42 vs 36.19) and a worse allocation (the adaptive seed's 36.96 vs 35.33); at 10% the reverse.
None of the three lowered the worst held-out text (docs/pruning.md, session 21).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from accelc import progress
from accelc.compiler.pruning.masks import Geometry
from accelc.errors import UsageError

METRICS = ("fluctuation", "energy", "wanda", "magnitude")
# Measured on SmolLM2 (uniform MLP 1152, 16 x 512 tokens of emma, persuasion ppl): energy 55.7,
# wanda 56.5, fluctuation 56.8; so energy ranks the initial masks of the search by default.
DEFAULT_METRIC = "energy"
# how per-source scores become one (see the module docstring); "pooled": every window's
# statistics pooled, the scores as they were before per-source scoring existed
COMBINES = ("pooled", "max", "mean", "max_in_layer")


class ChannelStats:
    """Streaming first and second moments (and optionally the Gram matrix) of x [*, C]."""

    def __init__(self, channels: int, gram: bool = False):
        import torch

        self.channels = channels
        self.count = 0
        self.sum = torch.zeros(channels, dtype=torch.float64)
        self.sumsq = torch.zeros(channels, dtype=torch.float64)
        self.gram = torch.zeros(channels, channels, dtype=torch.float64) if gram else None

    def update(self, x) -> None:
        x = x.detach().reshape(-1, self.channels).float()  # [N, C]
        self.count += x.shape[0]
        x64 = x.double()
        self.sum += x64.sum(0)
        self.sumsq += (x64 * x64).sum(0)
        if self.gram is not None:
            # fp32 GEMM over one window's rows (<= a few thousand terms), fp64 across windows
            self.gram += (x.T @ x).double()

    @property
    def mean(self) -> np.ndarray:
        return (self.sum / max(self.count, 1)).numpy()

    @property
    def mean_square(self) -> np.ndarray:
        return (self.sumsq / max(self.count, 1)).numpy()

    @property
    def var(self) -> np.ndarray:
        return np.maximum(self.mean_square - self.mean**2, 0.0)


@dataclass
class CalibrationStats:
    geometry: Geometry
    o_proj: list[ChannelStats]  # per layer, inputs of o_proj [H*d]
    down_proj: list[ChannelStats]  # per layer, inputs of down_proj [d_ff]
    windows: int
    tokens: int

    def save(self, path) -> None:
        """Moments only (npz, no pickle); Gram matrices are not saved (hundreds of MB)."""
        arrays = {"windows": np.int64(self.windows), "tokens": np.int64(self.tokens)}
        for name, per_layer in (("o_proj", self.o_proj), ("down_proj", self.down_proj)):
            arrays[f"{name}.count"] = np.array([s.count for s in per_layer], dtype=np.int64)
            arrays[f"{name}.sum"] = np.stack([s.sum.numpy() for s in per_layer])
            arrays[f"{name}.sumsq"] = np.stack([s.sumsq.numpy() for s in per_layer])
        np.savez(path, **arrays)

    @classmethod
    def load(cls, path, geometry: Geometry) -> CalibrationStats:
        import torch

        with np.load(path, allow_pickle=False) as data:
            per_module = {}
            for name in ("o_proj", "down_proj"):
                stats = []
                for count, total, sq in zip(data[f"{name}.count"], data[f"{name}.sum"], data[f"{name}.sumsq"]):
                    st = ChannelStats(len(total))
                    st.count, st.sum, st.sumsq = int(count), torch.from_numpy(total.copy()), torch.from_numpy(sq.copy())
                    stats.append(st)
                per_module[name] = stats
            if (
                len(per_module["o_proj"]) != geometry.num_layers
                or per_module["down_proj"][0].channels != geometry.intermediate
            ):
                raise UsageError(f"{path}: calibration statistics were collected on a different model shape")
            return cls(
                geometry, per_module["o_proj"], per_module["down_proj"], int(data["windows"]), int(data["tokens"])
            )

    def grams(self) -> dict:
        """{(layer, "o_proj"|"down_proj"): X^T X} (collect with gram=True), for reform.oneshot."""
        out = {}
        for i, (so, sd) in enumerate(zip(self.o_proj, self.down_proj)):
            if so.gram is None or sd.gram is None:
                raise ValueError("statistics were collected without Gram matrices (gram=False)")
            out[(i, "o_proj")], out[(i, "down_proj")] = so.gram, sd.gram
        return out


def collect(model, windows: list[np.ndarray], *, gram: bool = False, show_progress: bool = True) -> CalibrationStats:
    """Run the model over calibration windows and accumulate the statistics of every layer."""
    import torch

    geo = Geometry.from_model(model)
    o_stats = [ChannelStats(geo.num_heads * geo.head_dim, gram) for _ in range(geo.num_layers)]
    d_stats = [ChannelStats(geo.intermediate, gram) for _ in range(geo.num_layers)]
    handles = []
    for layer, so, sd in zip(model.model.layers, o_stats, d_stats):
        handles.append(layer.self_attn.o_proj.register_forward_pre_hook(lambda mod, args, s=so: s.update(args[0])))
        handles.append(layer.mlp.down_proj.register_forward_pre_hook(lambda mod, args, s=sd: s.update(args[0])))
    tokens = 0
    try:
        with torch.inference_mode():
            for win in progress.bar(
                windows, desc="calibration statistics", unit="window", **({} if show_progress else {"disable": True})
            ):
                ids = torch.as_tensor(np.asarray(win, dtype=np.int64)).unsqueeze(0)
                model.model(input_ids=ids, use_cache=False)  # the LM head is not needed
                tokens += ids.shape[1]
    finally:
        for h in handles:
            h.remove()
    return CalibrationStats(geo, o_stats, d_stats, len(windows), tokens)


def collect_by_source(model, groups: list[list[np.ndarray]], *, show_progress: bool = True) -> list[CalibrationStats]:
    """`collect` over each source's windows on its own (data.calibration_sources' groups)."""
    return [collect(model, windows, show_progress=show_progress) for windows in groups if windows]


def weight_norms(model) -> dict[str, np.ndarray]:
    """Per layer, float64: squared column norms and mean |W| of o_proj/down_proj, squared row
    norms of q/k/v/gate/up. Each entry is [L, C]."""
    import torch

    out: dict[str, list] = {
        k: []
        for k in (
            "o_col_sq",
            "o_col_abs",
            "down_col_sq",
            "down_col_abs",
            "q_row_sq",
            "k_row_sq",
            "v_row_sq",
            "gate_row_sq",
            "up_row_sq",
        )
    }
    with torch.no_grad():
        for layer in model.model.layers:
            a, m = layer.self_attn, layer.mlp
            o, d = a.o_proj.weight.double(), m.down_proj.weight.double()
            out["o_col_sq"].append((o * o).sum(0).numpy())
            out["o_col_abs"].append(o.abs().mean(0).numpy())
            out["down_col_sq"].append((d * d).sum(0).numpy())
            out["down_col_abs"].append(d.abs().mean(0).numpy())
            for name, mod in (
                ("q", a.q_proj),
                ("k", a.k_proj),
                ("v", a.v_proj),
                ("gate", m.gate_proj),
                ("up", m.up_proj),
            ):
                w = mod.weight.double()
                out[f"{name}_row_sq"].append((w * w).sum(1).numpy())
    return {k: np.stack(v) for k, v in out.items()}


@dataclass
class Importance:
    """Scores per attention input channel [L, H*d], per head [L, H] and per MLP channel [L, d_ff]."""

    metric: str
    attn_channel: np.ndarray
    head: np.ndarray
    channel: np.ndarray
    meta: dict = field(default_factory=dict)
    # the scores whose per-layer z-scores allocate widths across layers (FLAP's adaptive
    # structure: the search's centre); None: these scores
    allocation: Importance | None = None

    @property
    def kv_group(self) -> np.ndarray:
        """[L, num_kv_heads]: the sum over each group's query heads."""
        L, H = self.head.shape
        groups = self.meta["num_kv_heads"]
        return self.head.reshape(L, groups, H // groups).sum(axis=2)


def scores(
    geometry: Geometry,
    norms: dict[str, np.ndarray],
    stats: CalibrationStats | None,
    metric: str,
    *,
    sources: list[CalibrationStats] | None = None,
    combine: str = "pooled",
) -> Importance:
    """Importance of every head and MLP channel under `metric` (see the module docstring).

    `stats` may be None for metric="magnitude", which needs weights only. combine="pooled" (the
    default) scores `stats` and ignores `sources`; "max" / "mean" score each of `sources` (one
    CalibrationStats per calibration source) and combine them (module docstring).
    """
    if combine not in COMBINES:
        raise UsageError(f"unknown way to combine per-source scores '{combine}': choose one of {', '.join(COMBINES)}")
    if combine == "max_in_layer":
        imp = _by_source(geometry, norms, sources, metric, "max")
        imp.meta["combine"] = combine
        imp.allocation = scores(geometry, norms, stats, metric)
        return imp
    if combine != "pooled":
        return _by_source(geometry, norms, sources, metric, combine)
    if metric not in METRICS:
        raise UsageError(f"unknown importance metric '{metric}': choose one of {', '.join(METRICS)}")
    if metric == "magnitude":
        attn = norms["o_col_sq"] + norms["q_row_sq"]  # q row r and o column r: same head dim
        mlp = norms["down_col_sq"] + norms["gate_row_sq"] + norms["up_row_sq"]
    else:
        if stats is None:
            raise ValueError(f"metric '{metric}' needs calibration statistics")
        if metric == "fluctuation":
            xo = np.stack([s.var for s in stats.o_proj])  # [L, H*d]
            xd = np.stack([s.var for s in stats.down_proj])  # [L, d_ff]
        else:  # energy and wanda both use the mean square of the input
            xo = np.stack([s.mean_square for s in stats.o_proj])
            xd = np.stack([s.mean_square for s in stats.down_proj])
        if metric == "wanda":
            attn = np.sqrt(xo * stats.tokens) * norms["o_col_abs"]
            mlp = np.sqrt(xd * stats.tokens) * norms["down_col_abs"]
        else:
            attn = xo * norms["o_col_sq"]
            mlp = xd * norms["down_col_sq"]
    L = geometry.num_layers
    head = attn.reshape(L, geometry.num_heads, geometry.head_dim).sum(axis=2)  # [L, H]
    return Importance(metric, attn, head, mlp, meta={"num_kv_heads": geometry.num_kv_heads})


def _per_layer_share(x: np.ndarray) -> np.ndarray:
    """[L, C] scores over their layer's mean: 1 is an average channel of that layer and source."""
    mean = x.mean(axis=1, keepdims=True)
    return x / np.where(mean > 0, mean, 1.0)


def _by_source(geometry, norms, sources, metric: str, combine: str) -> Importance:
    """Each source scored alone, normalised per layer and combined by `combine` (max or mean).

    Scores stay positive (the search's importance-weighted fills take their log) and only their
    order within a layer matters downstream: FLAP's allocation (baselines.standardised)
    z-scores each layer's combined scores itself (FLAP, arXiv 2312.11983), and the search's
    fills and resizes compare channels of one layer. A head is still the sum of its channels.
    """
    if not sources:
        raise ValueError(f"combine='{combine}' needs calibration statistics per source")
    parts = [scores(geometry, norms, s, metric) for s in sources]
    reduce = np.max if combine == "max" else np.mean
    attn = reduce(np.stack([_per_layer_share(p.attn_channel) for p in parts]), axis=0)
    mlp = reduce(np.stack([_per_layer_share(p.channel) for p in parts]), axis=0)
    head = attn.reshape(geometry.num_layers, geometry.num_heads, geometry.head_dim).sum(axis=2)
    meta = {"num_kv_heads": geometry.num_kv_heads, "combine": combine, "sources": len(parts)}
    return Importance(metric, attn, head, mlp, meta=meta)


def importance(
    model,
    windows: list[np.ndarray] | None,
    metric: str = DEFAULT_METRIC,
    *,
    stats: CalibrationStats | None = None,
    show_progress: bool = True,
) -> Importance:
    """Scores for `model` from calibration windows (collected here unless `stats` is given)."""
    geo = Geometry.from_model(model)
    if stats is None and metric != "magnitude":
        if not windows:
            raise UsageError("importance scores need at least one calibration window")
        stats = collect(model, windows, show_progress=show_progress)
    return scores(geo, weight_norms(model), stats, metric)
