"""export_denoiser: a masked-diffusion LM's denoiser as one ONNX graph, with cached keys/values.

The graph is the torch module of record (families/diffusion_lm_model.py) traced as it is:
bidirectional attention (no mask), and the cache contract of the denoiser protocol
(runtime/denoiser.py). Inputs `input_ids` [1, n] and `position_ids` [1, n] (a window of the
sequence) and per layer `past_key.{i}` / `past_value.{i}` [1, kv_heads, P, head_dim], the other
positions' keys and values (P = 0 for a call over the whole sequence); outputs `logits`
[1, n, vocab] and `present_key.{i}` / `present_value.{i}` [1, kv_heads, n, head_dim], the window's.
One graph serves the full call, the prefix cache and the dual cache.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from accelc.compiler import registry

GRAPH_ROLE = "denoiser"


def export(model, out_dir: Path, opset: int = 17) -> Path:
    """Trace `model` (a DiffusionLM) to `out_dir/denoiser.onnx`."""
    import torch

    cfg = model.config
    layers = cfg.num_layers
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{GRAPH_ROLE}.onnx"

    class Flat(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, position_ids, *past):
            pairs = [(past[2 * i], past[2 * i + 1]) for i in range(layers)]
            logits, present = self.model(input_ids, position_ids, pairs)
            return (logits, *[t for kv in present for t in kv])

    n, p = 5, 3
    ids = torch.zeros(1, n, dtype=torch.int64)
    positions = torch.arange(p, p + n).unsqueeze(0)
    past = [torch.zeros(1, cfg.num_kv_heads, p, cfg.head_dim) for _ in range(2 * layers)]
    kv_names = [f"{kind}.{i}" for i in range(layers) for kind in ("key", "value")]
    inputs = ["input_ids", "position_ids", *[f"past_{name}" for name in kv_names]]
    outputs = ["logits", *[f"present_{name}" for name in kv_names]]
    axes = {"input_ids": {1: "n"}, "position_ids": {1: "n"}, "logits": {1: "n"}}
    axes.update({f"past_{name}": {2: "past"} for name in kv_names})
    axes.update({f"present_{name}": {2: "n"} for name in kv_names})
    with torch.no_grad():
        torch.onnx.export(
            Flat().eval(),
            (ids, positions, *past),
            str(path),
            input_names=inputs,
            output_names=outputs,
            dynamic_axes=axes,
            opset_version=opset,
            dynamo=False,
        )
    return path


@registry.register_pass
class ExportDenoiser(registry.Pass):
    """Export a masked-diffusion LM's denoiser to ONNX (bidirectional, taking and returning cached keys/values)."""

    name = "export_denoiser"
    version = 1
    families = ("diffusion_lm",)
    produces = ("onnx_graph",)

    class Params(registry.Params):
        opset: int = Field(17, ge=14, le=21, description="ONNX opset")

    def run(self, bundle, ctx):
        from accelc.families import diffusion_lm_model as dm

        path = export(dm.load(bundle.model_dir), ctx.workdir / GRAPH_ROLE, self.params.opset)
        meta = {"graph": "traced", "exporter": "torch.onnx", "opset": self.params.opset}
        return bundle.evolve(
            graphs={**bundle.graphs, GRAPH_ROLE: path}, graph_meta={**bundle.graph_meta, GRAPH_ROLE: meta}
        )
