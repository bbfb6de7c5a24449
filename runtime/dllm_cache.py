"""dLLM-Cache (arXiv 2506.06295) on the torch denoiser: per-layer features reused between calls.

Every layer keeps, for every position, its keys and values, its attention output and its MLP
output, from the last call that computed them. The prompt's are recomputed every
`prompt_interval` calls, the response's every `response_interval` calls. In between, the response
is checked by V-verify: each response position's fresh value projection is compared (cosine
similarity) with its cached one, and only the `transfer_ratio` least similar positions get
fresh queries, keys, values, attention and MLP, scattered into the cache; the other positions
reuse their cached attention and MLP outputs on top of their current residual stream. Queries
use their true positions (RoPE), as the reference implementation does.

With both intervals 1, or with the prompt interval 1 and a transfer ratio of 1, every position
is recomputed and the call is exact; otherwise it is an approximation, as in the paper. It needs
the model's layers, so it exists on torch only.
"""

from __future__ import annotations

import numpy as np


class FeatureCache:
    def __init__(self, model):
        import torch

        self.torch = torch
        self.model = model
        self.layers: list[dict] | None = None

    def __call__(self, x: np.ndarray, prompt_length: int, refresh_prompt: bool, refresh_response: bool, ratio: float):
        """Raw logits [T, vocab] of the sequence `x` (one row per position)."""
        torch = self.torch
        model = self.model
        ids = torch.from_numpy(np.asarray(x, dtype=np.int64))[None]
        n = ids.shape[1]
        full = self.layers is None or (refresh_prompt and refresh_response)
        fresh = torch.zeros(n, dtype=torch.bool)
        if full:
            fresh[:] = True
            self.layers = [{} for _ in model.model.layers]
        elif refresh_prompt:
            fresh[:prompt_length] = True
        elif refresh_response:
            fresh[prompt_length:] = True
        with torch.inference_mode():
            h = model.model.embed_tokens(ids)
            cos, sin = model.rope(torch.arange(n)[None])
            for layer, cache in zip(model.model.layers, self.layers):
                h = self._layer(layer, cache, h, cos, sin, fresh, prompt_length, ratio, full)
            return model.hidden_logits(h)[0].numpy()

    def _layer(self, layer, cache, h, cos, sin, fresh, prompt_length, ratio, full):
        torch = self.torch
        attn = layer.self_attn
        normed = layer.input_layernorm(h)
        rows = fresh.clone()
        if not full and ratio > 0 and not rows[prompt_length:].all():
            # V-verify: the response positions whose value projection moved most are recomputed
            v_new = attn.v_proj(normed[0, prompt_length:])
            v_old = cache["v"][0].transpose(0, 1).reshape(h.shape[1], -1)[prompt_length:]
            similarity = torch.nn.functional.cosine_similarity(v_new, v_old, dim=-1)
            count = int(np.ceil(ratio * similarity.numel()))
            rows[prompt_length + torch.argsort(similarity, stable=True)[:count]] = True
        index = rows.nonzero()[:, 0]
        b, heads, kv_heads, d = 1, attn.heads, attn.kv_heads, attn.head_dim
        part = normed[:, index]
        q = attn.q_proj(part).view(b, -1, heads, d).transpose(1, 2)
        k = attn.k_proj(part).view(b, -1, kv_heads, d).transpose(1, 2)
        v = attn.v_proj(part).view(b, -1, kv_heads, d).transpose(1, 2)
        c, s = cos[:, :, index], sin[:, :, index]
        from accelc.families.diffusion_lm_model import rotate

        q, k = rotate(q, c, s), rotate(k, c, s)
        if full:
            cache["k"], cache["v"] = k, v
        else:
            cache["k"][:, :, index], cache["v"][:, :, index] = k, v
        keys, values = cache["k"], cache["v"]
        if heads > kv_heads:
            keys, values = keys.repeat_interleave(heads // kv_heads, 1), values.repeat_interleave(heads // kv_heads, 1)
        out = torch.softmax((q @ keys.transpose(-1, -2)) / d**0.5, dim=-1) @ values
        attn_out = attn.o_proj(out.transpose(1, 2).reshape(b, index.numel(), heads * d))
        if full:
            cache["attn"] = attn_out
        else:
            cache["attn"][:, index] = attn_out
        mid = h + cache["attn"]
        mlp_out = layer.mlp(layer.post_attention_layernorm(mid[:, index]))
        if full:
            cache["mlp"] = mlp_out
        else:
            cache["mlp"][:, index] = mlp_out
        return mid + cache["mlp"]
