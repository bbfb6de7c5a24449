"""The fused ONNX decoder (fused_decoder.py) computes what the torch model computes.

Every StepModel call shape is checked against one torch forward over the whole sequence:
prefill, k-token verification on a cache, single-token decode, and re-extension after a KV
truncation (what speculative decoding does after a rejection). Tiny seeded Llama and Qwen2
(q/k/v biases), and a pruned Llama with per-layer head counts, MLP widths and the consumer
biases FLAP's compensation adds.
"""

from __future__ import annotations

import numpy as np
import pytest

from accelc.compiler import fused_decoder
from accelc.errors import UsageError
from accelc.runtime.ort_backend import OrtStepModel

torch = pytest.importorskip("torch")


def _load(name, tmp_path):
    from accelc.families import tiny
    from accelc.families.causal_lm import load_model

    return load_model(tiny.build(name, tmp_path / name))


def assert_graph_matches_torch(model, out_dir, length=20):
    step = OrtStepModel(fused_decoder.build(model, out_dir))
    ids = np.random.default_rng(0).integers(0, model.config.vocab_size, size=(1, length))
    with torch.no_grad():
        expected = model(torch.as_tensor(ids)).logits[0].numpy()
    prefill, state = step.extend(step.empty_state(), ids[:, :12])
    verify, state = step.extend(state, ids[:, 12:16])
    decode, state = step.extend(state, ids[:, 16:17])
    np.testing.assert_allclose(np.concatenate([prefill, verify, decode]), expected[:17], atol=1e-4, rtol=1e-4)
    again, _ = step.extend(step.truncate(state, 14), ids[:, 14:length])
    np.testing.assert_allclose(again, expected[14:length], atol=1e-4, rtol=1e-4)
    return step


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2"])
def test_fused_graph_matches_torch_on_every_call_shape(name, tmp_path):
    import onnx

    model = _load(name, tmp_path)
    step = assert_graph_matches_torch(model, tmp_path / "onnx")
    graph = onnx.load(str(tmp_path / "onnx" / "model.onnx"), load_external_data=False).graph
    ops = [n.op_type for n in graph.node]
    assert ops.count("GroupQueryAttention") == model.config.num_hidden_layers
    assert step.n_layers == model.config.num_hidden_layers
    if model.config.tie_word_embeddings:  # the tied head reads the embedding: stored once
        assert sum(t.name == "embed_tokens.weight" for t in graph.initializer) == 1
        assert not any("lm_head" in t.name for t in graph.initializer)


def test_fused_graph_of_a_pruned_model_with_compensation_biases(tmp_path):
    from accelc.compiler.pruning import masks, materialize

    model = _load("tiny-llama", tmp_path)
    space = masks.SearchSpace(masks.Geometry.from_model(model), gqa="query")
    rng = np.random.default_rng(3)
    L, geo = space.geometry.num_layers, space.geometry
    sub = space.from_scores(
        [i % len(space.head_options) for i in range(L)],
        [space.widths[i % len(space.widths)] for i in range(L)],
        rng.random((L, geo.num_heads)),
        rng.random((L, geo.intermediate)),
    )
    small = materialize.shrink(model, sub)
    torch.manual_seed(0)
    for layer in small.model.layers:  # what FLAP's bias compensation leaves behind
        for lin in (layer.self_attn.o_proj, layer.mlp.down_proj):
            lin.bias = torch.nn.Parameter(torch.randn(lin.out_features) * 0.1, requires_grad=False)
    widths = materialize.widths(small)
    assert len(set(widths["num_heads"])) > 1 or len(set(widths["intermediate_sizes"])) > 1
    assert_graph_matches_torch(small, tmp_path / "onnx")


def test_unsupported_models_are_named(tmp_path):
    model = _load("tiny-gpt2", tmp_path)
    assert "gpt2" in fused_decoder.unsupported_reason(model)
    with pytest.raises(UsageError, match="graph: optimum"):
        fused_decoder.build(model, tmp_path / "onnx")


def test_export_pass_picks_the_graph_and_refuses_fused_where_unsupported(cli, tiny_recipe, tmp_path):
    import json

    out = tmp_path / "fused"
    assert cli("compile", tiny_recipe(), "-o", out)[0] == 0
    assert json.loads((out / "manifest.json").read_text())["graph_meta"]["decoder"]["graph"] == "fused"
    code, _, err = cli("compile", tiny_recipe(), "-o", tmp_path / "traced", "--set", "passes.0.graph=optimum")
    assert code == 0, err
    assert (
        json.loads((tmp_path / "traced" / "manifest.json").read_text())["graph_meta"]["decoder"]["graph"] == "optimum"
    )
    code, _, err = cli("compile", tiny_recipe("tiny-gpt2"), "-o", tmp_path / "gpt2", "--set", "passes.0.graph=fused")
    assert code == 2 and "model_type 'gpt2'" in err and "graph: optimum" in err


def test_truncated_head_scores_its_subset_exactly_and_nothing_else(tmp_path):
    model = _load("tiny-qwen2", tmp_path)
    subset = np.arange(5, model.config.vocab_size, 7)
    step = OrtStepModel(fused_decoder.build(model, tmp_path / "onnx", vocab_subset=subset))
    ids = np.random.default_rng(1).integers(0, model.config.vocab_size, size=(1, 9))
    with torch.no_grad():
        expected = model(torch.as_tensor(ids)).logits[0].numpy()
    logits, _ = step.extend(step.empty_state(), ids)
    np.testing.assert_allclose(logits[:, subset], expected[:, subset], atol=1e-4, rtol=1e-4)
    outside = np.setdiff1d(np.arange(model.config.vocab_size), subset)
    assert np.isneginf(logits[:, outside]).all()
    with pytest.raises(UsageError, match="token ids"):
        fused_decoder.build(model, tmp_path / "bad", vocab_subset=[model.config.vocab_size])


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2"])
def test_the_graph_says_where_every_parameter_is_stored(name, tmp_path):
    """`view_arrays` gives back every parameter bit for bit (q/k/v out of the packed matrix,
    transposed weights, biases, the tied head), and None once a pass has replaced a weight."""
    import onnx

    model = _load(name, tmp_path)
    graph = fused_decoder.build(model, tmp_path / "onnx")
    params = dict(model.named_parameters(remove_duplicate=False))
    held = fused_decoder.view_arrays(graph, params)
    assert held is not None and held.keys() == params.keys()
    for key, param in params.items():
        assert np.array_equal(held[key], param.detach().numpy()), key

    proto = onnx.load(str(graph))
    proto.graph.initializer.remove(next(t for t in proto.graph.initializer if t.name == "layers.0.qkv_proj.weight_t"))
    onnx.save(proto, str(graph))
    assert fused_decoder.view_arrays(graph, params) is None
