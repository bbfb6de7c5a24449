"""gguf_weights: the source GGUF's own 4-bit blocks as the ONNX graphs' MatMul weights.

A model ingested from a Q4_0/Q4_1 GGUF (`model: gguf:` or the built-in SmolLM2) is, as a torch
model, those blocks dequantised. Re-quantising that fp32 copy (quantize_weights_int4) rounds
it a second time onto a different grid and costs ~20% perplexity on SmolLM2; carrying the
blocks over loses nothing: every MatMul whose weight is made of the file's 4-bit rows
(accelc/gguf_blocks.py finds them, whatever the exporter's layout) becomes ONNX Runtime's
MatMulNBits over those very blocks. Tensors of other types (SmolLM2's fp32 norms) stay as the
graph has them.

Q8_0 tensors (SmolLM2's embedding, which is also its tied head: 21% of its weights, read in full
every token) stay fp32 by default, since ORT's CPU kernel for 8-bit weights has no fp32-compute
path (it dequantises the weight at every call: 103 ms for SmolLM2's head against 3.7 ms as an
fp32 MatMul). `q8_0: int8` carries them as 8-bit MatMulNBits over the file's own blocks with
int8 activations (0.94 ms): the weights stay exact, the activations are rounded per block of 32,
as llama.cpp's own Q8_0 dot products round them. The tied head is untied first (its Gemm on the
embedding becomes a MatMul on a transposed copy), and the embedding lookup reads the same blocks
(GatherBlockQuantized dequantises the rows it gathers, bit for bit), so neither keeps an fp32
copy of the vocabulary (113 MB for SmolLM2). A lookup on Q4_0 rows is carried whatever `q8_0`
says: it computes nothing, so it is exact. (Q4_1 lookups stay fp32: GatherBlockQuantized takes
integer zero points only.)

Q4_0 (w = d*(q-8)) is MatMulNBits' own symmetric form. Q4_1 (w = d*q + m) has a real-valued
minimum per block, which MatMulNBits takes as a float zero point (w = d*(q - z), z = -m/d), but
ORT's CPU kernel does not prepack a float zero point and dequantises the whole weight at every
call (13-27x slower than its packed kernels; docs/quantization.md). So `layout: split` (the
default) computes the same product as two exact terms:
    x . W = sum_b d_b (x_b . (q_b - 8))  +  sum_b (m_b + 8 d_b) (sum of x over block b)
the first a packed MatMulNBits in Q4_0's symmetric form, the second a small fp32 MatMul of the
input's block sums ([.., K/32]) with the centred minima ([K/32, N]; m + 8d is exact in float32
for fp16 m and d of nearby exponents, checked per tensor, else the codes keep zero point 0 and
the minima are m). MatMuls that read the same input (a layer's gate and up projections) are
carried as one MatMulNBits over their blocks side by side, with one minima product and one Add,
then split (`merge: true`, the default): each output column is the same dot product over the same
blocks, so the values are the same; the step runs 60 fewer small nodes on SmolLM2, which is what
the split layout costs (docs/quantization.md).

Centring matters with int8 activations (`accuracy_level: 4`): the rounding error of a block of
activations, e, enters the first term as d (q - z) . e. Uncentred (z = 0) its mean 7.5 d sum(e)
does not cancel (+1.3% perplexity on SmolLM2), centred on the codes' middle (z = 8) it is
smaller, and centred on each block's own zero (z = round(-m/d), an integer zero point, which
ORT's int8 kernel takes at no cost) it is about w . e, as small as the weights themselves; the
minima term keeps the rest, m + d z, exact (docs/quantization.md). At fp32 compute the codes
stay centred on 8: zero points cost ORT's fp32 kernel ~8%.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np
from pydantic import Field

from accelc.compiler import registry
from accelc.errors import UsageError
from accelc.gguf_blocks import BLOCK, Blocks, GGUFBlocks

MS_DOMAIN = "com.microsoft"


@registry.register_pass
class GgufWeights(registry.Pass):
    """The source GGUF's Q4_0/Q4_1 blocks as MatMulNBits weights: the model's exact weights in 4 bits."""

    name = "gguf_weights"
    version = 5  # cache key: bumped when the output changes for the same params (CHANGELOG.md)
    families = ("causal_lm",)  # needs the model's GGUF source, which only causal_lm ingests
    consumes = produces = ("onnx_graph",)

    class Params(registry.Params):
        layout: Literal["split", "float_zero_point"] = Field(
            "split",
            description="how Q4_1's block minima are computed: split = packed MatMulNBits plus a MatMul of "
            "the input's block sums by the minima (fast on CPU); float_zero_point = one MatMulNBits with "
            "float zero points (ORT's CPU kernel dequantises those at every call)",
        )
        q8_0: Literal["float", "int8"] = Field(
            "float",
            description="MatMuls whose weight is a Q8_0 tensor of the file (a tied head on a Q8_0 embedding): "
            "float = fp32 MatMul (exact); int8 = 8-bit MatMulNBits over the file's blocks with int8 "
            "activations (4x less weight traffic; ORT's CPU kernel has no fp32 path for 8-bit weights)",
        )
        merge: bool = Field(
            True,
            description="carry MatMuls that read the same input (gate and up) as one MatMulNBits, split after: "
            "the same values in fewer nodes",
        )
        accuracy_level: int = Field(
            0,
            ge=0,
            le=4,
            description="MatMulNBits compute type: 0 = fp32 (the source's weights, exact to float rounding), "
            "4 = int8 activations (faster, rounds the activations)",
        )

    def run(self, bundle, ctx):
        if not bundle.graphs:
            raise UsageError("gguf_weights needs ONNX graphs: put export_onnx before it")
        source = source_gguf(bundle.source)
        blocks = GGUFBlocks(source)
        graphs, meta = {}, {}
        for role, src in bundle.graphs.items():
            dst = ctx.workdir / role / "model.gguf4.onnx"
            dst.parent.mkdir(parents=True, exist_ok=True)
            carried = carry_blocks(
                src,
                dst,
                blocks,
                self.params.layout,
                self.params.accuracy_level,
                eight_bit=self.params.q8_0 == "int8",
                merge=self.params.merge,
            )
            if role == "decoder" and carried.matmuls == 0:
                raise UsageError(
                    f"gguf_weights: no MatMul weight of the decoder graph is made of {source.name}'s 4-bit rows "
                    "(was the graph quantised or pruned before this pass? put gguf_weights right after export_onnx)"
                )
            graphs[role] = dst if carried.matmuls or carried.lookups else src
            meta[role] = {
                **bundle.graph_meta.get(role, {}),
                **(
                    {
                        "quantization": f"{source.name}'s own blocks (MatMulNBits, {self.params.layout}"
                        + (", Q8_0 with int8 activations)" if self.params.q8_0 == "int8" else ")"),
                        "weights": "source blocks, exact",
                        "gguf_matmuls": f"{carried.matmuls} of {carried.of}",
                        "gguf_lookups": carried.lookups,
                    }
                    if carried.matmuls
                    else {}
                ),
            }
        return bundle.evolve(graphs=graphs, graph_meta={**bundle.graph_meta, **meta})


def source_gguf(source) -> Path:
    """The GGUF file a bundle's model was ingested from; exit 2 when it was not a GGUF."""
    from accelc.families.causal_lm import EMBEDDED

    description = str(source.get("description", ""))
    kind, _, rest = description.partition(":")
    if kind == "gguf":
        return Path(rest)
    if kind == "builtin" and rest == EMBEDDED:
        from accelc import assets

        return assets.smollm2_gguf()
    raise UsageError(
        f"a GGUF's own 4-bit blocks (gguf_weights, a draft's `weights: gguf`) need a model read from a GGUF file, "
        f"and this one is {description or 'not from a file'}; use `model: {{path: FILE.gguf}}` or "
        f"`builtin: {EMBEDDED}`, or re-quantise (quantize_weights_int4, a draft's `weights: int4`)"
    )


