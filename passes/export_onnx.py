"""export_onnx: the decoder as one ONNX graph with a KV cache (prefill, 1-step and k-step decode)."""
from __future__ import annotations

from pydantic import Field

from accelc import registry
from accelc.errors import UsageError


@registry.register_pass
class ExportOnnx(registry.Pass):
    """Export the causal LM to ONNX with past/present KV tensors (optimum-onnx exporter)."""

    name = "export_onnx"

    class Params(registry.Params):
        opset: int | None = Field(None, ge=14, le=21, description="ONNX opset; default: the exporter's (18)")

    def run(self, bundle, ctx):
        if bundle.family != "causal_lm":
            raise UsageError(f"export_onnx needs a causal LM checkpoint, got a {bundle.family} model")
        import onnx

        from accelc import optimum_adapter

        graph = optimum_adapter.export_decoder_with_past(
            bundle.model_dir, ctx.workdir / "onnx", opset=self.params.opset,
            trust_remote_code=bool(bundle.source.get("trust_remote_code")))
        model = onnx.load(str(graph), load_external_data=False)
        inputs = [i.name for i in model.graph.input]
        outputs = [o.name for o in model.graph.output]
        meta = {"exporter": "optimum-onnx", "task": optimum_adapter.TASK, "inputs": inputs,
                "outputs": outputs, "opset": max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))}
        return bundle.evolve(graphs={**bundle.graphs, "decoder": graph},
                             graph_meta={**bundle.graph_meta, "decoder": meta})
