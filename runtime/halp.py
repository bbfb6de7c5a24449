"""HALP partitioned CNN inference: the plan and its exact execution on row slabs (no Ray here).

A plan (written by the `partition` pass, read back here) cuts a CNN's feature layers into fused
groups; each group's input rows are split between K workers, the host computes the overlap zones
(runtime/receptive_field.py), or the workers recompute them where the plan cut the output rows
instead (`halo_segments`), and the host merges the pieces before the next group; the layers
after the last group (the classifier) run on the host. `run_plan` executes a plan in one process,
piece by piece; `runtime/halp_ray.py` runs the workers' pieces on Ray actors with the same
`run_rows`, so both give the same bits.

Exactness. A convolution here always runs oneDNN's direct kernel (`aten.mkldnn_convolution`),
whatever the slab's shape: torch's own `conv2d` picks between oneDNN and its native im2col path by
the input's size (batch 1, 3x3 kernels: oneDNN only above 20,480 input elements), and the two round
differently, so a thin slab of a layer the whole image runs on oneDNN would not be bit-exact. With
one algorithm, each output element's reduction order does not depend on how many rows the slab has
or on the thread count, so every partition gives `torch.equal` outputs to the unpartitioned run
(`reference`, the same layers on the whole image). Row padding is explicit zero rows at the image's
edges only; column padding is the kernel's own. Where torch's dispatch also picks oneDNN for the
whole image (VGG-16 at 224x224: every layer), `reference` equals the plain module's forward too.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from accelc.errors import HostUnsupported, UsageError
from accelc.runtime.receptive_field import Segment, Window, sizes

PLAN_KIND = "halp"


def window_of(module) -> Window | None:
    """The row window of a torch layer; None for layers that keep rows one to one."""
    from torch import nn

    def first(v):
        return v[0] if isinstance(v, tuple) else v

    if isinstance(module, nn.Conv2d):
        return Window(first(module.kernel_size), first(module.stride), first(module.padding), first(module.dilation))
    if isinstance(module, nn.MaxPool2d):
        if module.ceil_mode:
            raise UsageError("max_pool2d with ceil_mode cannot be row-partitioned exactly")
        stride = first(module.stride) if module.stride is not None else first(module.kernel_size)
        return Window(first(module.kernel_size), stride, first(module.padding), first(module.dilation))
    if isinstance(module, (nn.ReLU, nn.Dropout)):
        return None
    raise UsageError(f"layer {type(module).__name__} cannot be row-partitioned (conv2d, max_pool2d, relu, dropout can)")


def require_onednn() -> None:
    import torch

    if not torch.backends.mkldnn.is_available():
        raise HostUnsupported(
            "HALP's bit-exact partitions need torch built with oneDNN (mkldnn); "
            "install the official CPU wheel: pip install torch --index-url https://download.pytorch.org/whl/cpu"
        )


def _pair(v) -> tuple[int, int]:
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def _apply(module, x, top: int, bottom: int):
    """One layer on a slab with `top`/`bottom` zero rows of padding (only at the image's edges)."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    if isinstance(module, nn.Conv2d):
        if top or bottom:
            x = F.pad(x, (0, 0, top, bottom))
        return torch.ops.aten.mkldnn_convolution(
            x.contiguous(),
            module.weight,
            module.bias,
            [0, module.padding[1]],
            list(module.stride),
            list(module.dilation),
            module.groups,
        )
    if isinstance(module, nn.MaxPool2d):
        if top or bottom:
            x = F.pad(x, (0, 0, top, bottom), value=float("-inf"))  # pooling pads with -inf, not zeros
        kernel, stride, padding, dilation = (_pair(v) for v in (module.kernel_size, module.stride or
                                               module.kernel_size, module.padding, module.dilation))  # fmt: skip
        return F.max_pool2d(x, kernel, stride, (0, padding[1]), dilation)
    return module(x)


def run_rows(modules, stack, rows: int, x, first: int, last: int, want: tuple[int, int]):
    """Layers `modules` (their row windows `stack`, input of `rows` rows) on input rows [first, last]
    held in `x` (N x C x slab x W); returns output rows [want[0], want[1]], which the slab must
    determine (receptive_field.determined_rows)."""
    heights = sizes(stack, rows)
    lo, hi = first, last
    for module, window, height in zip(modules, stack, heights):
        if window is None:
            x = _apply(module, x, 0, 0)
            continue
        top = window.padding if lo == 0 else 0
        bottom = window.padding if hi == height - 1 else 0
        a, b = window.determined(lo, hi, height)
        start = a * window.stride - window.padding  # the first row the first window reads
        x = x[:, :, start - lo + top :] if start - lo + top > 0 else x
        x = _apply(module, x, top if start < 0 else 0, bottom)
        x = x[:, :, : b - a + 1]
        lo, hi = a, b
    return x[:, :, want[0] - lo : want[1] - lo + 1]


@dataclass(frozen=True)
class Group:
    """Feature layers [first, end) fused into one partitioned step, its input rows and its pieces."""

    first: int
    end: int
    rows: int
    pieces: tuple[Segment, ...]

    def to_json(self) -> dict:
        return {"layers": [self.first, self.end], "rows": self.rows, "pieces": [p.to_json() for p in self.pieces]}

    @classmethod
    def from_json(cls, data: dict) -> Group:
        return cls(*data["layers"], data["rows"], tuple(Segment.from_json(p) for p in data["pieces"]))


@dataclass(frozen=True)
class Plan:
    """What the `partition` pass decided: groups, K workers, the threads each, the predictions."""

    workers: int
    threads: int
    groups: tuple[Group, ...]
    head: int  # the first layer after the last group: from here on the host runs the model whole
    predicted: dict = field(default_factory=dict)
    ray_address: str | None = None  # the cluster it runs on; None: a local Ray instance

    def to_json(self) -> dict:
        return {"kind": PLAN_KIND, "workers": self.workers, "threads": self.threads, "head": self.head,
                "groups": [g.to_json() for g in self.groups], "predicted": self.predicted,
                "ray_address": self.ray_address}  # fmt: skip

    @classmethod
    def from_json(cls, data: dict, where: str) -> Plan:
        if not isinstance(data, dict) or data.get("kind") != PLAN_KIND:
            raise UsageError(
                f"{where}: not a HALP plan (kind {data.get('kind') if isinstance(data, dict) else data!r})"
            )
        try:
            return cls(data["workers"], data["threads"], tuple(Group.from_json(g) for g in data["groups"]),
                       data["head"], data.get("predicted", {}), data.get("ray_address"))  # fmt: skip
        except (KeyError, TypeError, ValueError) as exc:
            raise UsageError(f"{where}: malformed HALP plan ({exc})") from None

    @classmethod
    def read(cls, path: Path) -> Plan:
        try:
            return cls.from_json(json.loads(path.read_text(encoding="utf-8")), str(path))
        except (OSError, ValueError) as exc:
            raise UsageError(f"{path}: cannot read the HALP plan ({exc})") from None

    def single(self) -> Plan:
        """The same groups with every group on one worker: the unpartitioned baseline on the same runtime."""
        groups = []
        for g in self.groups:
            whole = Segment(0, 0, g.rows - 1, 0, g.pieces[-1].out_last)
            groups.append(Group(g.first, g.end, g.rows, (whole,)))
        return Plan(1, self.threads, tuple(groups), self.head, ray_address=self.ray_address)


def group_stack(modules, group: Group) -> tuple[list, list]:
    layers = [modules[i] for i in range(group.first, group.end)]
    return layers, [window_of(m) for m in layers]


def run_piece(modules, group: Group, piece: Segment, x_slab):
    """One piece of a group: its input slab (rows [in_first, in_last]) -> its output rows."""
    layers, stack = group_stack(modules, group)
    return run_rows(layers, stack, group.rows, x_slab, piece.in_first, piece.in_last, (piece.out_first, piece.out_last))


def piece_before(plan: Plan, gi: int, piece: Segment) -> Segment | None:
    """The piece the same worker computed in group gi - 1 (None for group 0, the host, or a worker
    idle there)."""
    if gi == 0 or piece.worker is None:
        return None
    return next((p for p in plan.groups[gi - 1].pieces if p.worker == piece.worker), None)


def kept_rows(plan: Plan, gi: int, piece: Segment) -> tuple[int, int] | None:
    """The rows of `piece`'s input that its worker already holds: its own output of group gi - 1
    (a worker keeps what it computed; only the rest of its slab travels), or None."""
    before = piece_before(plan, gi, piece)
    if before is None:
        return None
    first, last = max(before.out_first, piece.in_first), min(before.out_last, piece.in_last)
    return (first, last) if first <= last else None


def rows_wanted_elsewhere(plan: Plan, gi: int, piece: Segment) -> list[tuple[int, int]]:
    """The rows of a worker's output in group gi that the next group's other pieces read (the host's
    included), merged; after the last group, all of them (the classifier's input)."""
    if gi == len(plan.groups) - 1:
        return [(piece.out_first, piece.out_last)]
    wanted = sorted(
        (max(q.in_first, piece.out_first), min(q.in_last, piece.out_last))
        for q in plan.groups[gi + 1].pieces
        if q.worker != piece.worker and max(q.in_first, piece.out_first) <= min(q.in_last, piece.out_last)
    )
    merged: list[tuple[int, int]] = []
    for first, last in wanted:
        if merged and first <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(merged[-1][1], last))
        else:
            merged.append((first, last))
    return merged


