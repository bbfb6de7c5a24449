"""quantize_dynamic_int8: ONNX Runtime dynamic int8 weight quantisation of every exported graph.

Weights become int8 with per-tensor (or per-channel) scales; activations are quantised at run
time. Shrinks graphs 3-4x. On CPUs without VNNI (AVX2 only) it is not faster (docs/platform-notes.md section 5),
and logits drift, so validation tolerances for quantised artifacts must be looser.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from accelc.compiler import registry
from accelc.errors import UsageError, require


@registry.register_pass
class QuantizeDynamicInt8(registry.Pass):
    """Dynamic int8 quantisation of the ONNX graphs (ONNX Runtime quantize_dynamic)."""

    name = "quantize_dynamic_int8"
    families = ("causal_lm", "onnx")  # rewrites whatever ONNX graphs the bundle holds
    consumes = produces = ("onnx_graph",)

    class Params(registry.Params):
        per_channel: bool = Field(False, description="one scale per output channel instead of per tensor")
        weight_type: str = Field("qint8", pattern="^(qint8|quint8)$", description="qint8 or quint8")

    def run(self, bundle, ctx):
        if not bundle.graphs:
            raise UsageError("quantize_dynamic_int8 needs ONNX graphs: put export_onnx before it")
        quant = require("onnxruntime.quantization", "pip install onnxruntime")
        weight_type = quant.QuantType.QInt8 if self.params.weight_type == "qint8" else quant.QuantType.QUInt8
        graphs = {}
        for role, src in bundle.graphs.items():
            dst = ctx.workdir / role / "model.int8.onnx"
            dst.parent.mkdir(parents=True, exist_ok=True)
            quant.quantize_dynamic(str(src), str(dst), weight_type=weight_type, per_channel=self.params.per_channel)
            graphs[role] = dst
        meta = {role: {**bundle.graph_meta.get(role, {}), "quantization": "dynamic_int8"} for role in graphs}
        return bundle.evolve(graphs=graphs, graph_meta={**bundle.graph_meta, **meta})


@registry.register_pass
class QuantizeWeightsInt4(registry.Pass):
    """Weight-only 4-bit block quantisation of MatMul weights (ONNX Runtime MatMulNBits)."""

    name = "quantize_weights_int4"
    version = 2  # cache key: bumped when the output changes for the same params (CHANGELOG.md)
    families = ("causal_lm", "onnx")  # rewrites whatever ONNX graphs the bundle holds
    consumes = produces = ("onnx_graph",)

    class Params(registry.Params):
        block_size: int = Field(
            32,
            ge=16,
            le=256,
            description="weights per quantisation block along the input dimension (32 matches GGUF Q4_0/Q4_1 blocks)",
        )
        symmetric: bool = Field(False, description="symmetric blocks (no zero point); asymmetric matches Q4_1")
        accuracy_level: int = Field(
            4,
            ge=0,
            le=4,
            description="MatMulNBits compute type: 4 = int8 activations (fastest on AVX2/AVX-512), 0 = fp32",
        )
        head: bool = Field(
            False,
            description="quantise the LM head too: a head tied to the embedding (a Gemm on it) gets its own "
            "transposed copy as a MatMul, which the quantizer reaches; the embedding lookup keeps fp32 rows",
        )
        # SmolLM2-135M (docs/quantization.md): a 4-bit head costs most of the perplexity; at 8 bits
        # it costs little, and the body's blocks can then grow to 128 for speed
        head_bits: Literal[4, 8] = Field(8, description="with head: the head's weight bits (blocks of block_size)")
        lookup: Literal["float", "head"] = Field(
            "float",
            description="with head: the embedding lookup of a tied head reads fp32 rows (float) or the head's "
            "quantised blocks (head: GatherBlockQuantized, one vocabulary table in head_bits instead of fp32)",
        )

        @model_validator(mode="after")
        def _lookup_needs_the_head(self):
            if self.lookup == "head" and not self.head:
                raise ValueError("lookup: head reads the quantised head's blocks: set head: true with it")
            return self

    def run(self, bundle, ctx):
        """Decoding one token is matrix-vector work bound by weight bandwidth, so 4-bit weights
        (~8x fewer bytes than fp32) are where CPU decode speed comes from; int8 dynamic
        quantisation keeps fp32 activations and gains nothing on AVX2 (docs/platform-notes.md section 5)."""
        if not bundle.graphs:
            raise UsageError("quantize_weights_int4 needs ONNX graphs: put export_onnx before it")
        graphs = {}
        for role, src in bundle.graphs.items():
            dst = ctx.workdir / role / "model.int4.onnx"
            dst.parent.mkdir(parents=True, exist_ok=True)
            graphs[role] = quantize_matmul_nbits(
                src,
                dst,
                head=self.params.head,
                head_bits=self.params.head_bits,
                lookup=self.params.lookup == "head",
                bits=4,
                block_size=self.params.block_size,
                symmetric=self.params.symmetric,
                accuracy_level=self.params.accuracy_level,
            )
        meta = {
            role: {
                **bundle.graph_meta.get(role, {}),
                "quantization": f"int4 block {self.params.block_size}"
                + (f", head {self.params.head_bits}-bit" if self.params.head else "")
                + (", lookup on the head's blocks" if self.params.head and self.params.lookup == "head" else ""),
            }
            for role in graphs
        }
        return bundle.evolve(graphs=graphs, graph_meta={**bundle.graph_meta, **meta})


def quantize_matmul_nbits(
    src: Path,
    dst: Path,
    *,
    bits: int,
    block_size: int = 32,
    symmetric: bool = False,
    accuracy_level: int = 4,
    head: bool = False,
    head_bits: int | None = None,
    lookup: bool = False,
) -> Path:
    """Every MatMul with a constant weight in `src` as ORT MatMulNBits (`bits` = 4 or 8, blocks
    along the input dimension), and with `head` the LM head too (`untie_head`) at `head_bits`
    (default: `bits`), with `lookup` the tied embedding's lookup on the head's blocks
    (`lookup_on_head`); written to `dst`."""
    import logging

    import onnx

    # the quantizer logs one INFO line per node (thousands); keep warnings
    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
    nbits = require("onnxruntime.quantization.matmul_nbits_quantizer", "pip install onnxruntime")
    model = onnx.load(str(src))

    def quantize(model, bits: int, exclude: list[str] = ()):
        quantizer = nbits.MatMulNBitsQuantizer(
            model,
            bits=bits,
            block_size=block_size,
            is_symmetric=symmetric,
            accuracy_level=accuracy_level,
            nodes_to_exclude=list(exclude),
        )
        quantizer.process()
        return quantizer.model

    if head:
        heads = untie_head(model)
        if not heads:
            raise UsageError(
                f"{src}: quantize_weights_int4 head: true found no LM head (a Gemm with transB=1 on a weight)"
            )
        if head_bits not in (None, bits):  # the head first, every other MatMul left for the pass below
            for i, node in enumerate(model.graph.node):  # the quantizer excludes nodes by name
                node.name = node.name or f"{node.op_type}_{i}"
            others = [n.name for n in model.graph.node if n.op_type == "MatMul" and n.name not in heads]
            model = quantize(model, head_bits, others).model
    result = quantize(model, bits)
    if head and lookup and not lookup_on_head(result.model):
        raise UsageError(
            f"{src}: quantize_weights_int4 lookup: head found no embedding lookup on the tied head's table"
        )
    result.save_model_to_file(str(dst), use_external_data_format=True)  # mapped by ORT, as gguf_weights' graphs
    return dst


def lookup_on_head(model) -> int:
    """Rewrite, in a quantised `model`, every Gather (axis 0) on a table whose transposed copy
    `untie_head` made into a quantised head as GatherBlockQuantized over that head's blocks, so
    the vocabulary is held once, in the head's bits, and every row read is the row the head
    scores (bit for bit). MatMulNBits stores B as [N, blocks, block bytes] with the last block
    padded and 4-bit zero points two to a byte per row; GatherBlockQuantized reads the same
    bytes as [N, K * bits / 8] with [N, blocks] scales. Returns the lookups rewritten."""
    import numpy as np
    from onnx import helper, numpy_helper

    graph = model.graph
    weights = {t.name: t for t in graph.initializer}
    heads = {  # the table a head was untied from -> the head's MatMulNBits
        node.input[1].split(".head_t")[0]: node
        for node in graph.node
        if node.op_type == "MatMulNBits" and ".head_t" in node.input[1]
    }
    rewritten = 0
    for i, node in enumerate(graph.node):
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        head = heads.get(node.input[0]) if node.op_type == "Gather" and axis == 0 else None
        if head is None:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in head.attribute}
        bits, block, k = attrs["bits"], attrs["block_size"], attrs["K"]
        codes = numpy_helper.to_array(weights[head.input[1]])
        rows = len(codes)
        tensors = {
            "q": np.ascontiguousarray(codes.reshape(rows, -1)[:, : k * bits // 8]),
            "scales": numpy_helper.to_array(weights[head.input[2]]).reshape(rows, -1),
        }
        if len(head.input) > 3 and head.input[3]:
            tensors["zero_points"] = numpy_helper.to_array(weights[head.input[3]]).reshape(rows, -1)
        names = []
        for suffix, array in tensors.items():
            names.append(f"{node.input[0]}.lookup_{suffix}")
            graph.initializer.append(numpy_helper.from_array(array, names[-1]))
        graph.node[i].CopyFrom(
            helper.make_node(
                "GatherBlockQuantized",
                [names[0], node.input[1], *names[1:]],
                list(node.output),
                name=f"{node.name or node.output[0]}.blocks",
                domain="com.microsoft",
                bits=bits,
                block_size=block,
                gather_axis=0,
                quantize_axis=1,
            )
        )
        rewritten += 1
    if rewritten:
        used = {name for n in graph.node for name in n.input}
        kept = [t for t in graph.initializer if t.name in used]
        del graph.initializer[:]
        graph.initializer.extend(kept)
    return rewritten


def untie_head(model) -> list[str]:
    """Rewrite, in `model` (an ONNX ModelProto), every Gemm(A, W, transB=1) on a constant W as
    MatMul(A, W^T) over a transposed copy. The fused graph's tied head is such a Gemm on the
    embedding, and ORT's quantizer only rewrites MatMuls: the head (a fifth of SmolLM2's weights,
    read in full every token) then becomes 4- or 8-bit while the embedding lookup keeps its fp32
    rows. Returns the new MatMuls' names (none when the graph has no such Gemm)."""
    from onnx import helper, numpy_helper

    graph = model.graph
    weights = {t.name: t for t in graph.initializer}
    nodes, untied = [], []
    for node in graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        plain = (
            attrs.get("transB") == 1
            and not attrs.get("transA")
            and attrs.get("alpha", 1.0) == attrs.get("beta", 1.0) == 1.0
        )
        if node.op_type != "Gemm" or not plain or node.input[1] not in weights:
            nodes.append(node)
            continue
        name = f"{node.input[1]}.head_t"
        if name not in weights:
            array = numpy_helper.to_array(weights[node.input[1]]).T.copy()
            weights[name] = numpy_helper.from_array(array, name)
            graph.initializer.append(weights[name])
        product = node.output[0] if len(node.input) < 3 else f"{node.output[0]}.no_bias"
        nodes.append(helper.make_node("MatMul", [node.input[0], name], [product], name=f"{node.name}.matmul"))
        if len(node.input) == 3:
            nodes.append(helper.make_node("Add", [product, node.input[2]], [node.output[0]], name=f"{node.name}.bias"))
        untied.append(f"{node.name}.matmul")
    del graph.node[:]
    graph.node.extend(nodes)
    return untied
