"""quantize_weights_int4's `head` option: the tied LM head becomes a 4- or 8-bit MatMul of its own."""

from __future__ import annotations

import numpy as np
import pytest

from accelc.compiler import fused_decoder
from accelc.errors import UsageError
from accelc.passes.quantize import quantize_matmul_nbits
from accelc.runtime.ort_backend import OrtStepModel

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def fused(tmp_path_factory):
    from accelc.families import tiny
    from accelc.families.causal_lm import load_model

    root = tmp_path_factory.mktemp("quantize")
    model = load_model(tiny.build("tiny-llama", root / "tiny-llama"))
    assert model.config.tie_word_embeddings  # the case the option exists for
    return fused_decoder.build(model, root / "onnx")


def _ops(path):
    import onnx

    graph = onnx.load(str(path)).graph
    weights = {t.name for t in graph.initializer}
    return [n.op_type for n in graph.node], [n for n in graph.node if n.op_type == "Gemm" and n.input[1] in weights]


def test_head_option_quantises_the_tied_head_and_keeps_the_embedding(fused, tmp_path):
    plain = quantize_matmul_nbits(fused, tmp_path / "plain.onnx", bits=4, block_size=16)
    head = quantize_matmul_nbits(fused, tmp_path / "head.onnx", bits=4, block_size=16, head=True)
    plain_ops, plain_gemms = _ops(plain)
    head_ops, head_gemms = _ops(head)
    assert len(plain_gemms) == 1 and not head_gemms
    assert head_ops.count("MatMulNBits") == plain_ops.count("MatMulNBits") + 1
    assert "Gather" in head_ops  # the lookup still reads the fp32 embedding

    ids = np.arange(1, 13)[None, :]
    logits = {}
    for name, graph in (("fp32", fused), ("plain", plain), ("head", head)):
        step = OrtStepModel(graph)
        logits[name], _ = step.extend(step.empty_state(), ids)
    # 4-bit weights move the logits, the head's a little more; a wrong rewrite moves them by far more
    scale = np.abs(logits["fp32"]).max()
    assert np.abs(logits["plain"] - logits["fp32"]).max() < 0.5 * scale
    assert 0 < np.abs(logits["head"] - logits["plain"]).max() < 0.5 * scale


def _logits(graph):
    step = OrtStepModel(graph)
    return step.extend(step.empty_state(), np.arange(1, 13)[None, :])[0]


def test_an_8_bit_head_over_4_bit_layers_is_one_8_bit_node_and_closer_to_fp32(fused, tmp_path):
    import onnx

    four = quantize_matmul_nbits(fused, tmp_path / "h4.onnx", bits=4, block_size=16, head=True)
    eight = quantize_matmul_nbits(fused, tmp_path / "h8.onnx", bits=4, block_size=16, head=True, head_bits=8)
    nodes = [n for n in onnx.load(str(eight)).graph.node if n.op_type == "MatMulNBits"]
    bits = {n.name: next(a.i for a in n.attribute if a.name == "bits") for n in nodes}
    assert sorted(bits.values()).count(8) == 1 and len(bits) == _ops(four)[0].count("MatMulNBits")
    assert next(name for name, b in bits.items() if b == 8).startswith(
        next(n.name for n in onnx.load(str(fused)).graph.node if n.op_type == "Gemm")
    )
    exact = _logits(fused)
    assert np.abs(_logits(eight) - exact).max() < np.abs(_logits(four) - exact).max()


def test_head_option_on_a_graph_without_a_head_is_refused(fused, tmp_path):
    import onnx

    model = onnx.load(str(fused))
    kept = [n for n in model.graph.node if n.op_type != "Gemm"]
    del model.graph.node[:]
    model.graph.node.extend(kept)
    headless = tmp_path / "headless.onnx"
    onnx.save(model, str(headless))
    with pytest.raises(UsageError, match="found no LM head"):
        quantize_matmul_nbits(headless, tmp_path / "out.onnx", bits=4, block_size=16, head=True)


def _run_node(model, node, feeds: dict):
    """One node of `model` in a session of its own, over the model's initializers."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    inputs = [
        helper.make_tensor_value_info(name, onnx.helper.np_dtype_to_tensor_dtype(a.dtype), a.shape)
        for name, a in feeds.items()
    ]
    graph = helper.make_graph(
        [node],
        "one",
        inputs,
        [helper.make_tensor_value_info(node.output[0], TensorProto.FLOAT, None)],
        [t for t in model.graph.initializer if t.name in node.input],
    )
    one = helper.make_model(graph, opset_imports=list(model.opset_import))
    return ort.InferenceSession(one.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]


@pytest.mark.parametrize("head_bits", [4, 8])
def test_the_lookup_on_the_heads_blocks_gathers_the_rows_the_head_scores(fused, tmp_path, head_bits):
    """lookup=True: no fp32 vocabulary table is left, and each gathered row is, bit for bit, the
    head's dequantised weight row (read back through the head's own MatMulNBits at level 0)."""
    import onnx

    out = quantize_matmul_nbits(
        fused, tmp_path / "lookup.onnx", bits=4, block_size=16, head=True, head_bits=head_bits, lookup=True
    )
    model = onnx.load(str(out))
    lookup = next(n for n in model.graph.node if n.op_type == "GatherBlockQuantized")
    head = next(n for n in model.graph.node if n.op_type == "MatMulNBits" and ".head_t" in n.input[1])
    assert not any(
        n.op_type == "Gather" and n.input[0] in {t.name for t in model.graph.initializer} for n in model.graph.node
    )
    k = next(a.i for a in head.attribute if a.name == "K")
    rows = _run_node(model, lookup, {lookup.input[1]: np.arange(5, 17, dtype=np.int64)})
    exact_head = onnx.helper.make_node(head.op_type, ["eye", *head.input[1:]], ["w"], domain=head.domain)
    exact_head.attribute.extend(a for a in head.attribute if a.name != "accuracy_level")
    weight = _run_node(model, exact_head, {"eye": np.eye(k, dtype=np.float32)})  # [K, vocab]
    assert np.array_equal(rows.view(np.uint32), np.ascontiguousarray(weight.T[5:17]).view(np.uint32))
    plain = quantize_matmul_nbits(fused, tmp_path / "plain.onnx", bits=4, block_size=16, head=True, head_bits=head_bits)
    scale = np.abs(_logits(fused)).max()
    assert 0 < np.abs(_logits(out) - _logits(plain)).max() < 0.5 * scale  # the rows moved, a little
