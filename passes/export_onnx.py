"""export_onnx: each decoder (the target, and a draft if the bundle has one) as one ONNX graph with a
KV cache: the same graph prefills, decodes one token and verifies k tokens.

Two ways to write that graph, one I/O contract:
  fused    accelc's builder (fused_decoder.py): ORT's fused kernels, ~12 nodes per layer. Llama and
           Qwen2 families; decodes ~1.3x faster on CPU than the traced graph (docs/notes.md).
  optimum  optimum-onnx's traced export of transformers' own code: every supported family.
`auto` takes fused where the model allows it, optimum otherwise.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from accelc.compiler import registry
from accelc.errors import UsageError


@registry.register_pass
class ExportOnnx(registry.Pass):
    """Export the causal LM to ONNX with past/present KV tensors (fused builder or optimum-onnx)."""

    name = "export_onnx"
    version = 7  # cache key: bumped when the output changes for the same params (CHANGELOG.md)
    produces = ("onnx_graph",)

    class Params(registry.Params):
        graph: Literal["auto", "fused", "optimum"] = Field(
            "auto",
            description="fused: ORT fused kernels (llama, qwen2); optimum: traced export (every family); "
            "auto: fused where supported",
        )
        opset: int | None = Field(
            None, ge=14, le=21, description="ONNX opset; default: the exporter's (17 fused, 18 optimum)"
        )

    def run(self, bundle, ctx):
        from accelc.families.causal_lm import load_model

        trust = bool(bundle.source.get("trust_remote_code"))
        graphs, metas = {}, {}
        for role, checkpoint in bundle.checkpoints().items():  # the target, and a draft if any
            graphs[role], metas[role] = export_checkpoint(
                load_model(checkpoint, trust), checkpoint, ctx.workdir / role, self.params.opset, self.params.graph
            )
        return bundle.evolve(graphs={**bundle.graphs, **graphs}, graph_meta={**bundle.graph_meta, **metas})


def export_checkpoint(model, checkpoint, out_dir, opset: int | None, graph: str = "auto", vocab_subset=None):
    """One loaded decoder as a KV-cache graph, and the graph metadata the artifact records.
    vocab_subset: score only these tokens (a draft's truncated head; fused graphs only)."""
    import onnx

    from accelc.compiler import fused_decoder, optimum_adapter
    from accelc.compiler.pruning.materialize import check_uniform_kv

    check_uniform_kv(model, "export_onnx")
    unsupported = fused_decoder.unsupported_reason(model)
    if graph == "fused" and unsupported:
        raise UsageError(f"export_onnx graph: fused does not support {unsupported}; use graph: optimum or auto")
    if vocab_subset is not None and (graph == "optimum" or unsupported):
        raise UsageError(
            f"a truncated draft vocabulary needs a fused graph, which does not support "
            f"{unsupported or 'graph: optimum'}"
        )
    if graph == "optimum" or unsupported:
        path = optimum_adapter.export_decoder_with_past(model, checkpoint, out_dir, opset=opset)
        meta = {"graph": "optimum", "exporter": "optimum-onnx", "task": optimum_adapter.TASK}
    else:
        path = fused_decoder.build(model, out_dir, opset=opset or fused_decoder.OPSET, vocab_subset=vocab_subset)
        meta = {"graph": "fused", "exporter": "accelc.compiler.fused_decoder"}
    proto = onnx.load(str(path), load_external_data=False)
    return path, {
        **meta,
        "inputs": [i.name for i in proto.graph.input],
        "outputs": [o.name for o in proto.graph.output],
        "opset": max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")),
    }