class Carried(NamedTuple):
    matmuls: int  # MatMuls rewritten as MatMulNBits
    of: int  # MatMuls with a constant fp32 weight
    lookups: int  # Gathers rewritten as GatherBlockQuantized


def carry_blocks(
    src: Path,
    dst: Path,
    blocks: GGUFBlocks,
    layout: str,
    accuracy_level: int,
    *,
    eight_bit: bool = False,
    merge: bool = False,
) -> Carried:
    """Rewrite `src` to `dst` with every MatMul whose weight `blocks` holds as MatMulNBits over
    those blocks and every row lookup on symmetric blocks as GatherBlockQuantized (Q8_0 ones only
    with `eight_bit`, the tied head untied first); with `merge`, MatMuls of one input whose blocks
    are of one kind become one MatMulNBits."""
    import onnx
    from onnx import numpy_helper

    from accelc.passes.quantize import untie_head

    model = onnx.load(str(src))
    if eight_bit:
        untie_head(model)
    graph = model.graph
    weights = {t.name: t for t in graph.initializer}
    writer = _Writer(layout, accuracy_level)

    def fp32_matrix(name: str) -> np.ndarray | None:
        weight = weights.get(name)
        if weight is None or len(weight.dims) != 2 or weight.data_type != onnx.TensorProto.FLOAT:
            return None
        return numpy_helper.to_array(weight)

    total, carriable = 0, {}  # node index -> its weight's blocks
    for i, node in enumerate(graph.node):
        if node.op_type == "MatMul" and len(node.input) == 2 and (weight := fp32_matrix(node.input[1])) is not None:
            total += 1
            found = blocks.find(weight.T)
            if found is not None and (found.bits == 4 or eight_bit):
                carriable[i] = found
    together: dict[tuple, list[int]] = {}  # MatMuls carried as one: same input, same kind of blocks
    for i, found in carriable.items():
        key = (graph.node[i].input[0], found.bits, found.symmetric, found.scale.shape[1]) if merge else (i,)
        together.setdefault(key, []).append(i)
    group_of = {i: group for group in together.values() for i in group}
    nodes, lookups = [], 0
    for i, node in enumerate(graph.node):
        if i in carriable:
            group = group_of[i]
            if group[0] == i:  # the first of its group: every member's input exists here
                nodes += writer.matmul([graph.node[j] for j in group], [carriable[j] for j in group])
            continue
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        if node.op_type == "Gather" and axis == 0 and (table := fp32_matrix(node.input[0])) is not None:
            found = blocks.find(table)
            if found is not None and found.symmetric and (found.bits == 4 or eight_bit):
                nodes.append(writer.lookup(node, found))
                lookups += 1
                continue
        nodes.append(node)
    carried = len(carriable)
    used = {name for node in nodes for name in node.input}
    kept = [t for t in graph.initializer if t.name in used]
    _keep_views_of(model, {t.name for t in kept})
    del graph.node[:], graph.initializer[:]
    graph.node.extend(nodes)
    graph.initializer.extend(kept + writer.initializers)
    if not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid(MS_DOMAIN, 1))
    # weights in an external-data file, whatever their size: ORT maps that file instead of parsing
    # a copy of every weight out of the proto, which held ~80 MB of freed memory after load
    # (peak RSS of a session on SmolLM2's blocks 315 -> 233 MB; docs/peers.md)
    onnx.save_model(
        model, str(dst), save_as_external_data=True, all_tensors_to_one_file=True, location=dst.name + ".data"
    )
    return Carried(carried, total, lookups)


