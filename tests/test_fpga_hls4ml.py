"""The fpga target's hls4ml flavour on tiny-cnn: the HLS project, its g++ C simulation equal to the int8 model."""

from __future__ import annotations

import json
import sys

import pytest

RECIPE = """
version: 1
model:
  builtin: {model}
targets:
  - kind: fpga
    flavour: hls4ml
    calibration_images: 64
    prove_images: 40
{extra}
cache:
  dir: {cache}
"""


def write_recipe(root, model: str = "tiny-cnn", extra: str = ""):
    recipe = root / "recipe.yaml"
    recipe.write_text(RECIPE.format(model=model, extra=extra, cache=root / "cache"))
    return recipe


def test_the_c_simulation_equals_the_int8_model(tmp_path, cli):
    pytest.importorskip("hls4ml", reason="hls4ml is not installed (pip install 'accelc[hls4ml]')")
    code, _, err = cli("compile", write_recipe(tmp_path), "-o", tmp_path / "art")
    assert code == 0, err[-2000:]
    manifest = json.loads((tmp_path / "art/manifest.json").read_text())
    metrics = manifest["metrics"]
    assert metrics["csim_equals_int8"] is True and metrics["agreement_with_int8"] == 1.0
    assert metrics["vendor_build"].startswith("not run: cd hls4ml_prj && vitis-run --tcl build_prj.tcl")
    project = tmp_path / "art/targets/fpga/hls4ml_prj"
    assert (project / "build_prj.tcl").exists() and (project / "firmware/myproject.cpp").exists()
    assert "targets/fpga/hls4ml_prj/firmware/myproject.cpp" in manifest["files"]  # checksummed
    assert not list(project.rglob("*.so"))  # the C simulation is compiled by the proof, in scratch
    # the fixed-point types are the int8 program's: input and outputs at their exponents, RND and SAT
    config = (project / "hls4ml_config.yml").read_text()
    assert "fixed<8," in config and "RND" in config and "SAT" in config
    report = json.loads((tmp_path / "art/reports/hls4ml.json").read_text())
    assert report["images_with_different_logits"] == 0 and report["build"]["found"] is None


def test_synthesis_without_vitis_is_exit_2_naming_the_tool(tmp_path, cli):
    pytest.importorskip("hls4ml", reason="hls4ml is not installed (pip install 'accelc[hls4ml]')")
    code, _, err = cli("compile", write_recipe(tmp_path, extra="    synthesise: true"), "-o", tmp_path / "art")
    assert code == 2 and "vitis-run on PATH" in err


def test_a_missing_hls4ml_is_exit_3_naming_the_install(tmp_path, cli, monkeypatch):
    monkeypatch.setitem(sys.modules, "hls4ml", None)  # `import hls4ml` raises ImportError
    code, _, err = cli("compile", write_recipe(tmp_path), "-o", tmp_path / "art")
    assert code == 3 and "pip install 'accelc[hls4ml]'" in err


def test_the_hls4ml_flavour_refuses_a_causal_lm(tmp_path, cli):
    code, _, err = cli("compile", write_recipe(tmp_path, model="tiny-llama"), "-o", tmp_path / "art")
    assert code == 2 and "flavour hls4ml takes CNN classifiers" in err
