"""Decoders of the Llama architecture written straight to ONNX with ONNX Runtime's fused CPU kernels.

Why not only the traced export: optimum traces transformers' eager code, so SmolLM2-135M's graph
has ~3,000 nodes per step (shape arithmetic, mask building, rotary, repeat_kv in every layer).
ORT cannot fold them away because the shapes are dynamic, and on a 2-core CPU dispatching them
costs about a quarter of a decode step (docs/notes.md). This builder writes the same computation
from the weights, ~12 nodes per layer:

    SkipSimplifiedLayerNorm(residual add + RMSNorm) -> MatMul(packed q|k|v) [+ bias]
    -> GroupQueryAttention(rotary, KV-cache append, GQA, causal mask) -> MatMul(o) [+ bias]
    -> SkipSimplifiedLayerNorm -> MatMul(gate), MatMul(up) -> x*sigmoid(x)*up -> MatMul(down) [+ bias]

and keeps optimum's I/O contract (`input_ids`, `attention_mask`, `past_key_values.{i}.key/value`
-> `logits`, `present.{i}.key/value`), so runtimes, validation and quantisation take either graph.

Per-layer head counts and MLP widths are read from the weight shapes, so pruned checkpoints
(pruning/materialize.py) build with no extra code; the optional o_proj/down_proj biases that
FLAP's bias compensation adds become Adds. Positions are derived by GroupQueryAttention from
the attention mask (seqlens_k = sum(mask) - 1), i.e. positions are contiguous from the cache
length, which is how every accelc runtime calls a decoder (batch 1, no left padding).
The tied LM head reads the embedding matrix through Gemm(transB=1), so it is stored once.

The graph says where each of the model's parameters lives in it (`weight_views`, kept in the
model's metadata under WEIGHT_VIEWS): an initializer, a column range of it (q, k and v are one
packed matrix) and whether it is stored transposed. Another backend can then read its weights
out of this graph instead of shipping a second copy (the TVM target does: targets/tvm_build.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from accelc.errors import UsageError
from accelc.runtime.ort_backend import IN_PLACE_KV  # metadata: past and present may share one buffer

ARCHITECTURES = ("llama", "qwen2")  # Hugging Face model_type values it builds
MS_DOMAIN = "com.microsoft"
OPSET = 17
WEIGHT_VIEWS = "accelc.weight_views"  # metadata key: {parameter name: view} (see `view_arrays`)


def unsupported_reason(model) -> str | None:
    """Why `model` cannot be built as a fused graph (None: it can)."""
    cfg = model.config
    if cfg.model_type not in ARCHITECTURES:
        return f"model_type '{cfg.model_type}' (fused graphs cover {', '.join(ARCHITECTURES)})"
    if getattr(cfg, "hidden_act", "silu") != "silu":
        return f"hidden_act '{cfg.hidden_act}' (fused graphs use SiLU)"
    if getattr(cfg, "use_sliding_window", False):
        return "sliding-window attention"
    kv = {layer.self_attn.k_proj.weight.shape[0] for layer in model.model.layers}
    if len(kv) != 1:
        return "per-layer KV head counts (runtimes size one KV shape for every layer)"
    return None


class _Graph:
    """Nodes and initializers, with fresh names for intermediate values.

    Every intermediate's element type is recorded as value_info: ONNX shape inference cannot see
    through com.microsoft ops, and ORT's quantizers need each MatMul input's type."""

    def __init__(self, model=None):
        self.nodes, self.initializers, self.types, self._count = [], [], {}, 0
        self.views: dict[str, dict] = {}  # parameter name -> where it is stored (WEIGHT_VIEWS)
        self._names: dict[int, list[str]] = {}  # every name of a parameter: tied weights have two
        for name, param in model.named_parameters(remove_duplicate=False) if model is not None else ():
            self._names.setdefault(id(param), []).append(name)

    def weight(self, name: str, array, views=()) -> str:
        """Store `array` as initializer `name`. views: (parameter, transposed, columns) for each
        model parameter the array holds, columns a [start, stop) range of its last axis or None."""
        from onnx import numpy_helper

        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        for param, transposed, columns in views:
            for param_name in self._names.get(id(param), ()):
                self.views[param_name] = {"initializer": name, "transposed": transposed, "columns": columns}
        return name

    def op(
        self, op_type: str, inputs: list[str], outputs: int | list[str] = 1, domain: str = "", dtype: int = 1, **attrs
    ):  # dtype: TensorProto element type of the outputs (1 = FLOAT)
        from onnx import helper

        if isinstance(outputs, int):
            self._count += 1
            outputs = [f"{op_type.lower()}_{self._count}_{i}" for i in range(outputs)]
        self.nodes.append(
            helper.make_node(op_type, inputs, outputs, name=f"{op_type}_{len(self.nodes)}", domain=domain, **attrs)
        )
        self.types.update((name, attrs.get("to", dtype)) for name in outputs if name)
        return outputs[0] if len(outputs) == 1 else outputs

    def value_info(self, graph_io: set[str]) -> list:
        from onnx import helper

        return [
            helper.make_tensor_value_info(name, dtype, None)
            for name, dtype in self.types.items()
            if name not in graph_io
        ]


def _np(tensor) -> np.ndarray:
    return tensor.detach().float().cpu().numpy()


def _linear(g: _Graph, x: str, linear, name: str) -> str:
    """x @ W^T (+ b): weights are stored transposed once, at build time."""
    y = g.op("MatMul", [x, g.weight(f"{name}.weight_t", _np(linear.weight).T, [(linear.weight, True, None)])])
    if linear.bias is not None:
        y = g.op("Add", [y, g.weight(f"{name}.bias", _np(linear.bias), [(linear.bias, False, None)])])
    return y


def _rotary_caches(model, head_dim: int) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin [max_positions, head_dim/2] from the model's own rotary module (so RoPE scaling
    variants come for free); HF duplicates the half, GroupQueryAttention takes one half."""
    import torch

    positions = torch.arange(model.config.max_position_embeddings).unsqueeze(0)
    with torch.no_grad():
        cos, sin = model.model.rotary_emb(torch.zeros(1, dtype=torch.float32), positions)
    half = head_dim // 2
    cos, sin = _np(cos[0]), _np(sin[0])
    if not (np.array_equal(cos[:, :half], cos[:, half:]) and np.array_equal(sin[:, :half], sin[:, half:])):
        raise UsageError("this model's rotary embedding is not the half-split form GroupQueryAttention implements")
    return cos[:, :half], sin[:, :half]


