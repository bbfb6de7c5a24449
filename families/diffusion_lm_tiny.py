"""Tiny seeded masked-diffusion LMs of both architectures, in their published folder layouts.

They are the test models of the diffusion family: a LLaDA-style folder (OLMo weight names,
multi-head attention, no logit shift) and a Dream-style one (Qwen2 names, grouped-query
attention with q/k/v biases, logit shift), each with the byte-level tokenizer of the causal-LM
test models (families/tiny.py) plus a mask token, read by the same loader as a real checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

SEED = 0
MASK_TOKEN = "<|mdm_mask|>"

TINY = {
    "tiny-llada": dict(architecture="llada", num_kv_heads=4, qkv_bias=False, tie_embeddings=False),
    "tiny-dream": dict(architecture="dream", num_kv_heads=2, qkv_bias=True, tie_embeddings=False),
}


def build(name: str, directory: Path) -> Path:
    """Write the seeded tiny model `name` into `directory`."""
    import torch

    from accelc.families import diffusion_lm_model as dm
    from accelc.families.tiny import byte_tokenizer

    tokenizer = byte_tokenizer()
    tokenizer.add_special_tokens({"mask_token": MASK_TOKEN})
    cfg = dm.DiffusionConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=176,
        num_layers=2,
        num_heads=4,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        mask_token_id=tokenizer.mask_token_id,
        eos_token_id=tokenizer.eos_token_id,
        max_positions=512,
        **TINY[name],
    )
    torch.manual_seed(SEED)
    model = dm.DiffusionLM(cfg)
    # as for the causal test models: a wide init makes confidences decisive, so token-for-token
    # comparisons between samplers are meaningful
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.15)
            elif p is not None and name == "tiny-dream" and p.dim() == 1 and p.shape[0] != cfg.hidden_size:
                p.normal_(0.0, 0.05)  # q/k/v biases
    dm.save(model, directory)
    tokenizer.save_pretrained(directory)
    (directory / "accelc_builtin.json").write_text(json.dumps({"name": name, "seed": SEED}))
    return directory
