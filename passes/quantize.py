"""quantize_dynamic_int8: ONNX Runtime dynamic int8 weight quantisation of every exported graph.

Weights become int8 with per-tensor (or per-channel) scales; activations are quantised at run
time. Shrinks graphs 3-4x. On CPUs without VNNI (AVX2 only) it is not faster (stack.md section 5),
and logits drift, so validation tolerances for quantised artifacts must be looser.
"""
from __future__ import annotations

from pydantic import Field

from accelc import registry
from accelc.errors import UsageError, require


@registry.register_pass
class QuantizeDynamicInt8(registry.Pass):
    """Dynamic int8 quantisation of the ONNX graphs (ONNX Runtime quantize_dynamic)."""

    name = "quantize_dynamic_int8"

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
            quant.quantize_dynamic(str(src), str(dst), weight_type=weight_type,
                                   per_channel=self.params.per_channel)
            graphs[role] = dst
        meta = {role: {**bundle.graph_meta.get(role, {}), "quantization": "dynamic_int8"} for role in graphs}
        return bundle.evolve(graphs=graphs, graph_meta={**bundle.graph_meta, **meta})