def build(model, out_dir: Path, opset: int = OPSET, vocab_subset=None) -> Path:
    """Write `out_dir/model.onnx` for a loaded Llama/Qwen2 causal LM (float32); return its path.

    vocab_subset: token ids the LM head scores (a draft's truncated head, see `_lm_head`); the
    logits keep the full vocabulary, -inf outside the subset."""
    import onnx
    from onnx import TensorProto, helper

    reason = unsupported_reason(model)
    if reason:
        raise UsageError(f"the fused ONNX graph does not support {reason}; export with `graph: optimum`")
    cfg, body = model.config, model.model
    layers = body.layers
    head_dim = layers[0].self_attn.head_dim
    eps = float(cfg.rms_norm_eps)
    vocab, hidden = body.embed_tokens.weight.shape
    n_kv = layers[0].self_attn.k_proj.weight.shape[0] // head_dim

    g = _Graph(model)
    embed = g.weight("embed_tokens.weight", _np(body.embed_tokens.weight), [(body.embed_tokens.weight, False, None)])
    cos, sin = (g.weight(n, a) for n, a in zip(("cos_cache", "sin_cache"), _rotary_caches(model, head_dim)))
    x = g.op("Gather", [embed, "input_ids"])
    # GroupQueryAttention's view of the mask: per-sequence index of the last token, total length
    one = g.weight("one", np.array(1, dtype=np.int64))
    int64 = TensorProto.INT64
    summed = g.op(
        "ReduceSum", ["attention_mask", g.weight("axis_1", np.array([1], dtype=np.int64))], keepdims=0, dtype=int64
    )
    seqlens_k = g.op("Cast", [g.op("Sub", [summed, one], dtype=int64)], to=TensorProto.INT32)
    mask_shape = g.op("Shape", ["attention_mask"], dtype=int64)
    total = g.op("Cast", [g.op("Gather", [mask_shape, one], axis=0, dtype=int64)], to=TensorProto.INT32)

    residual, pending = None, x  # pending: the block output not yet added to the residual stream
    presents = []
    for i, layer in enumerate(layers):
        p = f"layers.{i}"
        attn, mlp = layer.self_attn, layer.mlp
        h, residual = _add_and_norm(g, pending, residual, layer.input_layernorm.weight, f"{p}.input_layernorm", eps)
        projections = (attn.q_proj, attn.k_proj, attn.v_proj)
        bounds = np.cumsum([0] + [lin.weight.shape[0] for lin in projections]).tolist()
        spans = [bounds[j : j + 2] for j in range(3)]  # each projection's columns of the packed matrix
        qkv_w = np.concatenate([_np(lin.weight) for lin in projections])
        packed = [(lin.weight, True, span) for lin, span in zip(projections, spans)]
        qkv = g.op("MatMul", [h, g.weight(f"{p}.qkv_proj.weight_t", qkv_w.T, packed)])
        if any(lin.bias is not None for lin in projections):
            bias = [
                _np(lin.bias) if lin.bias is not None else np.zeros(lin.weight.shape[0], np.float32)
                for lin in projections
            ]
            held = [(lin.bias, False, span) for lin, span in zip(projections, spans) if lin.bias is not None]
            qkv = g.op("Add", [qkv, g.weight(f"{p}.qkv_proj.bias", np.concatenate(bias), held)])
        present = [f"present.{i}.key", f"present.{i}.value"]
        context, *_ = g.op(
            "GroupQueryAttention",
            [qkv, "", "", f"past_key_values.{i}.key", f"past_key_values.{i}.value", seqlens_k, total, cos, sin],
            [f"{p}.attn_out", *present],
            domain=MS_DOMAIN,
            num_heads=attn.q_proj.weight.shape[0] // head_dim,
            kv_num_heads=n_kv,
            scale=float(attn.scaling),
            do_rotary=1,
            rotary_interleaved=0,
            local_window_size=-1,
        )
        presents += present
        attn_out = _linear(g, context, attn.o_proj, f"{p}.o_proj")
        h, residual = _add_and_norm(
            g, attn_out, residual, layer.post_attention_layernorm.weight, f"{p}.post_attention_layernorm", eps
        )
        gate = _linear(g, h, mlp.gate_proj, f"{p}.gate_proj")
        act = g.op("Mul", [g.op("Mul", [gate, g.op("Sigmoid", [gate])]), _linear(g, h, mlp.up_proj, f"{p}.up_proj")])
        pending = _linear(g, act, mlp.down_proj, f"{p}.down_proj")
    h, _ = _add_and_norm(g, pending, residual, body.norm.weight, "norm", eps)
    g.op(
        "Reshape",
        [
            _lm_head(g, model, h, hidden, embed, vocab_subset),
            g.op(
                "Concat",
                [g.op("Shape", ["input_ids"], dtype=int64), g.weight("vocab", np.array([vocab], np.int64))],
                axis=0,
                dtype=int64,
            ),
        ],
        ["logits"],
    )

    batch, seq, past, total_len = "batch_size", "sequence_length", "past_sequence_length", "total_sequence_length"
    kv_shape = lambda length: [batch, n_kv, length, head_dim]  # noqa: E731
    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, [batch, seq]),
        helper.make_tensor_value_info("attention_mask", TensorProto.INT64, [batch, total_len]),
    ]
    inputs += [
        helper.make_tensor_value_info(f"past_key_values.{i}.{kind}", TensorProto.FLOAT, kv_shape(past))
        for i in range(len(layers))
        for kind in ("key", "value")
    ]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, seq, vocab])]
    outputs += [helper.make_tensor_value_info(name, TensorProto.FLOAT, kv_shape(total_len)) for name in presents]
    io = {v.name for v in inputs + outputs}
    proto = helper.make_model(
        helper.make_graph(
            g.nodes, "accelc_fused_decoder", inputs, outputs, g.initializers, value_info=g.value_info(io)
        ),
        opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(MS_DOMAIN, 1)],
        producer_name="accelc.compiler.fused_decoder",
    )
    # GroupQueryAttention appends into `past` when present is the same buffer: runtimes may keep
    # the cache in place (runtime/ort_backend.py) instead of copying it every step
    helper.set_model_props(proto, {IN_PLACE_KV[0]: IN_PLACE_KV[1], WEIGHT_VIEWS: json.dumps(g.views)})
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "model.onnx"
    # weights in <graph>.data whatever their size (protobuf caps a proto at 2 GB anyway): ONNX
    # Runtime maps that file instead of parsing a copy of every weight out of the proto, which
    # kept ~200 MB more resident on SmolLM2 (docs/peers.md)
    onnx.save_model(
        proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=path.name + ".data"
    )
    return path


