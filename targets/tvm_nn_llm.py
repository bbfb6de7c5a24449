"""Llama and Qwen2 written in TVM's `relax.frontend.nn` over its built-in paged KV cache.

This is how MLC-LLM deploys LLMs on GPUs: the model is written once in TVM's own module
language (not traced from torch), with one fused QKV projection per layer whose attention runs
inside TVM's `PagedKVCache` (RoPE applied to the keys as they are appended, paged prefill and
decode attention kernels, fork and pop-n of sequences), and one fused gate/up projection.
Three functions are exported:

    prefill(input_ids [1, n], cache, params) -> (logits [1, n, V], cache)   n <= prefill_chunk
    decode(input_ids [1, 1], cache, params)  -> (logits [1, 1, V], cache)
    create_paged_kv_cache(max_batch, max_total_len, prefill_chunk, page_size, sliding_window)

`prefill` returns the logits of every fed position (speculative verification needs them all),
and continues a sequence that already holds positions, so it is also the k-token verify call.
The weights come from the Hugging Face checkpoint's config and safetensors, fused here;
`targets/tvm_nn_build.py` compiles the module for CUDA (dlight GPU rules) or llvm (the CPU twin).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from accelc.errors import UsageError

ARCHITECTURES = ("llama", "qwen2")
FUNCTIONS = ("prefill", "decode", "create_paged_kv_cache")
# create_paged_kv_cache's arguments, in order (the runtime passes each as a one-value ShapeTuple)
CACHE_ARGS = ("max_batch_size", "max_total_seq_len", "prefill_chunk_size", "page_size", "support_sliding_window")


@dataclass(frozen=True)
class LlmConfig:
    """The architecture numbers the TVM module is written from (a Hugging Face config, checked)."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    qkv_bias: bool
    tie_word_embeddings: bool
    max_position_embeddings: int

    @classmethod
    def from_hf(cls, config: dict, where: str = "config.json") -> LlmConfig:
        """Read a Hugging Face config dict; exit 2 naming the key for what the module cannot express."""
        arch = config.get("model_type")
        if arch not in ARCHITECTURES:
            raise UsageError(
                f"{where}: model_type {arch!r} has no TVM paged-KV decoder; supported: {', '.join(ARCHITECTURES)}"
            )
        scaling = config.get("rope_scaling")
        if scaling and scaling.get("rope_type", scaling.get("type")) not in (None, "default"):
            raise UsageError(
                f"{where}: rope_scaling {scaling.get('rope_type', scaling.get('type'))!r} is not supported by the "
                "TVM paged-KV decoder (plain RoPE only)"
            )
        if config.get("use_sliding_window"):
            raise UsageError(f"{where}: use_sliding_window is not supported by the TVM paged-KV decoder")
        if arch == "llama" and (config.get("mlp_bias") or config.get("attention_bias")):
            raise UsageError(
                f"{where}: Llama with mlp_bias/attention_bias is not supported by the TVM paged-KV decoder"
            )
        act = config.get("hidden_act", "silu")
        if act != "silu":
            raise UsageError(f"{where}: hidden_act {act!r} is not supported (silu only)")
        heads = int(config["num_attention_heads"])
        hidden = int(config["hidden_size"])
        return cls(
            architecture=arch,
            vocab_size=int(config["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(config["intermediate_size"]),
            num_layers=int(config["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(config.get("num_key_value_heads") or heads),
            head_dim=int(config.get("head_dim") or hidden // heads),
            rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            rope_theta=float(config.get("rope_theta", 10000.0)),
            qkv_bias=arch == "qwen2",
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            max_position_embeddings=int(config.get("max_position_embeddings", 2048)),
        )


def _modules():
    """The nn.Module classes (defined on first use: importing tvm.relax costs seconds)."""
    from tvm.relax.frontend import nn
    from tvm.relax.frontend.nn import op
    from tvm.relax.frontend.nn.llm.kv_cache import PagedKVCache, TIRPagedKVCache

    class Attention(nn.Module):
        def __init__(self, c: LlmConfig):
            self.c = c
            width = (c.num_heads + 2 * c.num_kv_heads) * c.head_dim
            self.qkv_proj = nn.Linear(c.hidden_size, width, bias=c.qkv_bias)  # fused q, k, v
            self.o_proj = nn.Linear(c.num_heads * c.head_dim, c.hidden_size, bias=False)

        def forward(self, x, cache: PagedKVCache, layer_id: int):
            c = self.c
            b, s, _ = x.shape
            qkv = op.reshape(self.qkv_proj(x), (b, s, c.num_heads + 2 * c.num_kv_heads, c.head_dim))
            out = cache.attention_with_fused_qkv(layer_id, qkv, c.num_heads, sm_scale=c.head_dim**-0.5)
            return self.o_proj(op.reshape(out, (b, s, c.num_heads * c.head_dim)))

    class Mlp(nn.Module):
        def __init__(self, c: LlmConfig):
            self.gate_up_proj = nn.Linear(c.hidden_size, 2 * c.intermediate_size, bias=False)  # fused gate, up
            self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=False)

        def forward(self, x):
            gate, up = op.split(self.gate_up_proj(x), 2, axis=-1)
            return self.down_proj(op.silu(gate) * up)

    class Layer(nn.Module):
        def __init__(self, c: LlmConfig):
            self.input_layernorm = nn.RMSNorm(c.hidden_size, -1, c.rms_norm_eps, bias=False)
            self.self_attn = Attention(c)
            self.post_attention_layernorm = nn.RMSNorm(c.hidden_size, -1, c.rms_norm_eps, bias=False)
            self.mlp = Mlp(c)

        def forward(self, x, cache: PagedKVCache, layer_id: int):
            x = x + self.self_attn(self.input_layernorm(x), cache, layer_id)
            return x + self.mlp(self.post_attention_layernorm(x))

    class CausalLM(nn.Module):
        def __init__(self, c: LlmConfig, target):
            self.c = c
            self.target = target
            self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
            self.layers = nn.ModuleList([Layer(c) for _ in range(c.num_layers)])
            self.norm = nn.RMSNorm(c.hidden_size, -1, c.rms_norm_eps, bias=False)
            if not c.tie_word_embeddings:
                self.lm_head = nn.Linear(c.hidden_size, c.vocab_size, bias=False)

        def _logits(self, input_ids, cache: PagedKVCache):
            x = self.embed_tokens(input_ids)
            for layer_id, layer in enumerate(self.layers):
                x = layer(x, cache, layer_id)
            x = self.norm(x)
            if self.c.tie_word_embeddings:
                logits = op.matmul(x, op.permute_dims(self.embed_tokens.weight))
            else:
                logits = self.lm_head(x)
            return logits, cache

        def prefill(self, input_ids, cache: PagedKVCache):
            return self._logits(input_ids, cache)

        def decode(self, input_ids, cache: PagedKVCache):
            return self._logits(input_ids, cache)

        def create_paged_kv_cache(
            self, max_batch_size, max_total_seq_len, prefill_chunk_size, page_size, support_sliding_window
        ) -> PagedKVCache:
            from tvm import relax
            from tvm.relax.frontend.nn.llm._kernel_common import RopeMode as Mode

            c = self.c
            return TIRPagedKVCache(
                attn_kind="mha",
                max_batch_size=max_batch_size,
                max_total_seq_len=max_total_seq_len,
                prefill_chunk_size=prefill_chunk_size,
                page_size=page_size,
                support_sliding_window=support_sliding_window,
                layer_partition=relax.ShapeExpr([0, c.num_layers]),
                num_hidden_layers=c.num_layers,
                num_attention_heads=c.num_heads,
                num_key_value_heads=c.num_kv_heads,
                qk_head_dim=c.head_dim,
                v_head_dim=c.head_dim,
                mla_original_qk_head_dim=0,
                mla_original_v_head_dim=0,
                rope_mode=Mode.NORMAL,  # RoPE applied to k as it is stored: the cache holds what HF's does
                rope_scale=1,
                rope_theta=c.rope_theta,
                rope_scaling={},
                rope_ext_factors=relax.prim_value(0),
                rotary_dim=c.head_dim,
                enable_disaggregation=False,
                dtype="float32",
                target=self.target,
            )

        def spec(self):
            packed = {"param_mode": "packed", "effect_mode": "none"}
            cache = nn.spec.Object(object_type=PagedKVCache)
            return {
                "prefill": {"input_ids": nn.spec.Tensor([1, "seq_len"], "int32"), "cache": cache, "$": packed},
                "decode": {"input_ids": nn.spec.Tensor([1, 1], "int32"), "cache": cache, "$": packed},
                "create_paged_kv_cache": {
                    **{name: int for name in CACHE_ARGS},
                    "$": {"param_mode": "none", "effect_mode": "none"},
                },
            }

    return CausalLM


def export(config: LlmConfig, target) -> tuple:
    """(IRModule, parameter names in call order) of the decoder for `target` (a tvm Target: the
    paged KV cache picks its CUDA or CPU attention kernels from it)."""
    model_cls = _modules()
    model = model_cls(config, target)
    mod, params = model.export_tvm(spec=model.spec())
    return mod, [name for name, _ in params]


def read_config(model_dir: Path) -> LlmConfig:
    import json

    path = Path(model_dir) / "config.json"
    return LlmConfig.from_hf(json.loads(path.read_text()), str(path))


def fused_weights(model_dir: Path, config: LlmConfig, names: list[str]) -> dict[str, np.ndarray]:
    """The module's parameters by name, from the checkpoint's safetensors: q, k, v concatenated
    into qkv_proj and gate, up into gate_up_proj, float32 (the runtime's dtype)."""
    from safetensors import safe_open

    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise UsageError(f"{model_dir}: no *.safetensors weights (the TVM paged-KV decoder reads safetensors only)")
    hf: dict[str, np.ndarray] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                hf[key.removeprefix("model.")] = f.get_tensor(key).float().numpy()

    def take(key: str) -> np.ndarray:
        if key not in hf:
            raise UsageError(f"{model_dir}: weight {key!r} is missing from the safetensors files")
        return hf[key]

    out = {}
    for name in names:
        if ".qkv_proj." in name:
            stem, kind = name.rsplit(".qkv_proj.", 1)
            out[name] = np.concatenate([take(f"{stem}.{p}_proj.{kind}") for p in "qkv"], axis=0)
        elif ".gate_up_proj." in name:
            stem, kind = name.rsplit(".gate_up_proj.", 1)
            out[name] = np.concatenate([take(f"{stem}.{p}_proj.{kind}") for p in ("gate", "up")], axis=0)
        elif name == "lm_head.weight":
            out[name] = hf["lm_head.weight"] if "lm_head.weight" in hf else take("embed_tokens.weight")
        else:
            out[name] = take(name)
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in out.items()}
