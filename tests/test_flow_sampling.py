"""Flow sampling schedules (loops/flow_sampling.py) on a tiny seeded TarFlow."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from accelc.families.tarflow import TINY_CONFIG, tiny_model
from accelc.loops import flow_sampling as fs
from accelc.runtime.flow import torch_flow_model

T = TINY_CONFIG.tokens


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def flow(model):
    return torch_flow_model(model)


@pytest.fixture(scope="module")
def noise(flow):
    return fs.prior_noise(flow, 8, seed=1)


@pytest.fixture(scope="module")
def reference(flow, noise):
    return fs.sample(flow, noise, fs.FlowSchedule.sequential(len(flow.blocks)))


def schedules(flow, tol):
    k = len(flow.blocks)
    return [
        fs.FlowSchedule.jacobi(flow, tol),
        fs.FlowSchedule.gs_jacobi(flow, 4, tol),
        fs.FlowSchedule.gs_jacobi(flow, 6, tol),
        fs.FlowSchedule("mixed", (fs.BlockSchedule(1, tol), fs.BlockSchedule(T - 1, tol)) * (k // 2)),
    ]


def test_extend_over_the_sequence_equals_the_full_call(flow, noise):
    block = flow.blocks[0]
    a, b = block.params(noise)
    state, a2, b2 = block.extend(block.empty(len(noise)), noise[:, :5])
    state, a3, b3 = block.extend(state, noise[:, 5:-1])
    np.testing.assert_allclose(np.concatenate([a2, a3], 1), a[:, 1:], atol=1e-5)
    np.testing.assert_allclose(np.concatenate([b2, b3], 1), b[:, 1:], atol=1e-5)
    assert np.abs(a).max() > 0.05  # the tiny model's blocks are not the identity


def test_sequential_sampling_inverts_the_flow(model, flow, reference, noise):
    x, stats = reference
    with torch.no_grad():
        z, _ = model(torch.from_numpy(x))
    np.testing.assert_allclose(z.detach().numpy(), noise, atol=1e-4)
    assert stats.calls == [T - 1] * len(flow.blocks)
    assert stats.iterations == [T - 1] * len(flow.blocks)


def test_tolerance_zero_equals_sequential(flow, noise, reference):
    for schedule in schedules(flow, 0.0):
        x, stats = fs.sample(flow, noise, schedule)
        np.testing.assert_allclose(x, reference[0], atol=1e-5, err_msg=schedule.name)
        assert all(0 < n <= T - 1 for n in stats.iterations), (schedule.name, stats.iterations)


@pytest.mark.parametrize("tol", [1e-2, 1e-4])
def test_iterations_never_exceed_the_sequence_and_samples_stay_within_tolerance(flow, noise, reference, tol):
    for schedule in schedules(flow, tol):
        x, stats = fs.sample(flow, noise, schedule)
        assert all(0 < n < T for n in stats.iterations), (schedule.name, stats.iterations)
        error = np.linalg.norm(x - reference[0]) / np.linalg.norm(reference[0])
        assert error <= 10 * tol, (schedule.name, error)


def test_jacobi_needs_fewer_calls_than_sequential_on_a_smooth_flow(flow, noise):
    _, stats = fs.sample(flow, noise, fs.FlowSchedule.jacobi(flow, 1e-4))
    assert stats.total_calls < len(flow.blocks) * (T - 1)


def test_sejd_is_sequential_exactly_where_jacobi_is_predicted_slower(flow):
    steps = T - 1
    schedule = fs.sejd_schedule(flow, [steps, 3, 8, 7], cost_ratio=2.0, tol=1e-3)
    assert [b.chunk for b in schedule.blocks] == [1, steps, 1, steps]  # 8 x 2 >= 15 steps; 7 x 2 < 15
    iterations = fs.calibrate_iterations(flow, fs.prior_noise(flow, 4, seed=2), 1e-3)
    assert len(iterations) == len(flow.blocks) and all(0 < n < T for n in iterations)


def test_each_block_gets_its_cheapest_predicted_chunk_and_sequential_stays_without_a_gain():
    calls = {1: [15, 15, 15], 4: [8, 6, 15], 15: [2, 9, 15]}
    chosen, gain = fs.cheapest_chunks(calls, {1: 1.0, 4: 1.5, 15: 4.0}, min_gain=1.05)
    assert chosen == [15, 4, 1]  # predicted 8 < 12 < 15; 9 < 15 < 36; 15 < 22.5 < 60
    assert gain == pytest.approx(45 / (8 + 9 + 15))
    chosen, gain = fs.cheapest_chunks(calls, {1: 1.0, 4: 2.4, 15: 7.4}, min_gain=1.05)
    assert chosen == [1, 1, 1] and gain == pytest.approx(45 / (14.8 + 14.4 + 15))  # under 1.05


def test_the_thread_count_is_chosen_by_predicted_time_and_the_gain_is_over_the_fastest_sequential():
    calls = {1: [15, 15], 15: [3, 12]}
    # one thread: steps cheap, full calls dear; two threads: steps dearer (waking the pool), full calls cheaper
    costs = {1: {1: 1.0, 15: 4.0}, 2: {1: 1.6, 15: 2.0}}
    # 1 thread: [15, 1] -> 12 + 15 = 27; 2 threads: [15, 1] -> 6 + 24 = 30 (a tie goes to the shorter chunk)
    threads, chosen, gain = fs.cheapest_threads(calls, costs, min_gain=1.05)
    assert (threads, chosen, gain) == (1, [15, 1], pytest.approx(30 / 27))
    costs[2][15] = 1.0  # now two threads' Jacobi (3 + 12 = 15) beats everything
    threads, chosen, gain = fs.cheapest_threads(calls, costs, min_gain=1.05)
    # the gain is against sequential at one thread (30), not at two (48)
    assert (threads, chosen, gain) == (2, [15, 15], pytest.approx(30 / 15))
    costs = {1: {1: 1.0, 15: 10.0}, 2: {1: 1.6, 15: 10.0}}  # no gain: sequential at its own fastest count
    assert fs.cheapest_threads(calls, costs, min_gain=1.05) == (1, [1, 1], pytest.approx(1.0))


def test_thread_counts_to_time():
    from accelc.passes.jacobi import thread_counts

    assert thread_counts(3, "ort") == [3] and thread_counts(0, "torch") == [0]
    counts = thread_counts(0, "ort")
    cores = len(os.sched_getaffinity(0))
    assert counts[0] == 1 and counts[-1] == cores and all(b > a for a, b in zip(counts, counts[1:]))


def test_a_schedule_must_cover_every_block(flow, noise):
    with pytest.raises(ValueError, match="2 blocks"):
        fs.sample(flow, noise, fs.FlowSchedule.uniform("short", 2, 1))
    schedule = fs.FlowSchedule.gs_jacobi(flow, 4, 1e-3)
    assert fs.FlowSchedule.from_json(schedule.to_json()) == schedule


def test_the_jacobi_pass_plans_the_fastest_tolerance_within_the_quality_bound():
    from accelc.passes.jacobi import Tried, fastest_within

    def tried(tol, gain, diff):
        return Tried(tol, fs.FlowSchedule.sequential(2), {}, gain, diff)

    strict, middle, loose = tried(1e-3, 1.5, 0.0001), tried(3e-3, 2.0, 0.002), tried(1e-2, 2.6, 0.009)
    assert fastest_within([strict, middle, loose], 1 / 255, 1.05) is middle  # loose moves the samples too far
    assert fastest_within([strict, middle, loose], 0.01, 1.05) is loose
    assert fastest_within([strict, middle, loose], 0.0, 1.05) is None  # nothing within: sequential
    assert fastest_within([strict, tried(3e-3, 1.5, 0.0)], 1 / 255, 1.05) is strict  # ties go to the stricter
    assert fastest_within([tried(1e-3, 1.02, 0.0)], 1 / 255, 1.05) is None  # no gain worth the noise