def _add_and_norm(g: _Graph, block_out: str, residual: str | None, weight, name: str, eps: float):
    """RMSNorm(residual + block_out) and the new residual; the first layer has no residual yet."""
    gamma = g.weight(f"{name}.weight", _np(weight), [(weight, False, None)])
    if residual is None:
        return g.op("SimplifiedLayerNormalization", [block_out, gamma], epsilon=eps, axis=-1, stash_type=1), block_out
    normed, summed = f"{name}.out", f"{name}.residual"
    g.op(
        "SkipSimplifiedLayerNormalization",
        [block_out, residual, gamma],
        [normed, "", "", summed],
        domain=MS_DOMAIN,
        epsilon=eps,
    )
    return normed, summed


def _lm_head(g: _Graph, model, h: str, hidden: int, embed: str, vocab_subset) -> str:
    """Logits as [tokens, vocab]. A tied head multiplies by the embedding itself (stored once).

    With `vocab_subset` only those rows are multiplied (a plain MatMul, so weight quantisation
    reaches it) and scattered into a -inf row: the head is a fifth of SmolLM2's weights, and a
    draft that scores 8k likely tokens instead of 49k is that much cheaper. Speculative sampling
    stays exact with such a draft: q is simply zero outside the subset."""
    head = model.lm_head
    flat = g.op("Reshape", [h, g.weight("flat_hidden", np.array([-1, hidden], np.int64))])
    weight, bias = _np(head.weight), None if head.bias is None else _np(head.bias)
    if vocab_subset is None:
        tied = head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
        if not tied:
            embed = g.weight("lm_head.weight", weight, [(head.weight, False, None)])
        logits = g.op("Gemm", [flat, embed], transB=1)
        return (
            logits
            if bias is None
            else g.op("Add", [logits, g.weight("lm_head.bias", bias, [(head.bias, False, None)])])
        )
    from onnx import TensorProto, helper

    subset = np.unique(np.asarray(vocab_subset, dtype=np.int64))
    if subset.size == 0 or subset[0] < 0 or subset[-1] >= weight.shape[0]:
        raise UsageError(f"vocab_subset must be token ids in [0, {weight.shape[0]})")
    scores = g.op("MatMul", [flat, g.weight("lm_head.subset_weight_t", weight[subset].T)])
    if bias is not None:
        scores = g.op("Add", [scores, g.weight("lm_head.subset_bias", bias[subset])])
    int64 = TensorProto.INT64
    rows = g.op(
        "Slice",
        [
            g.op("Shape", [flat], dtype=int64),
            g.weight("zero_1d", np.array([0], np.int64)),
            g.weight("one_1d", np.array([1], np.int64)),
        ],
        dtype=int64,
    )
    full = g.op(
        "ConstantOfShape",
        [g.op("Concat", [rows, g.weight("vocab_1d", np.array([weight.shape[0]], np.int64))], axis=0, dtype=int64)],
        value=helper.make_tensor("neg_inf", TensorProto.FLOAT, [1], [-np.inf]),
    )
    index = g.op(
        "Expand",
        [
            g.weight("lm_head.subset_ids", subset[None, :]),
            g.op("Concat", [rows, g.weight("subset_1d", np.array([subset.size], np.int64))], axis=0, dtype=int64),
        ],
        dtype=int64,
    )
    return g.op("ScatterElements", [full, index, scores], axis=1)


def view_arrays(graph: Path, names) -> dict[str, np.ndarray] | None:
    """The arrays of parameters `names` as the fused graph at `graph` stores them, in the model's
    own layout; None when the graph does not hold every one as a plain float initializer (a
    quantisation pass replaced it, or the graph has no views)."""
    import onnx
    from onnx import numpy_helper

    # weights stay on disk until one is wanted: a rewritten graph answers None before any is read
    model = onnx.load(str(graph), load_external_data=False)
    props = {p.key: p.value for p in model.metadata_props}
    views = json.loads(props.get(WEIGHT_VIEWS, "{}"))
    inits = {t.name: t for t in model.graph.initializer}
    out = {}
    for name in names:
        view = views.get(name)
        if view is None or view["initializer"] not in inits:
            return None
        array = numpy_helper.to_array(inits[view["initializer"]], base_dir=str(Path(graph).parent))
        if view["columns"] is not None:
            array = array[..., slice(*view["columns"])]
        out[name] = np.ascontiguousarray(array.T if view["transposed"] else array)
    return out
