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


def export_decoder_with_past(model, model_dir: Path, out_dir: Path, *, opset: int | None) -> Path:
    """Export a loaded decoder whose single graph takes `past_key_values.{i}.key/value` (length
    >= 0) and returns logits for every fed position plus `present.{i}.key/value`.

    The model is passed in, loaded by accelc (families.causal_lm.load_model), rather than named
    by folder: pruned checkpoints with per-layer widths load only through accelc's loader, and
    one route for every checkpoint keeps the exported graphs comparable. `model_dir` supplies
    the tokenizer/generation files optimum copies beside the graph.

    optimum's exporter uses the legacy TorchScript exporter with its own model patcher (the
    vmap-free attention masks); torch's dynamo exporter with a KV cache produces graphs that
    fail at run time in ONNX Runtime (docs/platform-notes.md section 2), so this is the route that works.
    """
    convert = require("optimum.exporters.onnx.convert", INSTALL)
    import transformers
    from optimum.utils.save_utils import maybe_load_preprocessors

    model.config.use_cache = True  # what main_export sets for a -with-past task
    # The tracer warns on every data-dependent branch of transformers' mask code (dozens of
    # lines per export, all expected: the graph is validated against torch afterwards).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        verbosity = transformers.logging.get_verbosity()
        transformers.logging.set_verbosity_error()
        try:
            with contextlib.redirect_stdout(sys.stderr):
                convert.onnx_export_from_model(
                    model=model,
                    output=str(out_dir),
                    task=TASK,
                    opset=opset,
                    device="cpu",
                    do_validation=False,
                    preprocessors=maybe_load_preprocessors(str(model_dir)),
                )
        finally:
            transformers.logging.set_verbosity(verbosity)
    graph = out_dir / "model.onnx"
    if not graph.exists():
        raise RuntimeError(f"optimum wrote no model.onnx into {out_dir}")
    return graph
