"""The `fpga` target's flavour `hls4ml`: a small CNN as a Vitis HLS project (Duarte et al., arXiv 1804.06913).

hls4ml's PyTorch converter writes the project (C++ layer templates, the weights, the Tcl build
scripts) from the CNN family's torch module. Its fixed-point types are set from the int8 program
the VTA flavour runs (targets/cnn_quantize.py), so the HLS design computes the same numbers: an
int8 value at exponent e is `ap_fixed<8, 8-e>`; inputs and layer outputs round half up and
saturate (`RND, SAT`, as the int8 reference's rounding constant and clip do); weights are the
int8 weights exactly; biases and accumulators are 32 bits at the product's exponent. The torch
module handed to hls4ml carries the dequantised int8 weights, so no value is rounded twice.

The artifact's `targets/fpga/hls4ml_prj/` is the project as hls4ml wrote it; `build.json` holds
the vendor build command (hls4ml's Vitis backend: `vitis-run --tcl build_prj.tcl --mode hls`
with `build_opt.tcl` asking for synthesis, IP export and Vivado synthesis) and whether it ran:
only with `synthesise: true` and AMD Vitis on PATH. The proof (families/cnn_hls4ml.py) compiles
the project's C simulation with g++ and compares it with the int8 reference.
"""

from __future__ import annotations

import json
import shutil

import numpy as np

from accelc import progress
from accelc.errors import UsageError
from accelc.runtime.backends import Dependency

PROJECT_DIR = "hls4ml_prj"
BUILD = "build.json"
TOP = "myproject"  # hls4ml's top function: the C simulation's entry point is TOP + "_float"
VENDOR_TOOL = "vitis-run"
BUILD_COMMAND = "vitis-run --tcl build_prj.tcl --mode hls"
BUILD_STEPS = {"reset": 1, "csim": 0, "synth": 1, "cosim": 0, "validation": 0, "export": 1, "vsynth": 1}
HLS4ML = Dependency("hls4ml", "pip install 'accelc[hls4ml]'", "the fpga target's hls4ml flavour")


def fixed(bits: int, exp: int, modes: str = "") -> str:
    """hls4ml's spelling of ap_fixed holding `bits`-bit integers at exponent `exp` (value q * 2^-exp)."""
    return f"fixed<{bits},{bits - exp}{modes}>"


def int8_precisions(hls_config: dict, int8, model) -> None:
    """Set hls4ml's per-layer types from the int8 program, and the module's weights to its int8 values."""
    import torch

    layers = hls_config["LayerName"]
    layers["x"]["Precision"]["result"] = fixed(8, int8.input_exp, ",RND,SAT")
    exp = int8.input_exp
    for step in int8.steps:
        i, precision = step["layer"], layers[f"layers_{step['layer']}"]["Precision"]
        if step["op"] not in ("conv2d", "linear"):  # pooling, flatten, an unfused ReLU: exact on int8 values
            precision.update({k: fixed(8, exp) for k in ("result", "accum") if k in precision})
            continue
        w_exp = step["shift"] - exp + step["exp"]
        w_q, b_q = int8.weights[i]
        rounding = (1 << (step["shift"] - 1)) if step["shift"] else 0  # RND rounds instead
        module = model.layers[i]
        with torch.no_grad():
            module.weight.copy_(torch.from_numpy(w_q.astype(np.float64) * 2.0**-w_exp).reshape(module.weight.shape))
            module.bias.copy_(torch.from_numpy((b_q.astype(np.float64) - rounding) * 2.0 ** -(exp + w_exp)))
        precision.update(weight=fixed(8, w_exp), bias=fixed(32, exp + w_exp), accum=fixed(32, exp + w_exp))
        precision["result"] = fixed(8, step["exp"], ",RND,SAT")
        exp = step["exp"]
        if step["low"] == 0:  # the ReLU fused into the int8 step is its own layer in hls4ml
            layers[f"layers_{i + 1}"]["Precision"]["result"] = fixed(8, exp, ",RND,SAT")


def lower_hls4ml(params, bundle, ctx, calibrated) -> dict:
    HLS4ML.check()
    import hls4ml

    config, model, int8 = calibrated
    model = model.eval()
    hls_config = hls4ml.utils.config_from_pytorch_model(
        model, input_shape=tuple(config.input), granularity="name", backend="Vitis"
    )
    int8_precisions(hls_config, int8, model)
    project = ctx.workdir / PROJECT_DIR
    with progress.step("hls4ml: write the Vitis HLS project"):
        hls_model = hls4ml.converters.convert_from_pytorch_model(
            model, hls_config=hls_config, output_dir=str(project), project_name=TOP, backend="Vitis",
            io_type="io_stream",
        )  # fmt: skip
        hls_model.write()
    (project / "build_opt.tcl").write_text(
        "array set opt {\n" + "".join(f"    {k} {v}\n" for k, v in BUILD_STEPS.items()) + "}\n"
    )
    tool = shutil.which(VENDOR_TOOL)
    build = {"command": BUILD_COMMAND, "cwd": PROJECT_DIR, "steps": BUILD_STEPS, "top": TOP,
             "vendor_tool": VENDOR_TOOL, "found": tool, "built": False}  # fmt: skip
    if params.synthesise:
        if tool is None:
            raise UsageError(
                f"targets: fpga synthesise: true needs AMD Vitis ({VENDOR_TOOL} on PATH); without it the artifact "
                f"still holds the project, and `cd {PROJECT_DIR} && {BUILD_COMMAND}` builds it where Vitis is"
            )
        with progress.step(f"hls4ml: {BUILD_COMMAND} (synthesis, IP export, Vivado synthesis)"):
            build["report"] = hls_model.build(csim=False, synth=True, export=True, vsynth=True, log_to_stdout=False)
        build["built"] = True
    else:
        progress.status(f"hls4ml: project written; build it where AMD Vitis is: cd {PROJECT_DIR} && {BUILD_COMMAND}")
    (ctx.workdir / BUILD).write_text(json.dumps(build, indent=1, default=str))
    return {}  # no runtime backend: the proof compiles the project's C simulation
