"""export_onnx: each decoder (the target, and a draft if the bundle has one) as one ONNX graph with a
KV cache: the same graph prefills, decodes one token and verifies k tokens."""
from __future__ import annotations

from pydantic import Field

from accelc import registry
from accelc.errors import UsageError


@registry.register_pass
class ExportOnnx(registry.Pass):
    """Export the causal LM to ONNX with past/present KV tensors (optimum-onnx exporter)."""

    name = "export_onnx"
    version = 3  # 2: one graph per checkpoint role; 3: exported from accelc's loaded model

    class Params(registry.Params):
        opset: int | None = Field(None, ge=14, le=21, description="ONNX opset; default: the exporter's (18)")

    def run(self, bundle, ctx):
        if bundle.family != "causal_lm":
            raise UsageError(f"export_onnx needs a causal LM checkpoint, got a {bundle.family} model")
        from accelc.families.causal_lm import load_model

        trust = bool(bundle.source.get("trust_remote_code"))
        graphs, metas = {}, {}
        for role, checkpoint in bundle.checkpoints().items():  # the target, and a draft if any
            graphs[role], metas[role] = export_checkpoint(load_model(checkpoint, trust), checkpoint,
                                                          ctx.workdir / role, self.params.opset)
        return bundle.evolve(graphs={**bundle.graphs, **graphs}, graph_meta={**bundle.graph_meta, **metas})


def export_checkpoint(model, checkpoint, out_dir, opset: int | None):
    """One loaded decoder as a KV-cache graph, and the graph metadata the artifact records."""
    import onnx

    from accelc import optimum_adapter
    from accelc.pruning.materialize import check_uniform_kv

    check_uniform_kv(model, "export_onnx")
    graph = optimum_adapter.export_decoder_with_past(model, checkpoint, out_dir, opset=opset)
    proto = onnx.load(str(graph), load_external_data=False)
    return graph, {"exporter": "optimum-onnx", "task": optimum_adapter.TASK,
                   "inputs": [i.name for i in proto.graph.input],
                   "outputs": [o.name for o in proto.graph.output],
                   "opset": max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))}
