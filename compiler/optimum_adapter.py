"""Every call into optimum / optimum-onnx lives here, and only here.

optimum-onnx 0.1.0 caps transformers below 4.58, so accelc pins transformers 4.57.x. Keeping the
calls in one module means moving that pin (or replacing the exporter) touches one file.
"""
from __future__ import annotations

import contextlib
import sys
import warnings
from pathlib import Path

from accelc.errors import require

INSTALL = 'pip install "optimum==2.1.0" "optimum-onnx[onnxruntime]==0.1.0"'
TASK = "text-generation-with-past"  # one graph: past length may be 0, so it prefills and decodes


def export_decoder_with_past(model_dir: Path, out_dir: Path, *, opset: int | None,
                             trust_remote_code: bool) -> Path:
    """Export a decoder whose single graph takes `past_key_values.{i}.key/value` (length >= 0)
    and returns logits for every fed position plus `present.{i}.key/value`.

    optimum's exporter uses the legacy TorchScript exporter with its own model patcher (the
    vmap-free attention masks); torch's dynamo exporter with a KV cache produces graphs that
    fail at run time in ONNX Runtime (stack.md section 2), so this is the route that works.
    """
    exporters = require("optimum.exporters.onnx", INSTALL)
    import transformers

    # The tracer warns on every data-dependent branch of transformers' mask code (dozens of
    # lines per export, all expected: the graph is validated against torch afterwards).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        verbosity = transformers.logging.get_verbosity()
        transformers.logging.set_verbosity_error()
        try:
            with contextlib.redirect_stdout(sys.stderr):
                exporters.main_export(
                    str(model_dir), str(out_dir), task=TASK, opset=opset, local_files_only=True,
                    trust_remote_code=trust_remote_code, device="cpu", do_validation=False,
                )
        finally:
            transformers.logging.set_verbosity(verbosity)
    graph = out_dir / "model.onnx"
    if not graph.exists():
        raise RuntimeError(f"optimum wrote no model.onnx into {out_dir}")
    return graph
