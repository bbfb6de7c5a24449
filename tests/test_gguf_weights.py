"""gguf_weights: a GGUF's own 4-bit blocks carried into an ONNX graph, bit for bit.

A tiny GGUF is written with gguf's own writer and quantiser; the weights a torch model of
record holds are gguf's dequantisation of it (what transformers loads), here rearranged as
exporters do (rows permuted, q|k concatenated, transposed into MatMul initializers).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from accelc.errors import UsageError
from accelc.gguf_blocks import Blocks, GGUFBlocks
from accelc.passes.gguf_weights import _centred, _centred_on_zero, carry_blocks, source_gguf

gguf = pytest.importorskip("gguf")
K = 64  # two blocks of 32 along the input dimension


def write_gguf(path, tensors: dict[str, tuple[np.ndarray, str]]) -> None:
    writer = gguf.GGUFWriter(str(path), "llama")
    for name, (values, kind) in tensors.items():
        qtype = gguf.GGMLQuantizationType[kind]
        writer.add_tensor(name, gguf.quants.quantize(values, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A GGUF (Q4_1 q/k with a zero-scale block, Q4_0 down, Q8_0 embedding) and a graph over its weights."""
    rng = np.random.default_rng(0)
    work = tmp_path_factory.mktemp("gguf")
    q, k = rng.standard_normal((8, K), dtype=np.float32), rng.standard_normal((4, K), dtype=np.float32)
    q[3, :32] = 0.25  # a constant block: Q4_1 stores d = 0
    tensors = {
        "blk.0.attn_q.weight": (q, "Q4_1"),
        "blk.0.attn_k.weight": (k, "Q4_1"),
        "blk.0.ffn_down.weight": (rng.standard_normal((6, K), dtype=np.float32), "Q4_0"),
        "token_embd.weight": (rng.standard_normal((10, K), dtype=np.float32), "Q8_0"),
    }
    write_gguf(work / "tiny.gguf", tensors)
    reader = gguf.GGUFReader(work / "tiny.gguf")
    w = {t.name: gguf.quants.dequantize(t.data, t.tensor_type) for t in reader.tensors}
    # the exporter's view: q's rows permuted (rotary), q|k concatenated, weights transposed
    qk = np.concatenate([w["blk.0.attn_q.weight"][[1, 0, 3, 2, 5, 4, 7, 6]], w["blk.0.attn_k.weight"]])
    weights = {"qk_t": qk.T, "down_t": w["blk.0.ffn_down.weight"].T, "embd_t": w["token_embd.weight"].T}
    nodes = [helper.make_node("MatMul", ["x", name], [f"y_{name}"], name=f"mm_{name}") for name in weights]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, K])],
        [helper.make_tensor_value_info(f"y_{n}", TensorProto.FLOAT, None) for n in weights],
        [numpy_helper.from_array(np.ascontiguousarray(a), n) for n, a in weights.items()],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), work / "model.onnx")
    return work, weights


def run(path, x):
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, {"x": x})))


def initializers(path) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}


@pytest.mark.parametrize("layout", ["split", "float_zero_point"])
def test_the_graph_computes_the_dequantised_weights(tiny, layout):
    work, weights = tiny
    dst = work / f"{layout}.onnx"
    assert carry_blocks(work / "model.onnx", dst, GGUFBlocks(work / "tiny.gguf"), layout, 0) == (2, 3, 0)
    ops = [n.op_type for n in onnx.load(str(dst)).graph.node]
    assert ops.count("MatMulNBits") == 2 and "embd_t" in initializers(dst)  # the Q8_0 tensor stays fp32
    x = np.random.default_rng(1).standard_normal((1, 3, K), dtype=np.float32)
    got = run(dst, x)
    for name, w in weights.items():
        expected = x.astype(np.float64) @ w.astype(np.float64)
        np.testing.assert_allclose(got[f"y_{name}"], expected, rtol=2e-6, atol=1e-5)  # float32 sums


