"""export_flow: a TarFlow's blocks to ONNX, each block's full call and KV-cached step.

The graphs and their layout (families/tarflow_export.py) form one folder, the bundle's `flow`
graph: a flow is run block by block and call by call, so it is a set of graphs with a layout,
placed in the artifact as `model/onnx/flow.onnx/` and opened whole by runtime/flow_ort.py.
"""

from __future__ import annotations

from typing import Literal

from accelc.compiler import registry

FLOW_GRAPH = "flow"  # the bundle's graph role of a flow's block graphs (a folder)


@registry.register_pass
class ExportFlow(registry.Pass):
    """TarFlow blocks -> ONNX graphs (full call and cached step per block), checked against torch."""

    name = "export_flow"
    version = 1
    families = ("tarflow",)
    produces = ("onnx_graph",)

    class Params(registry.Params):
        opset: Literal[17] = 17

    def run(self, bundle, ctx):
        from accelc import progress
        from accelc.errors import ValidationFailed
        from accelc.families import tarflow_model
        from accelc.families.tarflow_export import export_blocks
        from accelc.families.tarflow_proof import block_parity
        from accelc.loops.flow_sampling import prior_noise
        from accelc.runtime.flow import torch_flow_model
        from accelc.runtime.flow_ort import ort_flow_model

        model = tarflow_model.load(bundle.model_dir)
        directory = ctx.workdir / FLOW_GRAPH
        with progress.step(f"export {len(model.blocks)} TarFlow blocks to ONNX"):
            export_blocks(model, directory)
        reference, exported = torch_flow_model(model), ort_flow_model(directory, {"intra_op_threads": 1})
        worst = block_parity(exported, reference, prior_noise(reference, 2, seed=0))
        if worst > 1e-3:
            raise ValidationFailed(f"export_flow: the ONNX blocks differ from torch by {worst:.2e} (allowed 1e-3)")
        meta = {"exporter": "torch.onnx (TorchScript)", "opset": self.params.opset, "max_abs_diff": worst}
        return bundle.evolve(
            graphs={**bundle.graphs, FLOW_GRAPH: directory}, graph_meta={**bundle.graph_meta, FLOW_GRAPH: meta}
        )
