"""Masked-diffusion LM denoisers written here: LLaDA-style and Dream-style, read from their own folders.

Both are Llama-like stacks (RMSNorm, RoPE, SwiGLU) whose attention is bidirectional: every
position attends to every other, and no attention mask is applied (LLaDA, arXiv 2502.09992 §2.1;
Dream, arXiv 2508.15487). They differ in two ways the samplers must respect:

- LLaDA predicts token i from the hidden state at i (`shift` 0); it has multi-head attention,
  no biases and an untied output head.
- Dream keeps its autoregressive initialisation's next-token head: token i is predicted from the
  hidden state at i-1 (`shift` 1); it is a Qwen2 stack (grouped-query attention, q/k/v biases).

Real checkpoints load without `trust_remote_code`: `DiffusionConfig.read` reads each
architecture's config.json keys and `load_state` renames the published weight names onto this
module's (Dream's names are Qwen2's, which this module uses; LLaDA's are OLMo's). `save`
writes a folder in the same published layout, so a folder this project writes (the tiny test
models, the adapted SmolLM2) is read by the same code as a downloaded one.

A forward call takes the token ids of a window of the sequence, their positions, and the keys
and values (RoPE already applied) of the positions outside the window from an earlier call: the
prefix and dual caches of Fast-dLLM (arXiv 2505.22618 §3.2). Attention is bidirectional, so the
cached positions' order does not matter. It returns the window's logits and its own keys and values.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from accelc.errors import UsageError

ARCHITECTURES = {"LLaDAModelLM": "llada", "DreamModel": "dream"}


@dataclass(frozen=True)
class DiffusionConfig:
    architecture: str  # "llada" | "dream"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    rope_theta: float
    rms_norm_eps: float
    mask_token_id: int
    eos_token_id: int | None
    max_positions: int
    qkv_bias: bool
    tie_embeddings: bool

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def shift(self) -> int:
        """1 where token i is predicted from the hidden state at i-1 (Dream), else 0 (LLaDA)."""
        return 1 if self.architecture == "dream" else 0

    @classmethod
    def read(cls, directory: Path) -> DiffusionConfig:
        """The config of the LLaDA or Dream folder `directory`; UsageError names the file and key."""
        path = directory / "config.json"
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise UsageError(f"{path}: cannot read the model config ({exc})") from None
        architecture = architecture_of(raw)
        if architecture is None:
            raise UsageError(
                f"{path}: not a masked-diffusion LM (architectures {raw.get('architectures')!r}; "
                f"allowed: {', '.join(ARCHITECTURES)})"
            )
        keys = LLADA_KEYS if architecture == "llada" else DREAM_KEYS
        if architecture == "llada" and raw.get("embedding_size") is None:
            raw = {**raw, "embedding_size": raw.get("vocab_size")}
        values = {}
        for name, (key, default) in keys.items():
            value = raw.get(key, default)
            if value is REQUIRED or (value is None and name == "vocab_size"):
                raise UsageError(f"{path}: missing '{key}' (a {architecture} config needs it)")
            values[name] = value
        if values["mask_token_id"] is None:
            raise UsageError(
                f"{path}: no 'mask_token_id': a masked-diffusion LM needs the id of its mask token to sample"
            )
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "max_positions"):
            if not isinstance(values[name], int) or isinstance(values[name], bool) or values[name] < 1:
                raise UsageError(f"{path}: {keys[name][0]} is {values[name]!r}; it must be a positive integer")
        values["num_kv_heads"] = values["num_kv_heads"] or values["num_heads"]
        if values["hidden_size"] % values["num_heads"] or values["num_heads"] % values["num_kv_heads"]:
            raise UsageError(f"{path}: the hidden size, heads and key/value heads do not divide one another")
        if not 0 <= values["mask_token_id"] < values["vocab_size"]:
            raise UsageError(f"{path}: mask_token_id {values['mask_token_id']} is outside the vocabulary")
        eos = values["eos_token_id"]
        values["eos_token_id"] = eos[0] if isinstance(eos, list) and eos else eos
        return cls(architecture=architecture, **values)


REQUIRED = object()
# field -> (config.json key, default); LLaDA's keys are OLMo's (modeling_llada.py's ModelConfig)
LLADA_KEYS = {
    "vocab_size": ("embedding_size", None),  # the rows of the embedding; vocab_size where absent
    "hidden_size": ("d_model", REQUIRED),
    "intermediate_size": ("mlp_hidden_size", REQUIRED),
    "num_layers": ("n_layers", REQUIRED),
    "num_heads": ("n_heads", REQUIRED),
    "num_kv_heads": ("n_kv_heads", None),
    "rope_theta": ("rope_theta", 10000.0),
    "rms_norm_eps": ("rms_norm_eps", 1e-5),
    "mask_token_id": ("mask_token_id", None),
    "eos_token_id": ("eos_token_id", None),
    "max_positions": ("max_sequence_length", 4096),
    "qkv_bias": ("include_qkv_bias", False),
    "tie_embeddings": ("weight_tying", False),
}
DREAM_KEYS = {
    "vocab_size": ("vocab_size", REQUIRED),
    "hidden_size": ("hidden_size", REQUIRED),
    "intermediate_size": ("intermediate_size", REQUIRED),
    "num_layers": ("num_hidden_layers", REQUIRED),
    "num_heads": ("num_attention_heads", REQUIRED),
    "num_kv_heads": ("num_key_value_heads", None),
    "rope_theta": ("rope_theta", 10000.0),
    "rms_norm_eps": ("rms_norm_eps", 1e-6),
    "mask_token_id": ("mask_token_id", None),
    "eos_token_id": ("eos_token_id", None),
    "max_positions": ("max_position_embeddings", 4096),
    "qkv_bias": ("attention_bias", True),  # Qwen2 blocks always carry q/k/v biases
    "tie_embeddings": ("tie_word_embeddings", False),
}


def architecture_of(config: dict) -> str | None:
    """ "llada" or "dream" for a config.json naming one of those architectures, else None."""
    names = config.get("architectures")
    if not isinstance(names, list):
        return None
    found = [ARCHITECTURES[n] for n in names if isinstance(n, str) and n in ARCHITECTURES]
    return found[0] if found else None


def config_json(config: DiffusionConfig) -> dict:
    """config.json in the architecture's published layout."""
    fields = asdict(config)
    keys = LLADA_KEYS if config.architecture == "llada" else DREAM_KEYS
    out = {key: fields[name] for name, (key, _) in keys.items()}
    if config.architecture == "llada":
        # the keys OLMo's loader needs besides the sizes, with LLaDA-8B's values
        out.update(
            model_type="llada",
            architectures=["LLaDAModelLM"],
            vocab_size=config.vocab_size,
            block_type="llama",
            activation_type="silu",
            layer_norm_type="rms",
            include_bias=False,
            rope=True,
            use_cache=False,
        )
    else:
        out.update(model_type="Dream", architectures=["DreamModel"], hidden_act="silu", use_cache=False)
    return out