def test_the_carried_blocks_reproduce_the_weights_bit_for_bit(tiny):
    work, weights = tiny
    dst = work / "bits.onnx"
    carry_blocks(work / "model.onnx", dst, GGUFBlocks(work / "tiny.gguf"), "split", 0)
    init = initializers(dst)
    for name, symmetric in (("mm_qk_t", False), ("mm_down_t", True)):
        packed = init[f"{name}.q4"]  # [N, blocks, 16]: element 2i in the low nibble, 2i+1 in the high
        codes = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(*packed.shape[:2], 32).astype(np.float32)
        scale = init[f"{name}.scale"].reshape(packed.shape[:2])
        if symmetric:  # Q4_0: d * (q - 8)
            rebuilt = scale[..., None] * (codes - 8)
        else:  # Q4_1: d * (q - 8) + (m + 8d), the centred minima
            assert f"{name}.zero_point" not in init
            rebuilt = scale[..., None] * (codes - 8) + init[f"{name}.minimum_t"].T[..., None]
        rebuilt = rebuilt.reshape(len(packed), -1)
        reference = weights[name.removeprefix("mm_")].T
        assert np.array_equal(rebuilt.view(np.uint32), np.ascontiguousarray(reference).view(np.uint32))


def test_weights_not_from_the_file_are_left_alone(tiny):
    work, weights = tiny
    nudged = dict(weights, qk_t=np.nextafter(weights["qk_t"], np.float32(9)))
    blocks = GGUFBlocks(work / "tiny.gguf")
    assert blocks.find(nudged["qk_t"].T) is None and blocks.find(weights["qk_t"].T) is not None


def test_a_gguf_without_4_bit_tensors_is_refused(tmp_path):
    write_gguf(tmp_path / "f32.gguf", {"blk.0.attn_q.weight": (np.ones((4, K), np.float32), "F32")})
    with pytest.raises(UsageError, match=r"no Q4_0 or Q4_1 tensors.*F32"):
        GGUFBlocks(tmp_path / "f32.gguf")


def test_a_model_not_ingested_from_a_gguf_is_refused():
    with pytest.raises(UsageError, match=r"GGUF file.*hf:/models/x") as info:
        source_gguf({"description": "hf:/models/x"})
    assert info.value.exit_code == 2
    with pytest.raises(UsageError, match="builtin:tiny-llama"):
        source_gguf({"description": "builtin:tiny-llama"})


@pytest.mark.parametrize(
    "step",
    [
        "  - type: gguf_weights\n",
        "  - type: speculative\n    draft: {from_target: true, weights: gguf}\n",
    ],
)
def test_a_compile_of_a_model_without_a_gguf_source_exits_2(cli, tiny_recipe, tmp_path, step):
    recipe = tiny_recipe(extra="")
    recipe.write_text(recipe.read_text().replace("  - type: export_onnx\n", "  - type: export_onnx\n" + step))
    code, _, err = cli("compile", recipe, "-o", tmp_path / "out")
    assert code == 2 and "builtin:tiny-llama" in err and "gguf" in err


def test_weight_views_into_replaced_weights_are_dropped(tiny):
    """TVM may read a parameter from the fused graph (weight views): none may name a weight
    the pass replaced, and views of weights it kept stay."""
    import json

    from accelc.compiler.fused_decoder import WEIGHT_VIEWS

    work, _ = tiny
    model = onnx.load(str(work / "model.onnx"))
    views = {n: {"initializer": n, "columns": None, "transposed": True} for n in ("qk_t", "down_t", "embd_t")}
    helper.set_model_props(model, {WEIGHT_VIEWS: json.dumps(views)})
    onnx.save(model, work / "viewed.onnx")
    carry_blocks(work / "viewed.onnx", work / "viewed.q4.onnx", GGUFBlocks(work / "tiny.gguf"), "split", 0)
    props = {p.key: p.value for p in onnx.load(str(work / "viewed.q4.onnx")).metadata_props}
    assert set(json.loads(props[WEIGHT_VIEWS])) == {"embd_t"}


