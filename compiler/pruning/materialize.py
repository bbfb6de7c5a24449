"""Physically smaller models: slice the kept rows/columns into smaller Linears; save and load them.

Route (checked against transformers 4.57's LlamaAttention/Qwen2Attention): the attention forward
reshapes q/k/v with `view(*input_shape, -1, head_dim)` and the output with `reshape(*input_shape,
-1)`, so the head counts are read from the tensors, not the config. Replacing q/k/v/o_proj with
smaller Linears and setting the module attribute `num_key_value_groups` to the kept query heads per
kept KV group (repeat_kv and SDPA's enable_gqa both use it) is all a layer needs; `head_dim` and
`scaling` are unchanged because whole heads are removed, so RoPE is untouched. The MLP forward has
no width anywhere but in its Linears. Per-layer widths therefore need no custom modelling code:

    config.json  the dense config plus `accelc_pruning` = {format, num_heads[L], num_kv_heads[L],
                 intermediate_sizes[L], o_proj_bias[L], down_proj_bias[L]} (documentation and a
                 check; the loader takes module shapes from the weights themselves)
    *.safetensors  the small weights (tied embeddings saved once, as save_pretrained does)

`load` builds the dense skeleton on the meta device (no allocation), swaps in Linears of the
stored shapes, loads the state dict with assign=True, ties the embeddings and rebuilds the rotary
buffers (non-persistent, so never saved). `AutoModelForCausalLM.from_pretrained` cannot load such
a folder (its shape check fails): callers use `load` when `is_pruned(folder)`.

Caveats found: `config.num_attention_heads`/`num_key_value_heads` keep their dense values (exporters
read them to size past KV inputs: correct for gqa="query", where every layer keeps all KV heads,
wrong for gqa="group"); a layer must keep at least one head (view(-1) of an empty tensor fails).
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

from accelc.compiler.pruning.masks import Geometry, Subnet
from accelc.errors import UsageError

PRUNING_KEY = "accelc_pruning"
SUBNET_FILE = "accelc_subnet.json"
FORMAT = 1
_NOT_COPIED = (".safetensors", ".bin", ".pt", ".pth")
_NOT_COPIED_NAMES = (
    "config.json",
    "model.safetensors.index.json",
    SUBNET_FILE,
    "accelc_builtin.json",
)  # a pruned model is no longer the builtin one


def _index_sets(geo: Geometry, heads, channels):
    """Row/column indices of the kept parts: q rows (= o cols), k/v rows, MLP channels."""
    import torch

    d, G = geo.head_dim, geo.group_size
    kv = sorted({h // G for h in heads})
    q_rows = torch.tensor([h * d + j for h in heads for j in range(d)], dtype=torch.long)
    kv_rows = torch.tensor([g * d + j for g in kv for j in range(d)], dtype=torch.long)
    return q_rows, kv_rows, torch.tensor(channels, dtype=torch.long), len(heads) // len(kv)


def _linear(weight, bias=None):
    import torch

    lin = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta", dtype=weight.dtype)
    lin.weight = torch.nn.Parameter(weight.contiguous(), requires_grad=False)
    if bias is not None:
        lin.bias = torch.nn.Parameter(bias.contiguous(), requires_grad=False)
    return lin


def _rows(lin, idx):
    return _linear(
        lin.weight.detach().index_select(0, idx), None if lin.bias is None else lin.bias.detach().index_select(0, idx)
    )


def _check_dense(model, geo: Geometry) -> None:
    layer = model.model.layers[0]
    if (
        layer.self_attn.o_proj.in_features != geo.num_heads * geo.head_dim
        or layer.mlp.down_proj.in_features != geo.intermediate
    ):
        raise ValueError("shrink/mask take the dense model; this one is already pruned")


def shrink(model, subnet: Subnet, overrides: dict | None = None):
    """A physically smaller copy of the dense `model` keeping the subnet's heads and channels.

    overrides: {(layer, "o_proj" | "down_proj"): (weight [out, kept], bias [out] or None)} replace
    the sliced consumer weights (reformation, bias compensation). Embeddings, norms and the LM
    head are shared with `model`, not copied (the returned model is for inference).
    """
    import torch

    geo = Geometry.from_model(model)
    _check_dense(model, geo)
    if len(subnet.layers) != geo.num_layers:
        raise ValueError(f"subnet has {len(subnet.layers)} layers, the model {geo.num_layers}")
    overrides = overrides or {}
    memo: dict[int, object] = {}
    groups, widths = (
        [],
        {"num_heads": [], "num_kv_heads": [], "intermediate_sizes": [], "o_proj_bias": [], "down_proj_bias": []},
    )
    with torch.no_grad():
        for i, (layer, mask) in enumerate(zip(model.model.layers, subnet.layers)):
            a, m = layer.self_attn, layer.mlp
            q_rows, kv_rows, ch, per_group = _index_sets(geo, mask.heads, mask.channels)
            memo[id(a.q_proj)] = _rows(a.q_proj, q_rows)
            memo[id(a.k_proj)] = _rows(a.k_proj, kv_rows)
            memo[id(a.v_proj)] = _rows(a.v_proj, kv_rows)
            o = overrides.get((i, "o_proj"))
            memo[id(a.o_proj)] = (
                _linear(*o)
                if o
                else _linear(
                    a.o_proj.weight.detach().index_select(1, q_rows),
                    None if a.o_proj.bias is None else a.o_proj.bias.detach(),
                )
            )
            memo[id(m.gate_proj)] = _rows(m.gate_proj, ch)
            memo[id(m.up_proj)] = _rows(m.up_proj, ch)
            dn = overrides.get((i, "down_proj"))
            memo[id(m.down_proj)] = (
                _linear(*dn)
                if dn
                else _linear(
                    m.down_proj.weight.detach().index_select(1, ch),
                    None if m.down_proj.bias is None else m.down_proj.bias.detach(),
                )
            )
            groups.append(per_group)
            widths["num_heads"].append(len(mask.heads))
            widths["num_kv_heads"].append(len(kv_rows) // geo.head_dim)
            widths["intermediate_sizes"].append(len(mask.channels))
            widths["o_proj_bias"].append(memo[id(a.o_proj)].bias is not None)
            widths["down_proj_bias"].append(memo[id(m.down_proj)].bias is not None)
        # share every remaining parameter (embeddings, norms, LM head) instead of copying it
        for p in model.parameters():
            memo.setdefault(id(p), p)
        small = copy.deepcopy(model, memo)
    for layer, per_group in zip(small.model.layers, groups):
        layer.self_attn.num_key_value_groups = per_group
    setattr(small.config, PRUNING_KEY, {"format": FORMAT, **widths})
    return small.eval()


def masked(model, subnet: Subnet):
    """A full-size copy of the dense `model` with every pruned weight set to zero (for tests).

    A zeroed query head still attends, but its o_proj columns are zero, so it adds nothing; a
    zeroed MLP channel gives silu(0) * 0 = 0. Hence masked(m, s) computes what shrink(m, s) does.
    """
    import torch

    geo = Geometry.from_model(model)
    _check_dense(model, geo)
    full = copy.deepcopy(model)
    with torch.no_grad():
        for layer, mask in zip(full.model.layers, subnet.layers):
            a, m = layer.self_attn, layer.mlp
            q_rows, kv_rows, ch, _ = _index_sets(geo, mask.heads, mask.channels)
            for lin, idx, dim in (
                (a.q_proj, q_rows, 0),
                (a.k_proj, kv_rows, 0),
                (a.v_proj, kv_rows, 0),
                (a.o_proj, q_rows, 1),
                (m.gate_proj, ch, 0),
                (m.up_proj, ch, 0),
                (m.down_proj, ch, 1),
            ):
                keep = torch.zeros(lin.weight.shape[dim], dtype=torch.bool)
                keep[idx] = True
                if dim == 0:
                    lin.weight[~keep, :] = 0
                    if lin.bias is not None:
                        lin.bias[~keep] = 0
                else:
                    lin.weight[:, ~keep] = 0
    return full


# --------------------------------------------------------------------------- save / load


def is_pruned(directory: Path) -> bool:
    cfg = Path(directory) / "config.json"
    return cfg.exists() and PRUNING_KEY in json.loads(cfg.read_text())


def save(model, directory: Path, *, source_dir: Path | None = None, subnet: Subnet | None = None) -> Path:
    """Write a shrunk model as a Hugging Face folder (safetensors + config with per-layer widths).

    Tokenizer and generation files are copied from `source_dir`; the kept indices, when given,
    go to accelc_subnet.json (provenance: which original heads/channels each layer kept).
    """
    directory = Path(directory)
    if getattr(model.config, PRUNING_KEY, None) is None:
        raise ValueError("save() takes a model made by shrink() (its config has no per-layer widths)")
    directory.mkdir(parents=True, exist_ok=True)
    if source_dir is not None:
        for p in Path(source_dir).iterdir():
            if p.is_file() and p.suffix not in _NOT_COPIED and p.name not in _NOT_COPIED_NAMES:
                shutil.copy2(p, directory / p.name)
    model.save_pretrained(directory, safe_serialization=True)
    if subnet is not None:
        (directory / SUBNET_FILE).write_text(json.dumps(subnet.to_json()))
    return directory


def load(directory: Path):
    """Load a folder written by `save` (per-layer widths) as a float32 eval-mode model."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    directory = Path(directory)
    config = AutoConfig.from_pretrained(directory, local_files_only=True)
    spec = getattr(config, PRUNING_KEY, None)
    if spec is None:
        raise UsageError(f"{directory}: config.json has no '{PRUNING_KEY}' section (not a pruned model)")
    if spec.get("format") != FORMAT:
        raise UsageError(
            f"{directory}: pruned-model format {spec.get('format')} is not supported "
            f"(this accelc writes format {FORMAT})"
        )
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise UsageError(f"{directory}: no *.safetensors weights")
    state = {}
    for f in files:
        state.update(load_file(str(f)))
    config.dtype = torch.float32
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    for i, layer in enumerate(model.model.layers):
        for parent, names in (
            (layer.self_attn, ("q_proj", "k_proj", "v_proj", "o_proj")),
            (layer.mlp, ("gate_proj", "up_proj", "down_proj")),
        ):
            for name in names:
                prefix = f"model.layers.{i}.{'self_attn' if parent is layer.self_attn else 'mlp'}.{name}"
                w = state[f"{prefix}.weight"]
                setattr(
                    parent,
                    name,
                    torch.nn.Linear(
                        w.shape[1], w.shape[0], bias=f"{prefix}.bias" in state, device="meta", dtype=torch.float32
                    ),
                )
        d = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        heads, kv = layer.self_attn.q_proj.out_features // d, layer.self_attn.k_proj.out_features // d
        if (heads, kv) != (spec["num_heads"][i], spec["num_kv_heads"][i]) or kv < 1 or heads % kv:
            raise UsageError(
                f"{directory}: layer {i} weights hold {heads} query / {kv} KV heads, "
                f"config says {spec['num_heads'][i]} / {spec['num_kv_heads'][i]}"
            )
        layer.self_attn.num_key_value_groups = heads // kv
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise UsageError(
            f"{directory}: weights do not match the recorded widths "
            f"(missing {sorted(set(missing) - tied)[:3]}, unexpected {sorted(unexpected)[:3]})"
        )
    model.tie_weights()
    # rotary inv_freq is a non-persistent buffer: rebuild it on the CPU
    model.model.rotary_emb = type(model.model.rotary_emb)(config=model.config)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise UsageError(f"{directory}: tensors left unloaded: {left[:3]}")
    return model.eval()


def check_uniform_kv(model, what: str) -> None:
    """Exporters and runtimes size the KV cache from config.num_key_value_heads in every layer;
    a gqa="group" subnet keeps different KV heads per layer, which they cannot express yet."""
    if getattr(model.config, PRUNING_KEY, None) is None:
        return
    kv = set(widths(model)["num_kv_heads"])
    dense = getattr(model.config, "num_key_value_heads", None) or model.config.num_attention_heads
    if kv != {dense}:
        raise UsageError(
            f"{what}: this pruned model keeps {sorted(kv)} KV heads per layer (gqa: group), but "
            f"exported graphs need {dense} in every layer; prune with gqa: query to export it"
        )


def widths(model) -> dict:
    """The per-layer widths read from the modules themselves (heads, KV heads, MLP channels)."""
    d = (
        model.config.head_dim
        if getattr(model.config, "head_dim", None)
        else model.config.hidden_size // model.config.num_attention_heads
    )
    return {
        "num_heads": [layer.self_attn.q_proj.out_features // d for layer in model.model.layers],
        "num_kv_heads": [layer.self_attn.k_proj.out_features // d for layer in model.model.layers],
        "intermediate_sizes": [layer.mlp.down_proj.in_features for layer in model.model.layers],
    }
