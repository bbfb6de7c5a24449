"""The torch eager backend: the source model of record behind the StepModel protocol.

It is both the reference that every lowered artifact is validated against and the baseline
that `accelc bench` measures them against.
"""
from __future__ import annotations

import numpy as np

from accelc.runtime.base import KVState, KVStepModel


class TorchStepModel(KVStepModel):
    name = "torch"

    def __init__(self, model):
        import torch

        self._torch = torch
        self.model = model.eval()
        self.vocab_size = model.config.vocab_size

    def empty_state(self) -> KVState:
        return KVState(0, ())

    def extend(self, state: KVState, ids: np.ndarray):
        torch = self._torch
        from transformers import DynamicCache

        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if ids.size == 0:
            raise ValueError("extend needs at least one token")
        pairs = [(state.tensors[i], state.tensors[i + 1]) for i in range(0, len(state.tensors), 2)]
        cache = DynamicCache(pairs) if pairs else DynamicCache()
        with torch.inference_mode():
            positions = torch.arange(state.length, state.length + ids.size).unsqueeze(0)
            out = self.model(input_ids=torch.from_numpy(ids).unsqueeze(0), past_key_values=cache,
                             position_ids=positions, use_cache=True)
        cache = out.past_key_values
        tensors = []
        for layer in cache.layers:
            tensors += [layer.keys, layer.values]
        return out.logits[0].float().numpy(), KVState(state.length + ids.size, tuple(tensors))

    def kv_numpy(self, state: KVState) -> list[np.ndarray]:
        return [t.numpy() for t in state.tensors]