def test_q8_0_weights_and_a_tied_head_carried_as_8_bit_blocks(tiny):
    """With eight_bit, a MatMul on Q8_0 rows and a tied head (Gemm transB=1 on the Q8_0
    embedding) become 8-bit MatMulNBits whose codes are the file's, bit for bit, and the
    embedding lookup gathers the same blocks: no fp32 copy of the table is left."""
    work, weights = tiny
    model = onnx.load(str(work / "model.onnx"))
    embedding = np.ascontiguousarray(weights["embd_t"].T)  # [vocab, K], as the fused graph's tied head reads it
    model.graph.initializer.append(numpy_helper.from_array(embedding, "embedding"))
    model.graph.node.append(helper.make_node("Gemm", ["x2", "embedding"], ["logits"], name="head", transB=1))
    model.graph.node.append(helper.make_node("Gather", ["embedding", "ids"], ["rows"], name="lookup"))
    model.graph.node.insert(0, helper.make_node("Reshape", ["x", "flat"], ["x2"], name="flatten"))
    model.graph.initializer.append(numpy_helper.from_array(np.array([-1, K], np.int64), "flat"))
    model.graph.input.append(helper.make_tensor_value_info("ids", TensorProto.INT64, [2]))
    model.graph.output.extend([helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("logits", "rows")])
    onnx.save(model, work / "tied.onnx")
    dst = work / "tied.q8.onnx"
    assert carry_blocks(work / "tied.onnx", dst, GGUFBlocks(work / "tiny.gguf"), "split", 0, eight_bit=True) == (
        4,
        4,
        1,
    )
    graph = onnx.load(str(dst)).graph
    nbits = {
        n.name: {a.name: helper.get_attribute_value(a) for a in n.attribute}
        for n in graph.node
        if n.op_type == "MatMulNBits"
    }
    assert {name: (a["bits"], a["accuracy_level"]) for name, a in nbits.items()} == {
        "mm_qk_t.nbits": (4, 0),
        "mm_down_t.nbits": (4, 0),
        "mm_embd_t.nbits": (8, 4),
        "head.matmul.nbits": (8, 4),
    }
    init = initializers(dst)
    for name in ("mm_embd_t", "head.matmul"):  # Q8_0: d * (u - 128)
        codes = init[f"{name}.q8"].astype(np.float32)
        rebuilt = (init[f"{name}.scale"].reshape(codes.shape[:2])[..., None] * (codes - 128)).reshape(len(codes), -1)
        assert np.array_equal(rebuilt.view(np.uint32), embedding.view(np.uint32))
    assert "embedding" not in init and "embedding.head_t" not in init
    assert np.array_equal(init["lookup.q8"], init["head.matmul.q8"].reshape(len(embedding), -1))
    x = np.random.default_rng(2).standard_normal((1, 3, K), dtype=np.float32)
    import onnxruntime as ort

    session = ort.InferenceSession(str(dst), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    got = dict(zip(names, session.run(None, {"x": x, "ids": np.array([3, 7])})))
    expected = x.reshape(3, K).astype(np.float64) @ embedding.T.astype(np.float64)
    # int8 activations: each block of 32 inputs rounded to 1/127 of its largest magnitude
    np.testing.assert_allclose(got["logits"], expected, rtol=0, atol=0.05 * np.abs(expected).max())
    assert np.array_equal(got["rows"], embedding[[3, 7]])


def test_a_lookup_on_q4_0_rows_gathers_the_blocks_and_q8_0_stays_fp32_by_default(tiny):
    """A Gather on Q4_0 rows is exact as blocks (nothing is computed) and carried always; one on
    Q8_0 rows only with eight_bit."""
    work, weights = tiny
    model = onnx.load(str(work / "model.onnx"))
    tables = {"down": weights["down_t"].T, "embd": weights["embd_t"].T}  # [rows, K]: Q4_0 and Q8_0
    for name, table in tables.items():
        model.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(table), f"{name}_rows"))
        model.graph.node.append(helper.make_node("Gather", [f"{name}_rows", "ids"], [f"got_{name}"], name=f"g_{name}"))
        model.graph.output.append(helper.make_tensor_value_info(f"got_{name}", TensorProto.FLOAT, None))
    model.graph.input.append(helper.make_tensor_value_info("ids", TensorProto.INT64, [3]))
    onnx.save(model, work / "lookups.onnx")
    dst = work / "lookups.q4.onnx"
    assert carry_blocks(work / "lookups.onnx", dst, GGUFBlocks(work / "tiny.gguf"), "split", 0) == (2, 3, 1)
    ops = {n.name: n.op_type for n in onnx.load(str(dst)).graph.node}
    assert ops["g_down.blocks"] == "GatherBlockQuantized" and ops["g_embd"] == "Gather"
    import onnxruntime as ort

    session = ort.InferenceSession(str(dst), providers=["CPUExecutionProvider"])
    ids = np.array([5, 0, 2])
    x = np.zeros((1, 3, K), np.float32)
    got = dict(zip([o.name for o in session.get_outputs()], session.run(None, {"x": x, "ids": ids})))
    for name, table in tables.items():
        assert np.array_equal(got[f"got_{name}"].view(np.uint32), np.ascontiguousarray(table[ids]).view(np.uint32))


