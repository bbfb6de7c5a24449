"""What a diffusion sampler's step sees of the model: predictions for the current block, computed
over the whole sequence or over a window with the other positions' keys and values cached.

- `none`: every call runs the whole sequence (exact).
- `prefix` (Fast-dLLM PrefixCache, arXiv 2505.22618 §3.2): a call over the whole sequence at the
  start of each block keeps the keys and values of the positions before the block; the block's
  later calls feed the block and everything after it.
- `dual` (Fast-dLLM DualCache): also keeps those of the positions after the block; later calls
  feed the block alone.

- `dllm_cache` (dLLM-Cache, arXiv 2506.06295): every call runs the whole sequence, but each layer
  reuses its cached features: the prompt's refreshed every `prompt_interval` calls, the response's
  every `response_interval` calls, in between only the `transfer_ratio` of response positions
  whose values moved most (runtime/dllm_cache.py; torch only).

All are approximate (the cached positions' keys and values are those of the refresh call, while
the block changes), and exact when refreshed every step (`refresh_every` 1; intervals 1). A model whose token
i is predicted at i-1 (Dream, `shift` 1) gets one more position fed before the block, the last
decoded one, whose hidden state predicts the block's first token.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from accelc.errors import UsageError
from accelc.runtime.denoiser import KV, Denoiser

CACHES = ("none", "prefix", "dual", "dllm_cache")


@dataclass
class CallStats:
    calls: int = 0
    tokens_fed: int = 0
    seconds: float = 0.0
    padding_calls: int = 0  # calls whose commits were all end-of-text (counted by the sampler)


class ModelView:
    def __init__(
        self, denoiser: Denoiser, cache: str = "none", refresh_every: int | None = None, *, prompt_length=0, dllm=None
    ):
        self.denoiser, self.cache, self.refresh_every = denoiser, cache, refresh_every
        self.stats = CallStats()
        self._kv: KV | None = None
        self._since_refresh = 0
        self.prompt_length, self.dllm = prompt_length, dllm  # dllm: (prompt_interval, response_interval, ratio)
        self._features = None
        if cache == "dllm_cache":
            if not hasattr(denoiser, "feature_cache"):
                raise UsageError(
                    f"cache 'dllm_cache' reuses the model's per-layer features and runs on torch only, "
                    f"not on {denoiser.name}; choose prefix or dual"
                )
            self._features = denoiser.feature_cache()

    def begin_block(self) -> None:
        """A new block: the next call refreshes the cache."""
        self._kv = None

    def _call(self, ids: np.ndarray, start: int, context: KV | None):
        t0 = time.perf_counter()
        out = self.denoiser(ids, start, context)
        self.stats.calls += 1
        self.stats.tokens_fed += len(ids)
        self.stats.seconds += time.perf_counter() - t0
        return out

    def predict(self, x: np.ndarray, lo: int, hi: int) -> np.ndarray:
        """Logits predicting positions lo..hi-1 of `x` (lo >= shift: the prompt is never empty)."""
        shift = self.denoiser.shift
        if self._features is not None:
            prompt_every, response_every, ratio = self.dllm
            k = self.stats.calls
            t0 = time.perf_counter()
            logits = self._features(x, self.prompt_length, k % prompt_every == 0, k % response_every == 0, ratio)
            self.stats.calls += 1
            self.stats.tokens_fed += len(x)
            self.stats.seconds += time.perf_counter() - t0
            return logits[lo - shift : hi - shift]
        stale = self.refresh_every is not None and self._since_refresh >= self.refresh_every
        if self.cache == "none" or self._kv is None or stale:
            logits, kv = self._call(x, 0, None)
            if self.cache != "none":
                self._kv, self._since_refresh = kv, 1
            return logits[lo - shift : hi - shift]
        start = lo - shift
        end = hi if self.cache == "dual" else len(x)
        context = [
            (
                np.concatenate([k[:, :, :start], k[:, :, end:]], axis=2),
                np.concatenate([v[:, :, :start], v[:, :, end:]], axis=2),
            )
            for k, v in self._kv
        ]
        logits, _ = self._call(x[start:end], start, context)
        self._since_refresh += 1
        return logits[: hi - lo]
