"""The denoiser protocol: what a masked-diffusion sampler calls, on any backend.

A masked-diffusion LM has no autoregressive step: each call runs the whole bidirectional stack
over a sequence in which some positions hold the mask token, and returns logits for every
position (LLaDA, arXiv 2502.09992 §2). Approximate caches (Fast-dLLM, arXiv 2505.22618 §3.2)
feed only a window of the sequence and reuse the keys and values the other positions had in an
earlier call. So one call is

    denoiser(ids, start, context) -> (logits [n, vocab], keys/values of the window)

with `ids` the window's tokens at positions start .. start+n-1 and `context` the per-layer keys
and values ([1, kv_heads, P, head_dim], RoPE applied) of the P positions outside it, or None
for a call over the whole sequence. The logits are raw: for a model with `shift` 1 (Dream) the
prediction for position i is row i-1. `mask_id` and `shift` come from the model's config, so a
sampler needs nothing else to know about the model.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np

# per layer (keys, values), each [1, kv_heads, positions, head_dim] float32
KV = list[tuple[np.ndarray, np.ndarray]]


@runtime_checkable
class Denoiser(Protocol):
    name: str
    vocab_size: int
    mask_id: int
    shift: int
    eos_id: int | None

    def __call__(self, ids: np.ndarray, start: int = 0, context: KV | None = None) -> tuple[np.ndarray, KV]: ...


class TorchDenoiser:
    """The torch module of record (families/diffusion_lm_model.py) behind the protocol."""

    name = "torch"

    def __init__(self, model):
        import torch

        self._torch = torch
        self.model = model.eval()
        cfg = model.config
        self.vocab_size, self.mask_id, self.shift, self.eos_id = (
            cfg.vocab_size,
            cfg.mask_token_id,
            cfg.shift,
            cfg.eos_token_id,
        )

    def __call__(self, ids: np.ndarray, start: int = 0, context: KV | None = None) -> tuple[np.ndarray, KV]:
        torch = self._torch
        ids = np.asarray(ids, dtype=np.int64).reshape(1, -1)
        positions = torch.arange(start, start + ids.shape[1]).unsqueeze(0)
        past = None if context is None else [(torch.from_numpy(k), torch.from_numpy(v)) for k, v in context]
        with torch.inference_mode():
            logits, present = self.model(torch.from_numpy(ids), positions, past)
        return logits[0].numpy(), [(k.numpy(), v.numpy()) for k, v in present]

    def feature_cache(self):
        """A fresh dLLM-Cache over this model's layers (runtime/dllm_cache.py), for one generation."""
        from accelc.runtime.dllm_cache import FeatureCache

        return FeatureCache(self.model)
