"""How a CNN artifact of the `fpga` target's hls4ml flavour is proved: its C simulation against the int8 reference.

The artifact's HLS project (targets/fpga_hls4ml.py) is copied to a scratch folder and its C
simulation compiled with g++ by the project's own `build_lib.sh` (hls4ml is not needed for this,
only g++); the shared library's `myproject_float` classifies `prove_images` Fashion-MNIST test
images, which the int8 reference (runtime/cnn_int8.py) and the fp32 model classify too. The HLS
types are the int8 program's, so the C simulation's logits must equal the reference's exactly:
any image whose logits differ refuses the artifact (exit 5). Accuracy of all three, the C
simulation's agreement with the int8 model and the vendor build's command go to
`reports/hls4ml.json`.
"""

from __future__ import annotations

import ctypes
import json
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from accelc import progress
from accelc.errors import MissingDependency, ValidationFailed


def c_simulation(project: Path, scratch: Path, top: str):
    """The project's C simulation compiled with g++ in `scratch`: a function of float arrays."""
    if shutil.which("g++") is None:
        raise MissingDependency("g++ (the C simulation of the hls4ml project)", "apt-get install g++")
    build = scratch / project.name
    shutil.copytree(project, build)
    with progress.step("hls4ml: compile the C simulation with g++"):
        done = subprocess.run(["bash", "build_lib.sh"], cwd=build, capture_output=True, text=True)
    if done.returncode:
        raise ValidationFailed(f"hls4ml: g++ could not compile the C simulation: {done.stderr.strip()[-800:]}")
    library = ctypes.CDLL(str(next((build / "firmware").glob(f"{top}-*.so"))))
    return getattr(library, f"{top}_float")


def classify(simulate, x: np.ndarray, classes: int) -> np.ndarray:
    """Logits of N x C x H x W float images (the HLS design streams them channels last)."""
    pixels = np.ascontiguousarray(x.transpose(0, 2, 3, 1).reshape(len(x), -1), dtype=np.float32)
    out = np.zeros((len(x), classes), np.float32)
    for k in progress.bar(range(len(x)), desc="hls4ml C simulation", unit="image"):
        simulate(pixels[k].ctypes.data_as(ctypes.c_void_p), out[k].ctypes.data_as(ctypes.c_void_p))
    return out


def prove(directory: Path, manifest: dict) -> tuple[dict, bool]:
    from accelc.families import cnn_model
    from accelc.families.cnn_proof import fp32_logits
    from accelc.runtime import cnn_fabric
    from accelc.runtime.cnn_int8 import Int8Model, reference
    from accelc.targets.fpga_hls4ml import BUILD, PROJECT_DIR

    target = next(t for t in manifest["targets"] if t["kind"] == "fpga")
    folder = directory / target["dir"]
    build = json.loads((folder / BUILD).read_text())
    int8 = Int8Model.load(folder / cnn_fabric.INT8_DIR)
    config, model = cnn_model.load(directory / "model" / "hf")
    x, labels = cnn_model.fashion_mnist_inputs(config.input, "test", target["params"]["prove_images"])
    fp32 = fp32_logits(model, x)
    ref = reference(int8, int8.quantise_input(x)).astype(np.float64) * 2.0**-int8.output_exp
    with tempfile.TemporaryDirectory(prefix="accelc-hls4ml-") as scratch:
        csim = classify(c_simulation(folder / PROJECT_DIR, Path(scratch), build["top"]), x, config.classes)
    exact = np.all(csim == ref, axis=1)
    accuracy = {name: float((logits.argmax(1) == labels).mean()) for name, logits in
                (("fp32", fp32), ("int8_host", ref), ("hls4ml_csim", csim))}  # fmt: skip
    report = {
        "data": f"Fashion-MNIST test set: the first {len(x)} images",
        "accuracy": accuracy,
        "csim_equals_int8": bool(exact.all()),
        "images_with_different_logits": int((~exact).sum()),
        "agreement_with_int8": float((csim.argmax(1) == ref.argmax(1)).mean()),
        "agreement_with_fp32": float((csim.argmax(1) == fp32.argmax(1)).mean()),
        "build": build,
    }
    reports = directory / "reports"
    reports.mkdir(exist_ok=True)
    (reports / "hls4ml.json").write_text(json.dumps(report, indent=1))
    metrics = {k: report[k] for k in ("accuracy", "csim_equals_int8", "agreement_with_int8", "agreement_with_fp32")}
    metrics["vendor_build"] = "built" if build["built"] else f"not run: cd {PROJECT_DIR} && {build['command']}"
    progress.status(
        f"hls4ml proof: C simulation equals the int8 reference on {int(exact.sum())}/{len(x)} images; accuracy "
        f"fp32 {accuracy['fp32']:.4f}, int8 {accuracy['int8_host']:.4f}, C simulation {accuracy['hls4ml_csim']:.4f}"
    )
    if not exact.all():
        metrics["failure"] = (
            f"the hls4ml C simulation's logits differ from the int8 reference on {int((~exact).sum())} of {len(x)} "
            "images (reports/hls4ml.json)"
        )
    return metrics, bool(exact.all())