# --------------------------------------------------------------------------- the torch module


class RMSNorm(nn.Module):
    def __init__(self, width: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.eps = eps

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


def rotate(x, cos, sin):
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    def __init__(self, cfg: DiffusionConfig):
        super().__init__()
        d, h, kv = cfg.head_dim, cfg.num_heads, cfg.num_kv_heads
        self.heads, self.kv_heads, self.head_dim = h, kv, d
        self.q_proj = nn.Linear(cfg.hidden_size, h * d, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, kv * d, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, kv * d, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(h * d, cfg.hidden_size, bias=False)

    def forward(self, x, cos, sin, past_k=None, past_v=None):
        b, n, _ = x.shape
        q = self.q_proj(x).view(b, n, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, n, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, n, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        keys, values = k, v
        if past_k is not None:
            keys, values = torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)
        groups = self.heads // self.kv_heads
        if groups > 1:
            keys, values = keys.repeat_interleave(groups, dim=1), values.repeat_interleave(groups, dim=1)
        scores = (q @ keys.transpose(-1, -2)) / self.head_dim**0.5  # no mask: bidirectional
        out = torch.softmax(scores, dim=-1) @ values
        return self.o_proj(out.transpose(1, 2).reshape(b, n, -1)), k, v


class MLP(nn.Module):
    def __init__(self, cfg: DiffusionConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: DiffusionConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, past_k=None, past_v=None):
        attn, k, v = self.self_attn(self.input_layernorm(x), cos, sin, past_k, past_v)
        x = x + attn
        return x + self.mlp(self.post_attention_layernorm(x)), k, v


class Trunk(nn.Module):
    def __init__(self, cfg: DiffusionConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class DiffusionLM(nn.Module):
    """The denoiser: (window ids, their positions, cached keys/values of the other positions)
    -> (the window's logits, its keys/values per layer). Logits are raw: for Dream the caller
    reads position i's prediction at i-1 (`config.shift`)."""

    def __init__(self, cfg: DiffusionConfig):
        super().__init__()
        self.config = cfg
        self.model = Trunk(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        d = cfg.head_dim
        self.register_buffer(
            "inv_freq", 1.0 / cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d), persistent=False
        )

    def rope(self, positions):
        angles = positions.to(torch.float32)[..., None] * self.inv_freq  # [b, n, d/2]
        angles = torch.cat([angles, angles], dim=-1)[:, None]  # [b, 1, n, d]
        return angles.cos(), angles.sin()

    def forward(self, input_ids, position_ids, past=None):
        """`past`: per layer (keys, values) [b, kv_heads, P, head_dim] of the positions outside the
        window, or None. Returns logits [b, n, vocab] and per layer (keys, values) of the window."""
        x = self.model.embed_tokens(input_ids)
        cos, sin = self.rope(position_ids)
        present = []
        for i, layer in enumerate(self.model.layers):
            pk, pv = past[i] if past is not None else (None, None)
            x, k, v = layer(x, cos, sin, pk, pv)
            present.append((k, v))
        return self.lm_head(self.model.norm(x)), present

    def hidden_logits(self, hidden):
        return self.lm_head(self.model.norm(hidden))


# --------------------------------------------------------------------------- weights in the published layouts


def llada_names(num_layers: int) -> dict[str, str]:
    """LLaDA's (OLMo's) weight names -> this module's. The output head is the model-level
    `ff_out`; a block's `ff_proj` is the SwiGLU gate (activated), `up_proj` the linear half."""
    names = {
        "model.transformer.wte.weight": "model.embed_tokens.weight",
        "model.transformer.ln_f.weight": "model.norm.weight",
        "model.transformer.ff_out.weight": "lm_head.weight",
    }
    per_block = {
        "q_proj": "self_attn.q_proj",
        "k_proj": "self_attn.k_proj",
        "v_proj": "self_attn.v_proj",
        "attn_out": "self_attn.o_proj",
        "ff_proj": "mlp.gate_proj",
        "up_proj": "mlp.up_proj",
        "ff_out": "mlp.down_proj",
        "attn_norm": "input_layernorm",
        "ff_norm": "post_attention_layernorm",
    }
    for i in range(num_layers):
        for theirs, ours in per_block.items():
            for kind in ("weight", "bias"):
                names[f"model.transformer.blocks.{i}.{theirs}.{kind}"] = f"model.layers.{i}.{ours}.{kind}"
    return names


def published_names(cfg: DiffusionConfig) -> dict[str, str]:
    """Published weight name -> this module's, for the config's architecture."""
    if cfg.architecture == "llada":
        return llada_names(cfg.num_layers)
    return {}  # Dream's names are Qwen2's, which this module uses


def load_state(directory: Path, cfg: DiffusionConfig) -> dict[str, torch.Tensor]:
    """The weights of `directory` (one or several safetensors shards) under this module's names."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    shards = sorted(directory.glob("*.safetensors"))
    if not shards:
        raise UsageError(f"{directory}: no weight files (*.safetensors) in the checkpoint folder")
    rename = published_names(cfg)
    state = {}
    for shard in shards:
        try:
            tensors = load_file(str(shard))
        except (SafetensorError, OSError) as exc:
            raise UsageError(f"{shard}: not a valid safetensors file ({str(exc).splitlines()[0]})") from None
        for name, tensor in tensors.items():
            state[rename.get(name, name)] = tensor.to(torch.float32)
    return state


def load(directory: Path) -> DiffusionLM:
    """The float32 denoiser of a LLaDA or Dream folder, in eval mode."""
    cfg = DiffusionConfig.read(directory)
    model = DiffusionLM(cfg)
    state = load_state(directory, cfg)
    if cfg.tie_embeddings:
        state.pop("lm_head.weight", None)
    expected = {
        k: tuple(v.shape) for k, v in model.state_dict().items() if not (cfg.tie_embeddings and k == "lm_head.weight")
    }
    inverse = {ours: theirs for theirs, ours in published_names(cfg).items()}
    missing = sorted(inverse.get(k, k) for k in expected if k not in state)
    unexpected = sorted(inverse.get(k, k) for k in state if k not in expected)
    if missing or unexpected:
        raise UsageError(
            f"{directory}: weights do not match its {cfg.architecture} config.json "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    for name, shape in expected.items():
        if tuple(state[name].shape) != shape:
            raise UsageError(
                f"{directory}: {inverse.get(name, name)} has shape {list(state[name].shape)} but config.json "
                f"describes {list(shape)}; the config does not belong to these weights"
            )
    model.load_state_dict(state, strict=not cfg.tie_embeddings)
    return model.eval()


def save(model: DiffusionLM, directory: Path) -> None:
    """Write `model` as a folder in its architecture's published layout (config.json, model.safetensors)."""
    from safetensors.torch import save_file

    cfg = model.config
    inverse = {ours: theirs for theirs, ours in published_names(cfg).items()}
    state = {}
    for name, tensor in model.state_dict().items():
        if cfg.tie_embeddings and name == "lm_head.weight":
            continue
        state[inverse.get(name, name)] = tensor.detach().contiguous()
    directory.mkdir(parents=True, exist_ok=True)
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(config_json(cfg), indent=2))
