"""Sampling an autoregressive flow: sequential, Jacobi, Gauss-Seidel-Jacobi and SeJD schedules.

Inverting one block is a lower-triangular nonlinear system, x_t = z_t exp(a_t(x_<t)) + b_t(x_<t)
(TarFlow, arXiv 2412.06329, eq. 4). Every schedule here solves it chunk by chunk, written once
against the flow-block protocol (runtime/flow.py):

- a chunk of `chunk` consecutive tokens is solved by Jacobi iteration: all its tokens updated at
  once from the previous iterate, x^(k+1)_t = z_t exp(a_t(x^(k)_<t)) + b_t(x^(k)_<t), with one
  `extend` call that feeds the chunk's inputs after the cache of the tokens before it (the cache
  is rolled back to that prefix for the next iteration: states are values);
- chunks run one after another (Gauss-Seidel across chunks: Liu and Qin, arXiv 2505.12849, GS-Jacobi);
- `chunk` 1 is sequential decoding with the KV cache (one call a token, exact), and a chunk
  covering the whole block is plain Jacobi (Song et al., arXiv 2002.03629 for the iteration;
  Zhang et al., arXiv 2505.24791 for flows), which uses the cache-free `params` call.

Stopping rule per chunk: the relative change ||x^(k+1) - x^(k)|| / ||x^(k+1)|| over the chunk and
the batch at most `tol`, or the chunk's length in iterations, after which it is exact: after k
iterations the first k tokens of a chunk equal the sequential solution (the triangular dependency,
induction on k), so no chunk takes more iterations than it has tokens, and `tol` 0 reproduces
sequential sampling to float precision. A block's iterations are the sum over its chunks.

SeJD (Zhang et al., arXiv 2505.24791) decodes the blocks whose Jacobi iterations are many
("low dependency redundancy") sequentially and the others by Jacobi; `sejd_schedule` chooses per
block from the iterations measured on calibration noise and the measured cost of a Jacobi call
relative to a one-token step (`measure_costs`), by which of the two is predicted faster.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from accelc.runtime.flow import FlowModel


@dataclass(frozen=True)
class BlockSchedule:
    chunk: int  # tokens solved together: 1 is sequential; >= tokens - 1 is Jacobi over the block
    tol: float = 0.0  # relative-change stopping threshold per chunk

    def to_json(self) -> dict:
        return {"chunk": self.chunk, "tol": self.tol}


@dataclass(frozen=True)
class FlowSchedule:
    name: str
    blocks: tuple[BlockSchedule, ...]  # density order, as FlowModel.blocks

    @classmethod
    def uniform(cls, name: str, blocks: int, chunk: int, tol: float = 0.0) -> FlowSchedule:
        return cls(name, tuple(BlockSchedule(chunk, tol) for _ in range(blocks)))

    @classmethod
    def sequential(cls, blocks: int) -> FlowSchedule:
        return cls.uniform("sequential", blocks, 1)

    @classmethod
    def jacobi(cls, model: FlowModel, tol: float) -> FlowSchedule:
        return cls.uniform("jacobi", len(model.blocks), model.tokens - 1, tol)

    @classmethod
    def gs_jacobi(cls, model: FlowModel, chunk: int, tol: float) -> FlowSchedule:
        return cls.uniform("gs_jacobi", len(model.blocks), chunk, tol)

    def to_json(self) -> dict:
        return {"name": self.name, "blocks": [b.to_json() for b in self.blocks]}

    @classmethod
    def from_json(cls, data: dict) -> FlowSchedule:
        return cls(data["name"], tuple(BlockSchedule(int(b["chunk"]), float(b["tol"])) for b in data["blocks"]))


@dataclass
class SampleStats:
    iterations: list[int] = field(default_factory=list)  # per block, density order
    calls: list[int] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)

    @property
    def total_calls(self) -> int:
        return sum(self.calls)


def relative_change(new: np.ndarray, old: np.ndarray) -> float:
    scale = float(np.linalg.norm(new))
    return float(np.linalg.norm(new - old)) / scale if scale > 0 else float(np.linalg.norm(new - old))


def invert_block(block, z: np.ndarray, plan: BlockSchedule) -> tuple[np.ndarray, int, int]:
    """x with block(x) = z, all in the block's token order: (x, iterations, calls)."""
    tokens = z.shape[1]
    x = z.copy()  # the initial guess; token 0 is already exact (its a, b are zero)
    if plan.chunk >= tokens - 1:
        for it in range(1, tokens):
            a, b = block.params(x)
            new = z * np.exp(a) + b
            change = relative_change(new, x)
            x = new
            if it >= tokens - 1 or change <= plan.tol:
                return x, it, it
    iterations = calls = 0
    state = block.empty(z.shape[0])
    start = 1
    while start < tokens:
        end = min(start + plan.chunk, tokens)
        prefix = state  # the cache of tokens < start - 1, which every iteration extends afresh
        for it in range(1, end - start + 1):
            state, a, b = block.extend(prefix, x[:, start - 1 : end - 1])
            new = z[:, start:end] * np.exp(a) + b
            change = relative_change(new, x[:, start:end])
            x[:, start:end] = new
            calls += 1
            # after `it` iterations the chunk's first `it` tokens are exact, so the cache just
            # fed (tokens start-1 .. end-2) is exact once `it` reaches the chunk's length
            if it >= end - start or change <= plan.tol:
                break
        iterations += it
        start = end
    return x, iterations, calls


