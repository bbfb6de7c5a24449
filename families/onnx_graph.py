"""The ONNX-graph family: an opaque ONNX file, lowered to ONNX Runtime as it is.

Nothing is known of what the graph computes (no tokenizer, no KV layout, no torch model of
record), so no pass applies to it, it lowers to ORT only, and its artifact is validated against
the input graph itself: the lowered session against an unoptimised one on random inputs.
"""

from __future__ import annotations

import json
from pathlib import Path

from accelc.compiler.bundle import Bundle, chain
from accelc.errors import UsageError
from accelc.families.base import Family, register_family
from accelc.fileutil import sha256_file


def check_onnx_file(path: Path) -> None:
    """Refuse a file that is not an ONNX model. Only the protobuf is parsed (external weight files
    are not read); onnx.checker is not used, since it rejects ONNX Runtime's contrib operators
    (SimplifiedLayerNormalization, GroupQueryAttention) that accelc's own graphs hold. Protobuf
    parses some random bytes, so the model must also name an IR version, an opset and nodes."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf's DecodeError and onnx's own errors: all mean "not a model"
        reason = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise UsageError(f"{path}: not a valid ONNX model ({reason}); export the model to ONNX again") from None
    if model.ir_version < 1 or not model.opset_import or not model.graph.node:
        raise UsageError(
            f"{path}: not a valid ONNX model (no IR version, opset or graph nodes); export the model to ONNX again"
        )


@register_family
class OnnxGraph(Family):
    """A single ONNX graph of any model, run as it is."""

    name = "onnx"
    title = "opaque ONNX graph"
    inputs = "an .onnx file"
    protocol = None  # the graph's own inputs and outputs: validation feeds it by name
    provides = ("onnx_graph",)  # the input is its own decoder graph

    def recognises_path(self, path: Path) -> bool:
        return path.is_file() and path.suffix == ".onnx"

    def decode_plan(self, recipe, bundle) -> dict:
        from accelc.loops.plan import DecodePlan

        return DecodePlan.of(recipe.decode.model_dump(mode="json")).to_json_dict()

    def check_input(self, spec, recipe=None) -> None:
        from accelc.compiler.recipe import resolve_path

        check_onnx_file(resolve_path(recipe, spec.path) if recipe is not None else Path(spec.path))

    def ingest(self, spec, recipe=None) -> Bundle:
        from accelc.compiler.recipe import resolve_path

        path = resolve_path(recipe, spec.path) if recipe is not None else Path(spec.path)
        ident = {"files": {path.name: sha256_file(path)}}
        return Bundle(
            id=chain("", "source", ident),
            family=self.name,
            source={"description": f"onnx:{path}", **ident},
            model_dir=None,
            graphs={"model": path},
        )

    def graph_roles(self, bundle) -> dict[str, str]:
        return {"target": "model"}

    def prove(self, directory: Path, recipe, manifest: dict) -> tuple[dict, bool]:
        """An opaque graph can only be checked against itself: see validation.validate_onnx."""
        from accelc.compiler.validation import validate_onnx
        from accelc.runtime.artifact import Artifact

        art = Artifact(directory)
        reports = directory / "reports"
        reports.mkdir(exist_ok=True)

        backends = art.backends()
        if "ort" not in backends:
            return {}, True
        cfg = backends["ort"]["runtime"]
        report = validate_onnx(
            art.dir / art.manifest["graphs"][cfg["graphs"]["target"]], cfg["session"], recipe.eval.parity
        )
        (reports / "validation.json").write_text(json.dumps(report, indent=2))
        metrics = {
            "validation": {"ort": report["verdict"]},
            "max_abs_diff": {"ort": report["backends"]["ort"]["max_abs_diff"]},
        }
        if report["verdict"] != "pass":
            metrics["failure"] = (
                "the lowered ONNX Runtime session disagrees with the input graph (reports/validation.json)"
            )
        return metrics, report["verdict"] == "pass"