def run_head(modules, head: int, x):
    for module in modules[head:]:
        x = module(x)
    return x


def run_plan(modules, plan: Plan, x):
    """The plan executed in this process, piece after piece: what the Ray runtime computes, bit for bit."""
    import torch

    with torch.inference_mode():
        for group in plan.groups:
            parts = [run_piece(modules, group, p, x[:, :, p.in_first : p.in_last + 1]) for p in group.pieces]
            x = torch.cat(parts, 2)
        return run_head(modules, plan.head, x)


def reference(modules, plan: Plan, x):
    """The unpartitioned model on the same kernels: every group on the whole image."""
    return run_plan(modules, plan.single(), x)


def layer_costs(modules, x, threads: int, repeats: int = 5) -> list[dict]:
    """Per layer: seconds = fixed + per_row x output rows, from the whole input, its top half and a
    thin slab (each the fastest of `repeats`: other jobs only ever add time), at `threads` torch
    threads; and the layer's input/output shape (for transfer bytes). The partition pass runs it on
    every worker at once (`HalpCluster.layer_costs`), so the costs include what the workers do to
    each other (shared caches, memory bandwidth)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    costs = []
    try:
        with torch.inference_mode():
            h = x
            for module in modules:
                spatial = h.dim() == 4 and not isinstance(module, torch.nn.Flatten)
                window = window_of(module) if spatial else None
                rows = h.shape[2] if spatial else 1
                thin = min((window.span if window else 1) + 3, rows)  # an overlap zone's size
                timed = {}
                for n in sorted({rows, max(rows // 2, thin), thin}) if spatial else [rows]:
                    part = h[:, :, :n] if spatial else h
                    samples = []
                    for _ in range(repeats):
                        started = time.perf_counter()
                        out = _whole_height(module, window, part)
                        samples.append(time.perf_counter() - started)
                    timed[out.shape[2] if out.dim() == 4 else 1] = min(samples)
                out = _whole_height(module, window, h)
                points = sorted(timed.items())
                (r_thin, t_thin), (r_full, t_full) = points[0], points[-1]
                r_half, t_half = points[-2] if len(points) > 1 else points[-1]
                # the slope from the two large slabs (the workers' share), the fixed cost of a call
                # from the thin one (the host's overlap zones): a straight line through all three
                # would charge every thin piece the large slabs' cache misses
                per_row = (t_full - t_half) / (r_full - r_half) if r_full > r_half else t_full / max(r_full, 1)
                per_row = max(per_row, 0.0)
                costs.append({"fixed": max(t_thin - per_row * r_thin, 0.0), "per_row": per_row,
                              "in": list(h.shape[1:]), "out": list(out.shape[1:])})  # fmt: skip
                h = out
    finally:
        torch.set_num_threads(previous)
    return costs


def _whole_height(module, window, x):
    """A layer on a whole-height input, as the unpartitioned model runs it."""
    return _apply(module, x, window.padding, window.padding) if window else module(x)


def as_numpy(t) -> np.ndarray:
    return t.detach().numpy()
