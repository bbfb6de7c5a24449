"""The torch eager backend: the source model of record behind the StepModel protocol.

It is both the reference that every lowered artifact is validated against and the baseline
that `accelc bench` measures them against.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from accelc.runtime.artifact import HF_DIRS
from accelc.runtime.backends import Backend, register_backend
from accelc.runtime.base import KVState, KVStepModel, kv_length


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
            out = self.model(
                input_ids=torch.from_numpy(ids).unsqueeze(0),
                past_key_values=cache,
                position_ids=positions,
                use_cache=True,
            )
        cache = out.past_key_values
        tensors = []
        for layer in cache.layers:
            tensors += [layer.keys, layer.values]
        return out.logits[0].float().numpy(), KVState(state.length + ids.size, tuple(tensors))

    def kv_numpy(self, state: KVState) -> list[np.ndarray]:
        return [t.numpy() for t in state.tensors]

    def state_from_kv(self, kv) -> KVState:
        cfg = self.model.config
        heads = cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        n = kv_length(kv, cfg.num_hidden_layers, getattr(cfg, "num_key_value_heads", None) or heads, head_dim)
        return KVState(n, tuple(self._torch.from_numpy(np.array(t, dtype=np.float32)) for t in kv))


@register_backend
class TorchBackend(Backend):
    """torch eager on the artifact's own checkpoints: the reference every artifact carries."""

    name = "torch"  # torch is a core dependency: nothing optional to check
    families = ("causal_lm", "tarflow", "diffusion_lm")

    def held_roles(self) -> dict[str, object]:
        root = self.placement.artifact.dir
        return {role: root / rel for role, rel in HF_DIRS.items() if (root / rel / "config.json").exists()}

    def has_draft(self) -> bool:
        # A draft compressed from the target's own weights (`draft_source: from_target`) exists
        # only as its ONNX graph; artifacts of older accelc versions carried it on torch as the
        # target's own checkpoint too, which is no draft at all.
        plan = self.placement.artifact.plan
        from_target = plan.draft_source == "from_target" or plan.prompt_kv_from_target
        return "draft" in self.held_roles() and not from_target

    def files(self, role: str) -> list[Path]:
        return [self.held_roles()[role]]  # the checkpoint folder (Artifact.torch_model checks it too)

    def open(self, role: str, *, threads: int | None = None, alone_session: bool = False) -> TorchStepModel:
        return TorchStepModel(self.placement.artifact.torch_model(role))
