"""The autoregressive loop and its sampler, on a table model whose answers are known exactly."""

from __future__ import annotations

import numpy as np
import pytest

from accelc.loops.autoregressive import Sampler, generate
from accelc.runtime.base import KVState, KVStepModel


class BigramModel(KVStepModel):
    """logits of the next token depend only on the current one: a [V, V] table. The 'KV state'
    is the token history, so truncate/extend semantics are exercised as with a real cache."""

    name = "bigram"

    def __init__(self, table: np.ndarray):
        self.table = table
        self.vocab_size = table.shape[0]

    def empty_state(self):
        return KVState(0, (np.zeros((1, 1, 0, 1)),))

    def extend(self, state, ids):
        ids = np.asarray(ids).reshape(-1)
        hist = np.concatenate([state.tensors[0], ids.reshape(1, 1, -1, 1).astype(float)], axis=2)
        return self.table[ids].astype(np.float32), KVState(state.length + ids.size, (hist,))


def test_greedy_follows_the_table_and_stops_at_eos():
    table = np.full((5, 5), -10.0)
    for a, b in [(0, 2), (2, 3), (3, 1), (1, 4)]:
        table[a, b] = 5.0
    result = generate(BigramModel(table), [0], 10, eos_ids=(4,))
    assert result.tokens == [2, 3, 1, 4]
    assert result.stats["target_calls"] == 4


def test_truncate_then_extend_equals_fresh_computation():
    rng = np.random.default_rng(0)
    model = BigramModel(rng.normal(size=(7, 7)))
    _, state = model.prefill(np.array([1, 2, 3, 4]))
    cut = model.truncate(state, 2)
    logits, again = model.extend(cut, np.array([5]))
    fresh_logits, fresh = model.prefill(np.array([1, 2, 5]))
    assert again.length == fresh.length == 3
    np.testing.assert_array_equal(again.tensors[0], fresh.tensors[0])
    np.testing.assert_array_equal(logits[-1], fresh_logits[-1])
    with pytest.raises(ValueError):
        model.truncate(state, 9)


def test_top_k_and_top_p_keep_the_right_support():
    logits = np.log(np.array([0.5, 0.25, 0.15, 0.1]))
    p = Sampler(temperature=1.0, top_k=2).probs(logits)
    np.testing.assert_allclose(p, [2 / 3, 1 / 3, 0, 0])
    p = Sampler(temperature=1.0, top_p=0.7).probs(logits)  # 0.5 < 0.7 <= 0.75: two tokens
    np.testing.assert_allclose(p, [2 / 3, 1 / 3, 0, 0])
    p = Sampler(temperature=1.0, top_p=0.5).probs(logits)  # exactly reaches 0.5 with one token
    np.testing.assert_allclose(p, [1, 0, 0, 0])
    p = Sampler(temperature=2.0).probs(logits)
    q = np.sqrt([0.5, 0.25, 0.15, 0.1])
    np.testing.assert_allclose(p, q / q.sum())


def test_sampling_draws_from_the_stated_distribution():
    """Chi-square goodness of fit of 20k first tokens against the sampler's own probabilities."""
    logits = np.log(np.array([0.4, 0.3, 0.2, 0.1]))
    table = np.tile(logits, (4, 1))
    model = BigramModel(table)
    sampler = Sampler(temperature=1.0)
    rng = np.random.default_rng(1)
    n = 20000
    counts = np.bincount([sampler.pick(logits, rng) for _ in range(n)], minlength=4)
    expected = sampler.probs(logits) * n
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 16.27  # p = 0.001 critical value for 3 degrees of freedom
    # and the full loop is seeded: same seed, same continuation
    a = generate(model, [0], 16, sampler=sampler, seed=7).tokens
    b = generate(model, [0], 16, sampler=sampler, seed=7).tokens
    assert a == b