def test_minima_are_centred_only_where_float32_holds_them_exactly():
    """m + 8d replaces m only when exact; otherwise the codes keep zero point 0."""
    codes = np.zeros((1, 1, 32), np.uint8)
    fits = Blocks(np.float32([[0.5]]), np.float32([[-3.75]]), codes, symmetric=False)
    np.testing.assert_array_equal(_centred(fits), [[0.25]])
    tiny_scale = np.float32([[2.0**-24]])  # fp16's smallest subnormal beside a minimum of 1024
    assert _centred(Blocks(tiny_scale, np.float32([[1024.0]]), codes, symmetric=False)) is None
    # centred on its own zero: z = round(3.75 / 0.5) = 8 here; beside -1024, z clips to 15 and
    # -1024 + 15 * 3 * 2^-24 needs more bits than float32 has
    zero, residual = _centred_on_zero(fits)
    assert zero.tolist() == [[8]] and residual.tolist() == [[0.25]]
    assert _centred_on_zero(Blocks(3 * tiny_scale, np.float32([[-1024.0]]), codes, symmetric=False)) is None


def test_int8_compute_centres_each_q4_1_block_on_its_own_zero_bit_for_bit(tiny):
    """At accuracy_level 4 the split layout reads Q4_1 as d (q - z) + (m + d z), z = round(-m/d)
    as 4-bit zero points: the weights rebuild to the file's to the bit, the zero points sit
    within each block's codes, and Q4_0's down keeps MatMulNBits' own symmetric form."""
    work, weights = tiny
    dst = work / "own_zero.onnx"
    carry_blocks(work / "model.onnx", dst, GGUFBlocks(work / "tiny.gguf"), "split", 4)
    init = initializers(dst)
    assert "mm_down_t.zero_point" not in init
    packed = init["mm_qk_t.q4"]
    codes = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(*packed.shape[:2], 32).astype(np.float32)
    zp = init["mm_qk_t.zero_point"].reshape(len(packed), -1)
    zero = np.stack([zp & 0x0F, zp >> 4], axis=-1).reshape(len(packed), -1)[:, : packed.shape[1]]
    assert len(np.unique(zero)) > 1  # not one constant centre
    scale = init["mm_qk_t.scale"].reshape(packed.shape[:2])
    rebuilt = scale[..., None] * (codes - zero[..., None]) + init["mm_qk_t.minimum_t"].T[..., None]
    reference = np.ascontiguousarray(weights["qk_t"].T)
    assert np.array_equal(rebuilt.reshape(len(packed), -1).view(np.uint32), reference.view(np.uint32))
    x = np.random.default_rng(1).standard_normal((1, 3, K), dtype=np.float32)
    expected = x @ weights["qk_t"]
    np.testing.assert_allclose(run(dst, x)["y_qk_t"], expected, atol=0.03 * np.abs(expected).max())


def test_matmuls_of_one_input_are_carried_as_one_with_the_same_values(tiny, tmp_path):
    """q and k read the same input: merged they are one MatMulNBits (and one minima product), split
    after, with every output bit for bit what the separate nodes give; Q4_0's down, of another kind,
    stays apart."""
    work, weights = tiny
    q, k = weights["qk_t"][:, :8], weights["qk_t"][:, 8:]
    named = {"q_t": q, "k_t": k, "down_t": weights["down_t"]}
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", n], [f"y_{n}"], name=f"mm_{n}") for n in named],
        "apart",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, K])],
        [helper.make_tensor_value_info(f"y_{n}", TensorProto.FLOAT, None) for n in named],
        [numpy_helper.from_array(np.ascontiguousarray(a), n) for n, a in named.items()],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "apart.onnx")
    x = np.random.default_rng(2).standard_normal((1, 3, K), dtype=np.float32)
    blocks = GGUFBlocks(work / "tiny.gguf")
    outputs, ops = {}, {}
    for merge in (False, True):
        dst = tmp_path / f"merge-{merge}.onnx"
        assert carry_blocks(tmp_path / "apart.onnx", dst, blocks, "split", 4, merge=merge) == (3, 3, 0)
        ops[merge] = [n.op_type for n in onnx.load(str(dst)).graph.node]
        outputs[merge] = run(dst, x)
    assert ops[False].count("MatMulNBits") == 3 and ops[True].count("MatMulNBits") == 2
    assert ops[True].count("Split") == 1 and ops[True].count("Add") == ops[False].count("Add") - 1
    for name in named:
        assert np.array_equal(outputs[True][f"y_{name}"], outputs[False][f"y_{name}"]), name
    for name, w in named.items():  # and each is its own product (int8 activations: within their rounding)
        expected = x @ w
        np.testing.assert_allclose(outputs[True][f"y_{name}"], expected, atol=0.03 * np.abs(expected).max())
