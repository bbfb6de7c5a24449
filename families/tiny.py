"""Tiny causal LMs built from configs with seeded weights: the test models.

They exercise the same code paths as real checkpoints (save_pretrained folders, optimum export,
TVM lowering) in seconds. Their tokenizer is a byte-level BPE with no merges: 256 byte tokens
plus specials, deterministic and built without training data or a download.
"""

from __future__ import annotations

import json
from pathlib import Path

SEED = 0
SPECIALS = ["<|endoftext|>", "<pad>"]

TINY_CONFIGS = {
    "tiny-llama": dict(
        model_type="llama",
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rope_theta=10000.0,
        tie_word_embeddings=True,
    ),
    "tiny-qwen2": dict(
        model_type="qwen2",
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
    ),
    "tiny-gpt2": dict(model_type="gpt2", n_embd=64, n_layer=2, n_head=4, n_positions=512),
    "tiny-opt": dict(
        model_type="opt",
        hidden_size=64,
        ffn_dim=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=512,
        word_embed_proj_dim=64,
    ),
}


def byte_tokenizer():
    """A byte-level BPE tokenizer with no merges (vocab 258), wrapped for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_chars = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(byte_chars))}
    for tok in SPECIALS:
        vocab[tok] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        bos_token="<|endoftext|>",
        pad_token="<pad>",
        # without this the tokenizer emits token_type_ids, which GPT-2 silently adds as embeddings
        model_input_names=["input_ids", "attention_mask"],
    )


def build(name: str, directory: Path) -> Path:
    """Write the seeded tiny model `name` as a save_pretrained folder in `directory`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = dict(TINY_CONFIGS[name])
    tokenizer = byte_tokenizer()
    config = AutoConfig.for_model(
        spec.pop("model_type"),
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **spec,
    )
    torch.manual_seed(SEED)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # Random init at std 0.02 gives near-flat logits where every token ties; a wider init makes
    # greedy choices decisive so token-for-token parity tests are meaningful.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.15)
    model.eval().save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    (directory / "accelc_builtin.json").write_text(json.dumps({"name": name, "seed": SEED}))
    return directory
