"""Autoregressive decoding over a StepModel: greedy, or sampling with temperature/top-k/top-p.

The baseline every generation-loop rewrite is measured against and must reproduce (greedy).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from accelc.loops import registry
from accelc.runtime.base import StepModel


@dataclass(frozen=True)
class Sampler:
    """How a token is picked from logits. temperature == 0 means greedy (argmax)."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def probs(self, logits: np.ndarray) -> np.ndarray:
        """The distribution the sampler draws from (float64 for exactness tests)."""
        z = logits.astype(np.float64) / self.temperature
        if self.top_k > 0 and self.top_k < z.size:
            kth = np.partition(z, -self.top_k)[-self.top_k]
            z = np.where(z < kth, -np.inf, z)
        z -= z.max()
        p = np.exp(z)
        p /= p.sum()
        if self.top_p < 1.0:
            order = np.argsort(-p, kind="stable")
            cum = np.cumsum(p[order])
            # keep the smallest prefix whose mass reaches top_p (always at least one token)
            cutoff = int(np.searchsorted(cum, self.top_p)) + 1
            mask = np.zeros_like(p, dtype=bool)
            mask[order[:cutoff]] = True
            p = np.where(mask, p, 0.0)
            p /= p.sum()
        return p

    def pick(self, logits: np.ndarray, rng: np.random.Generator) -> int:
        if self.temperature == 0.0:
            return int(np.argmax(logits))
        p = self.probs(logits)
        return int(rng.choice(p.size, p=p))


@dataclass
class GenerationResult:
    tokens: list[int]
    prefill_seconds: float
    decode_seconds: float
    stats: dict = field(default_factory=dict)

    @property
    def decode_tokens_per_second(self) -> float:
        n = max(len(self.tokens) - 1, 0)  # the first token comes from prefill
        return n / self.decode_seconds if self.decode_seconds > 0 else float("nan")


def generate(
    model: StepModel,
    prompt: list[int],
    max_new_tokens: int,
    *,
    sampler: Sampler = Sampler(),
    eos_ids: tuple[int, ...] = (),
    seed: int = 0,
) -> GenerationResult:
    if not prompt:
        raise ValueError("the prompt has no tokens")
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    logits, state = model.prefill(np.asarray(prompt, dtype=np.int64))
    t1 = time.perf_counter()
    tokens = [sampler.pick(logits[-1], rng)]
    calls = 1
    while len(tokens) < max_new_tokens and tokens[-1] not in eos_ids:
        logits, state = model.extend(state, np.asarray(tokens[-1:], dtype=np.int64))
        tokens.append(sampler.pick(logits[-1], rng))
        calls += 1
    t2 = time.perf_counter()
    return GenerationResult(tokens, t1 - t0, t2 - t1, {"target_calls": calls})


def _generate(target, draft, prompt, max_new_tokens, options, *, sampler, eos_ids, seed) -> GenerationResult:
    return generate(target, list(prompt), max_new_tokens, sampler=sampler, eos_ids=tuple(eos_ids), seed=seed)


registry.register_loop(registry.Loop("greedy", _generate))
registry.register_loop(registry.Loop("sample", _generate))