def _keep_views_of(model, initializers: set[str]) -> None:
    """Drop the fused graph's weight views (where TVM may read a parameter) into replaced weights."""
    import json

    from accelc.compiler.fused_decoder import WEIGHT_VIEWS

    for prop in model.metadata_props:
        if prop.key == WEIGHT_VIEWS:
            views = json.loads(prop.value)
            prop.value = json.dumps({k: v for k, v in views.items() if v["initializer"] in initializers})


class _Writer:
    """The nodes and initializers that replace one MatMul; block sums shared by MatMuls of one input."""

    def __init__(self, layout: str, accuracy_level: int):
        self.layout, self.accuracy_level = layout, accuracy_level
        self.initializers: list = []
        self._block_sums: dict[tuple[str, int], str] = {}

    def _constant(self, name: str, array: np.ndarray) -> str:
        from onnx import numpy_helper

        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def matmul(self, matmuls: list, founds: list[Blocks]) -> list:
        """MatMulNBits for MatMuls of one input (their blocks side by side, outputs split after)."""
        if len(matmuls) == 1:
            return self._matmul(matmuls[0].input[0], matmuls[0].output[0], matmuls[0].name, founds[0])
        from onnx import helper

        first = matmuls[0].name or matmuls[0].output[0]
        joined = Blocks(
            *(np.concatenate([getattr(f, part) for f in founds]) for part in ("scale", "minimum", "codes")),
            symmetric=founds[0].symmetric,
            bits=founds[0].bits,
        )
        merged = f"{first}.merged"
        sizes = self._constant(f"{first}.split", np.array([len(f.scale) for f in founds], np.int64))
        split = helper.make_node(
            "Split", [merged, sizes], [m.output[0] for m in matmuls], name=f"{first}.split", axis=-1
        )
        return [*self._matmul(matmuls[0].input[0], merged, merged, joined), split]

    def _matmul(self, x: str, y: str, name: str, found: Blocks) -> list:
        from onnx import helper

        n, nb = found.scale.shape
        k, name = nb * BLOCK, name or y
        codes, scale = found.codes, found.scale
        extra, inputs = [], [x, f"{name}.q{found.bits}", f"{name}.scale"]
        if found.symmetric:
            pass  # MatMulNBits without zero points is Q4_0's d*(q - 8) and Q8_0's d*(u - 128)
        elif self.layout == "float_zero_point":
            flat = scale == 0  # a constant block (d = 0) is m * (1 - 0)
            codes = np.where(flat[..., None], np.uint8(1), codes)
            zero = np.where(flat, 0, -found.minimum / np.where(flat, 1, scale)).astype(np.float32)
            scale = np.where(flat, found.minimum, scale).astype(np.float32)
            inputs.append(self._constant(f"{name}.zero_point", zero.reshape(-1)))
        else:
            # int8 compute: each block centred on its own zero (integer zero points cost nothing
            # there, and the activations' rounding error then meets d (q - z), about the weight)
            own = _centred_on_zero(found) if self.accuracy_level == 4 else None
            if own is not None:
                zero, minimum = own
                inputs.append(self._constant(f"{name}.zero_point", _packed_zero_points(zero)))
            elif (minimum := _centred(found)) is None:  # m + 8d not exact: zero point 0, the minima as they are
                inputs.append(self._constant(f"{name}.zero_point", _packed_zero_points(np.zeros((n, nb), np.uint8))))
                minimum = found.minimum
            main = f"{name}.codes_out"
            minima = helper.make_node(
                "MatMul", [self._sums(x, k, extra), self._constant(f"{name}.minimum_t", minimum.T)], [f"{y}.min"]
            )
            extra = [*extra, minima, helper.make_node("Add", [main, f"{y}.min"], [y], name=f"{name}.add")]
            y = main
        self._constant(inputs[1], _packed(codes, found.bits))
        self._constant(f"{name}.scale", scale.reshape(-1))
        nbits = helper.make_node(
            "MatMulNBits",
            inputs,
            [y],
            name=f"{name}.nbits",
            domain=MS_DOMAIN,
            K=k,
            N=n,
            bits=found.bits,
            block_size=BLOCK,
            accuracy_level=4 if found.bits == 8 else self.accuracy_level,
        )
        return [nbits, *extra]

    def lookup(self, node, found: Blocks):
        """A Gather of whole rows of symmetric blocks as GatherBlockQuantized over them (no zero
        point: its default, 2^(bits-1), is Q4_0's 8 and Q8_0's 128)."""
        from onnx import helper

        name = node.name or node.output[0]
        rows = len(found.codes)
        codes = self._constant(f"{name}.q{found.bits}", _packed(found.codes, found.bits).reshape(rows, -1))
        return helper.make_node(
            "GatherBlockQuantized",
            [codes, node.input[1], self._constant(f"{name}.scale", found.scale)],
            list(node.output),
            name=f"{name}.blocks",
            domain=MS_DOMAIN,
            bits=found.bits,
            block_size=BLOCK,
            gather_axis=0,
            quantize_axis=1,
        )

    def _sums(self, x: str, k: int, nodes: list) -> str:
        """The sum of `x` over each block of 32 inputs ([.., k/32]): one small MatMul with a 0/1
        indicator, which works at any input rank (the fused graph's intermediates carry no shapes)."""
        from onnx import helper

        key = (x, k)
        if key not in self._block_sums:
            indicator = f"block_indicator_{k}"
            if not any(t.name == indicator for t in self.initializers):
                self._constant(indicator, np.repeat(np.eye(k // BLOCK, dtype=np.float32), BLOCK, axis=0))
            self._block_sums[key] = f"{x}.block_sums"
            nodes.append(helper.make_node("MatMul", [x, indicator], [self._block_sums[key]]))
        return self._block_sums[key]


def _packed(codes: np.ndarray, bits: int) -> np.ndarray:
    """Codes [.., 32] as MatMulNBits/GatherBlockQuantized store them: 8-bit as they are, 4-bit two
    to a byte, element 2i in the low nibble."""
    return codes if bits == 8 else codes[..., 0::2] | (codes[..., 1::2] << 4)


def _centred_on_zero(found: Blocks) -> tuple[np.ndarray, np.ndarray] | None:
    """Q4_1 blocks read as d (q - z) + (m + d z) with the integer zero point z = round(-m / d)
    (clipped to 0..15): the zero points [N, blocks] and the residual minima, or None unless every
    m + d z is exact in float32 (then the weights are d q + m to the bit)."""
    d, m = found.scale, found.minimum
    ratio = np.divide(-m, d, out=np.zeros_like(m), where=d != 0)
    zero = np.clip(np.round(ratio), 0, 15).astype(np.uint8)
    residual = m + d * zero.astype(np.float32)
    exact = residual.astype(np.float64) == m.astype(np.float64) + d.astype(np.float64) * zero
    return (zero, residual) if exact.all() else None


def _packed_zero_points(zero: np.ndarray) -> np.ndarray:
    """4-bit zero points [N, blocks] as MatMulNBits stores them: per row, two to a byte (block 2i
    in the low nibble), the last byte half empty for an odd count."""
    if zero.shape[1] % 2:
        zero = np.concatenate([zero, np.zeros((len(zero), 1), np.uint8)], axis=1)
    return (zero[:, 0::2] | (zero[:, 1::2] << 4)).reshape(-1)


def _centred(found: Blocks) -> np.ndarray | None:
    """Q4_1's minima with the codes read as Q4_0's (q - 8): m + 8d, or None unless every one is
    exact in float32 (then d (q - 8) + (m + 8d) is the weight d q + m to the bit)."""
    centred = found.minimum + np.float32(8) * found.scale
    exact = centred.astype(np.float64) == found.minimum.astype(np.float64) + 8 * found.scale.astype(np.float64)
    return centred if exact.all() else None