def sample(model: FlowModel, z: np.ndarray, schedule: FlowSchedule) -> tuple[np.ndarray, SampleStats]:
    """Invert every block, last to first, from prior noise z (N, T, D): patches and statistics."""
    if len(schedule.blocks) != len(model.blocks):
        raise ValueError(f"schedule '{schedule.name}' has {len(schedule.blocks)} blocks, the model {len(model.blocks)}")
    stats = SampleStats([0] * len(model.blocks), [0] * len(model.blocks), [0.0] * len(model.blocks))
    x = np.asarray(z, dtype=np.float32)
    for index in reversed(range(len(model.blocks))):
        start = time.perf_counter()
        xp, stats.iterations[index], stats.calls[index] = invert_block(
            model.blocks[index], np.ascontiguousarray(model.permute(index, x)), schedule.blocks[index]
        )
        x = np.ascontiguousarray(model.permute(index, xp))
        stats.seconds[index] = time.perf_counter() - start
    return x, stats


def sample_in_batches(
    model: FlowModel, z: np.ndarray, schedule: FlowSchedule, batch: int
) -> tuple[np.ndarray, SampleStats]:
    """`sample` over z `batch` rows at a time: calls and seconds summed over the batches,
    iterations per block their mean (rounded to 0.1)."""
    parts, runs = [], []
    for start in range(0, len(z), batch):
        x, stats = sample(model, z[start : start + batch], schedule)
        parts.append(x)
        runs.append(stats)
    total = SampleStats(
        [round(float(np.mean(n)), 1) for n in zip(*(r.iterations for r in runs))],
        [sum(n) for n in zip(*(r.calls for r in runs))],
        [sum(n) for n in zip(*(r.seconds for r in runs))],
    )
    return np.concatenate(parts), total


