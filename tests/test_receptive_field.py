"""Receptive-field intervals against brute-force dependency detection, and partitioned execution
bit-exact against the unpartitioned run, on random conv/pool stacks (stride, padding, dilation)."""

from __future__ import annotations

import random

import pytest
import torch
from torch import nn

from accelc.runtime import halp
from accelc.runtime.receptive_field import Window, determined_rows, halo_segments, input_rows, segments, sizes


def random_stack(rng: random.Random, rows: int, exact: bool = False):
    """A random stack of conv2d / max_pool2d / relu layers whose output keeps at least one row, and
    its input channels."""
    modules, channels = [], rng.randint(1, 3)
    in_channels = channels
    for _ in range(rng.randint(1, 4)):
        if rng.random() < 0.3:
            k = rng.randint(2, 3)
            module = nn.MaxPool2d(k, stride=rng.randint(1, k), padding=rng.randint(0, k // 2))
        else:
            k, d = rng.randint(1, 3), rng.randint(1, 2)
            out = rng.randint(1, 4)
            # a strided 1x1 convolution is the one oneDNN rounds differently by slab height (docs/halp.md)
            stride = 1 if k == 1 and exact else rng.randint(1, 2)
            module = nn.Conv2d(channels, out, k, stride=stride, padding=rng.randint(0, 2), dilation=d)
            channels = out
        stack = [halp.window_of(m) for m in [*modules, module]]
        if sizes(stack, rows)[-1] < 1:
            break
        modules += [module] + ([nn.ReLU()] if rng.random() < 0.5 else [])
    return nn.Sequential(*modules).eval(), in_channels


def test_one_layer_needs_match_the_formula():
    w = Window(kernel=3, stride=2, padding=1, dilation=2)
    assert w.needs(0, 0, 20) == (0, 3)
    assert w.needs(3, 5, 20) == (5, 13)
    assert w.needs(9, 9, 20) == (17, 19)  # clipped at the image's last row: the rest is padding


def test_vgg_block_needs_two_rows_each_side():
    # conv3x3 p1, conv3x3 p1, maxpool 2: pool rows [a, b] need input rows [2a - 2, 2b + 3]
    stack = [Window(3, 1, 1), None, Window(3, 1, 1), None, Window(2, 2)]
    assert input_rows(stack, 224, 10, 20)[0] == (18, 43)
    assert input_rows(stack, 224, 10, 20)[2] == (19, 42)


def monotone_twin(model: nn.Sequential) -> nn.Sequential:
    """The same windows with nothing that can hide a dependency: positive conv weights, average
    instead of max pooling, no ReLU. Raising any input row then raises every output it reaches."""
    layers = []
    for m in model:
        if isinstance(m, nn.Conv2d):
            twin = nn.Conv2d(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation)
            nn.init.uniform_(twin.weight, 0.5, 1.0)
            layers.append(twin)
        elif isinstance(m, nn.MaxPool2d):
            layers.append(nn.AvgPool2d(m.kernel_size, m.stride, m.padding))
    return nn.Sequential(*layers).double().eval()


@pytest.mark.parametrize("seed", range(16))
def test_intervals_hold_every_brute_force_dependency(seed):
    """Perturb one input row at a time and see which output rows change: each output's interval
    holds every row it depends on, and where windows leave no gaps (dilation 1, stride <= kernel)
    the interval is exactly the span of those rows (on the monotone twin; on the model itself a
    ReLU or a max may hide a dependency but never add one)."""
    rng = random.Random(seed)
    rows = rng.randint(6, 24)
    model, channels = random_stack(rng, rows)
    stack = [halp.window_of(m) for m in model]
    gapless = all(w is None or (w.dilation == 1 and w.stride <= w.kernel) for w in stack)
    out_rows = sizes(stack, rows)[-1]
    derived = [input_rows(stack, rows, o, o)[0] for o in range(out_rows)]
    torch.manual_seed(seed)
    twin = monotone_twin(model)
    model = model.double()
    x = torch.rand(1, channels, rows, rows, dtype=torch.float64)  # square: columns go through the same windows
    with torch.no_grad():
        for net in (twin, model):
            base = net(x)
            assert base.shape[2] == out_rows
            depends: dict[int, list[int]] = {o: [] for o in range(out_rows)}
            for r in range(rows):
                bumped = x.clone()
                bumped[:, :, r] += 1.0
                for o in torch.nonzero((net(bumped) != base).any(3).any(1)[0]).flatten().tolist():
                    depends[o].append(r)
            for o, (lo, hi) in enumerate(derived):
                assert all(lo <= r <= hi for r in depends[o]), (o, depends[o], (lo, hi))
                if net is twin and gapless:  # (an output that reads only padding has an empty interval)
                    span = (min(depends[o]), max(depends[o])) if depends[o] else None
                    assert span == ((lo, hi) if lo <= hi else None), (o, depends[o], (lo, hi))


@pytest.mark.parametrize("seed", range(8))
def test_determined_rows_are_the_largest_the_slab_fixes(seed):
    rng = random.Random(100 + seed)
    rows = rng.randint(8, 30)
    model, _ = random_stack(rng, rows)
    stack = [halp.window_of(m) for m in model]
    first = rng.randint(0, rows - 1)
    last = rng.randint(first, rows - 1)
    have = determined_rows(stack, rows, first, last)
    out_rows = sizes(stack, rows)[-1]
    inside = [o for o in range(out_rows) if first <= input_rows(stack, rows, o, o)[0][0]
              and input_rows(stack, rows, o, o)[0][1] <= last]  # fmt: skip
    if have is None:
        assert not inside
    else:
        assert list(range(have[-1][0], have[-1][1] + 1)) == inside


@pytest.mark.parametrize("seed", range(10))
def test_partitioned_execution_is_bit_exact(seed):
    rng = random.Random(200 + seed)
    plan_pieces = None
    while not plan_pieces:  # a stack and random cuts where every slab determines some output row
        rows = rng.randint(16, 40)
        model, channels = random_stack(rng, rows, exact=True)
        stack = [halp.window_of(m) for m in model]
        workers = rng.randint(2, 4)
        cuts = sorted(rng.sample(range(1, rows), workers - 1))
        plan_pieces = segments(stack, rows, cuts)
    torch.manual_seed(seed)
    out = plan_pieces
    assert [p.worker for p in out if p.worker is not None] == list(range(workers))
    assert out[0].out_first == 0 and out[-1].out_last == sizes(stack, rows)[-1] - 1
    assert all(a.out_last + 1 == b.out_first for a, b in zip(out, out[1:]))  # contiguous, no overlap
    worker_slabs = [(p.in_first, p.in_last) for p in out if p.worker is not None]
    assert all(a[1] < b[0] for a, b in zip(worker_slabs, worker_slabs[1:]))  # no row is sent twice
    group = halp.Group(0, len(model), rows, tuple(out))
    plan = halp.Plan(workers, 1, (group,), len(model))
    x = torch.randn(2, channels, rows, rows)
    got, want = halp.run_plan(list(model), plan, x), halp.reference(list(model), plan, x)
    assert torch.equal(got, want)


@pytest.mark.parametrize("seed", range(6))
def test_halo_plans_recompute_the_overlap_on_the_workers_bit_exact(seed):
    rng = random.Random(300 + seed)
    pieces = None
    while not pieces:
        rows = rng.randint(16, 40)
        model, channels = random_stack(rng, rows, exact=True)
        stack = [halp.window_of(m) for m in model]
        out_rows = sizes(stack, rows)[-1]
        if out_rows < 4:
            continue
        workers = rng.randint(2, min(4, out_rows))
        pieces = halo_segments(stack, rows, sorted(rng.sample(range(1, out_rows), workers - 1)))
    assert [p.worker for p in pieces] == list(range(workers))  # no host piece
    assert pieces[0].out_first == 0 and pieces[-1].out_last == out_rows - 1
    assert all(a.out_last + 1 == b.out_first for a, b in zip(pieces, pieces[1:]))
    for p in pieces:  # each slab is exactly what its rows read
        assert (p.in_first, p.in_last) == input_rows(stack, rows, p.out_first, p.out_last)[0]
    plan = halp.Plan(workers, 1, (halp.Group(0, len(model), rows, tuple(pieces)),), len(model))
    x = torch.randn(2, channels, rows, rows)
    assert torch.equal(halp.run_plan(list(model), plan, x), halp.reference(list(model), plan, x))
