"""Receptive-field interval maths along one spatial axis (rows), for segment-partitioned CNN inference.

HALP (Li, Iosifidis & Zhang, arXiv 2207.11294, section III) splits a feature map into row segments
that each run several layers without exchanging halos. That needs, for a stack of sliding-window
layers (convolution, pooling), the input rows an output-row segment depends on, and the converse:
the output rows a slab of input rows determines on its own. For one layer with kernel k, stride s,
padding p and dilation d over an input of n rows, output rows [a, b] read input rows

    [max(0, a*s - p), min(n - 1, b*s - p + d*(k - 1))]

(rows outside the image are the zero padding); a stack composes this backward, layer by layer.
Layers that are not windows (ReLU, dropout) keep rows one to one and are `None` here.

A segment plan for K workers cuts the group's *input* rows into K disjoint slabs, one per worker:
each worker computes the output rows its slab alone determines, and the output rows between two
workers' parts (those whose inputs straddle a cut: the overlap zone) are computed by the host,
which holds the whole input (the paper's task collaboration). No input row is sent twice.

The other plan (`halo_segments`) cuts the group's *output* rows instead: each worker computes its
output rows from every input row they read, so neighbouring slabs overlap by the receptive field's
halo, which is computed twice, and the host computes nothing. Where the host has no core of its
own it would take the workers' cores for its overlap zones; the latency model then weighs those
against the halo's recomputation (passes/partition.py).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Window:
    """A sliding window along rows: kernel, stride, (symmetric) zero padding, dilation."""

    kernel: int
    stride: int = 1
    padding: int = 0
    dilation: int = 1

    def out_size(self, rows: int) -> int:
        return (rows + 2 * self.padding - self.dilation * (self.kernel - 1) - 1) // self.stride + 1

    def needs(self, a: int, b: int, rows: int) -> tuple[int, int]:
        """The input rows (of `rows`) that output rows [a, b] read, padding excluded."""
        return max(0, a * self.stride - self.padding), min(rows - 1, b * self.stride - self.padding + self.span - 1)

    @property
    def span(self) -> int:
        return self.dilation * (self.kernel - 1) + 1

    def determined(self, first: int, last: int, rows: int) -> tuple[int, int] | None:
        """The output rows whose inputs all lie in input rows [first, last] (the image's edges count as
        present: padding is zeros), or None where that slab determines none."""
        out = self.out_size(rows)
        # needs(a)[0] >= first: a*s - p >= first, unless the slab starts at the image's top
        a = 0 if first == 0 else -(-(first + self.padding) // self.stride)
        # needs(b)[1] <= last: b*s - p + span - 1 <= last, unless the slab ends at the image's bottom
        b = out - 1 if last == rows - 1 else (last + self.padding - self.span + 1) // self.stride
        b = min(b, out - 1)
        return (a, b) if a <= b else None


Stack = Sequence["Window | None"]


def sizes(stack: Stack, rows: int) -> list[int]:
    """Rows of every activation through the stack (index 0: its input)."""
    out = [rows]
    for window in stack:
        out.append(window.out_size(out[-1]) if window else out[-1])
    return out


def input_rows(stack: Stack, rows: int, a: int, b: int) -> list[tuple[int, int]]:
    """For output rows [a, b] of the stack over `rows` input rows, the rows each activation must hold
    (index 0: the stack's input, last: [a, b] itself), composed backward through every layer. An
    interval with first > last is empty (outputs that read only padding), and stays so."""
    heights = sizes(stack, rows)
    need = [(a, b)]
    for window, height in zip(reversed(stack), reversed(heights[:-1])):
        if window and need[-1][0] <= need[-1][1]:
            need.append(window.needs(*need[-1], height))
        else:
            need.append(need[-1])
    return need[::-1]


def determined_rows(stack: Stack, rows: int, first: int, last: int) -> list[tuple[int, int]] | None:
    """For input rows [first, last], the rows of every activation they alone determine (index 0: the
    slab itself), composed forward; None where some layer's part is empty."""
    heights = sizes(stack, rows)
    have = [(first, last)]
    for window, height in zip(stack, heights[:-1]):
        if window:
            nxt = window.determined(*have[-1], height)
            if nxt is None:
                return None
            have.append(nxt)
        else:
            have.append(have[-1])
    return have


@dataclass(frozen=True)
class Segment:
    """One piece of a group's output: rows [out_first, out_last], computed from input rows
    [in_first, in_last] by `worker` (an index) or by the host (`worker` None)."""

    worker: int | None
    in_first: int
    in_last: int
    out_first: int
    out_last: int

    @property
    def out_rows(self) -> int:
        return self.out_last - self.out_first + 1

    @property
    def in_rows(self) -> int:
        return self.in_last - self.in_first + 1

    def to_json(self) -> dict:
        return {"worker": self.worker, "in": [self.in_first, self.in_last], "out": [self.out_first, self.out_last]}

    @classmethod
    def from_json(cls, data: dict) -> Segment:
        return cls(data["worker"], *data["in"], *data["out"])


def segments(stack: Stack, rows: int, cuts: Sequence[int]) -> list[Segment] | None:
    """The segment plan of a stack over `rows` input rows, cut before each input row in `cuts`
    (increasing, inside the image): worker j holds input rows [cuts[j-1], cuts[j] - 1] and computes
    what they determine; the host computes each gap between workers' outputs (the overlap zone) from
    the input rows it needs. Segments come in output order; None where a worker's slab determines no
    output row (too thin for the stack's receptive field)."""
    bounds = [0, *cuts, rows]
    if any(lo >= hi for lo, hi in zip(bounds, bounds[1:])):
        raise ValueError(f"cuts {list(cuts)} must increase strictly inside 1..{rows - 1}")
    out_rows = sizes(stack, rows)[-1]
    plan: list[Segment] = []
    done = 0  # the next output row nobody computes yet
    for j, (lo, hi) in enumerate(zip(bounds, bounds[1:])):
        have = determined_rows(stack, rows, lo, hi - 1)
        if have is None:
            return None
        first, last = have[-1]
        if first > done:  # the overlap zone before this worker: the host's
            plan.append(_host(stack, rows, done, first - 1))
        plan.append(Segment(j, lo, hi - 1, first, last))
        done = last + 1
    if done < out_rows:  # rows past the last slab's reach (possible only with floor-sized outputs)
        plan.append(_host(stack, rows, done, out_rows - 1))
    return plan


def halo_segments(stack: Stack, rows: int, cuts: Sequence[int]) -> list[Segment] | None:
    """The segment plan that cuts the stack's output rows before each row in `cuts` (increasing):
    worker j computes output rows [cuts[j-1], cuts[j] - 1] from every input row they read, its
    slab overlapping its neighbours' by the receptive field's halo; no host piece. None where
    some worker's rows read only padding."""
    out_rows = sizes(stack, rows)[-1]
    bounds = [0, *cuts, out_rows]
    if any(lo >= hi for lo, hi in itertools.pairwise(bounds)):
        raise ValueError(f"output cuts {list(cuts)} must increase strictly inside 1..{out_rows - 1}")
    plan = []
    for j, (a, b) in enumerate(itertools.pairwise(bounds)):
        first, last = input_rows(stack, rows, a, b - 1)[0]
        if first > last:
            return None
        plan.append(Segment(j, first, last, a, b - 1))
    return plan


def _host(stack: Stack, rows: int, a: int, b: int) -> Segment:
    first, last = input_rows(stack, rows, a, b)[0]
    return Segment(None, first, last, a, b)