def prior_noise(model: FlowModel, samples: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((samples, model.tokens, model.token_dim)).astype(np.float32)


def call_cost(model: FlowModel, batch: int, chunk: int, repeats: int = 5, min_seconds: float = 0.05) -> float:
    """Median seconds of one call on `batch` rows as a schedule of `chunk` makes it, on the last
    block (the first sampled): the cache-free full call for a whole-block chunk, else a sweep of
    `extend` calls of `chunk` tokens over the sequence, so the cost includes the cache's growth as
    sampling sees it. Each measurement repeats its calls for at least `min_seconds`, so a call of
    a fraction of a millisecond is not timed alone on a loaded machine."""
    block = model.blocks[-1]
    x = prior_noise(model, batch, seed=0)
    steps = model.tokens - 1

    def calls_once() -> int:
        if chunk >= steps:
            block.params(x)
            return 1
        state, calls = block.empty(batch), 0
        for t in range(0, steps, chunk):
            state, _, _ = block.extend(state, x[:, t : min(t + chunk, steps)])
            calls += 1
        return calls

    calls_once()  # warm-up: first-call allocations and lazy initialisation are not a call's cost
    times = []
    for _ in range(repeats):
        calls, start = 0, time.perf_counter()
        while calls == 0 or time.perf_counter() - start < min_seconds:
            calls += calls_once()
        times.append((time.perf_counter() - start) / calls)
    return float(np.median(times))


@dataclass(frozen=True)
class CallCosts:
    """Seconds of one `params` call (Jacobi) and of one one-token `extend` (sequential) at this batch."""

    full_s: float
    step_s: float

    @property
    def ratio(self) -> float:
        return self.full_s / self.step_s


def measure_costs(model: FlowModel, batch: int, repeats: int = 5) -> CallCosts:
    return CallCosts(call_cost(model, batch, model.tokens - 1, repeats), call_cost(model, batch, 1, repeats))


def calibrate_iterations(model: FlowModel, z: np.ndarray, tol: float, batch: int | None = None) -> list[float]:
    """Jacobi iterations per block (density order) to reach `tol` on calibration noise z, drawn
    `batch` rows at a time (all at once by default), averaged over the batches."""
    _, stats = sample_in_batches(model, z, FlowSchedule.jacobi(model, tol), batch or len(z))
    return stats.iterations


def cheapest_chunks(
    calls: dict[int, list[float]], costs: dict[int, float], min_gain: float = 1.0
) -> tuple[list[int], float]:
    """Per block, the chunk length with the smallest predicted time (its measured calls x the
    cost of one call of that length; ties go to the shorter chunk), and the predicted gain over
    sequential (`calls[1]`); all sequential when that gain is under `min_gain`."""
    lengths = sorted(costs)
    blocks = range(len(calls[1]))
    chosen = [min(lengths, key=lambda c: calls[c][b] * costs[c]) for b in blocks]
    gain = sum(calls[1][b] * costs[1] for b in blocks) / sum(calls[c][b] * costs[c] for b, c in enumerate(chosen))
    return (chosen, gain) if gain >= min_gain else ([1] * len(chosen), gain)


def fastest_step_threads(costs: dict[int, dict[int, float]]) -> int:
    """The thread count of the cheapest one-token step (ties: fewer threads): sequential's."""
    return min(costs, key=lambda t: (costs[t][1], t))


def cheapest_threads(
    calls: dict[int, list[float]], costs: dict[int, dict[int, float]], min_gain: float = 1.0
) -> tuple[int, list[int], float]:
    """Over thread counts (`costs[threads][chunk]`: seconds of one call): each count's cheapest
    chunks per block, the count with the smallest predicted time (ties: fewer threads), and its
    gain over sequential at sequential's own fastest count, since a deployment of sequential
    sampling would run there too; sequential at that count when the gain is under `min_gain`.
    A one-token step is mostly call overhead at small batches, where fewer threads are faster."""
    blocks = len(calls[1])

    def predicted(threads: int, chosen: list[int]) -> float:
        return sum(calls[c][b] * costs[threads][c] for b, c in enumerate(chosen))

    sequential = fastest_step_threads(costs)
    options = {t: cheapest_chunks(calls, costs[t])[0] for t in costs}
    threads = min(costs, key=lambda t: (predicted(t, options[t]), t))
    gain = predicted(sequential, [1] * blocks) / predicted(threads, options[threads])
    return (threads, options[threads], gain) if gain >= min_gain else (sequential, [1] * blocks, gain)


def sejd_schedule(model: FlowModel, iterations: list[float], cost_ratio: float, tol: float) -> FlowSchedule:
    """SeJD: Jacobi where its measured iterations cost less than T - 1 sequential steps
    (iterations x cost_ratio < T - 1, the ratio being a Jacobi call's cost in one-token steps),
    sequential elsewhere."""
    steps = model.tokens - 1
    calls = {1: [steps] * len(iterations), steps: list(iterations)}
    chosen, _ = cheapest_chunks(calls, {1: 1.0, steps: cost_ratio})
    return FlowSchedule("sejd", tuple(BlockSchedule(c, tol) for c in chosen))
