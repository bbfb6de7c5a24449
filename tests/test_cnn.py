"""The CNN family: its layer list, training with resume, int8 quantisation, and the fpga target end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest

from accelc.errors import UsageError
from accelc.families import cnn_model, cnn_train

FPGA_RECIPE = """
version: 1
model:
  builtin: tiny-cnn
targets:
  - kind: fpga
    calibration_images: 64
    prove_images: 40
{extra}
cache:
  dir: {cache}
"""


def test_builtin_layer_lists_chain_and_count_macs():
    vgg = cnn_model.BUILTINS["vgg16"]
    assert vgg.shapes()[-1] == (1000,)
    assert sum(1 for layer in vgg.layers if layer["op"] in ("conv2d", "linear")) == 16
    assert sum(vgg.macs()) == pytest.approx(15.47e9, rel=0.01)  # VGG-16's published 15.5 GMACs at 224x224
    fmnist = cnn_model.BUILTINS["fmnist-cnn"]
    assert fmnist.input == (1, 28, 28) and fmnist.shapes()[-1] == (10,)


def test_bad_cnn_config_names_the_layer():
    data = cnn_model.BUILTINS["tiny-cnn"].to_json()
    data["layers"][2] = {"op": "conv2d", "in": 7, "out": 32, "kernel": 3, "padding": 1}
    with pytest.raises(UsageError, match=r"layers\[2\] conv2d expects 7 input channels"):
        cnn_model.CNNConfig.from_json(data, "config.json")
    data["layers"][2] = {"op": "softmax"}
    with pytest.raises(UsageError, match=r"layers\[2\]\.op is 'softmax'; allowed"):
        cnn_model.CNNConfig.from_json(data, "config.json")


SMALL_28 = cnn_model.CNNConfig(
    (1, 28, 28),
    10,
    (
        {"op": "conv2d", "in": 1, "out": 4, "kernel": 3, "padding": 1},
        {"op": "relu"},
        {"op": "max_pool2d", "kernel": 4},
        {"op": "flatten"},
        {"op": "linear", "in": 196, "out": 10},
    ),
)


def test_training_resumes_from_its_checkpoint_to_the_same_weights(tmp_path, monkeypatch):
    import torch

    monkeypatch.setitem(cnn_model.BUILTINS, "fmnist-cnn", SMALL_28)
    monkeypatch.setattr(cnn_train, "CHECKPOINT_EVERY", 2)
    monkeypatch.setattr(cnn_train, "trained_dir", lambda name: tmp_path / "straight")
    straight = cnn_train.train("fmnist-cnn", steps=4)
    report = json.loads((straight / cnn_train.REPORT).read_text())
    assert report["steps"] == 4 and 0.0 < report["test_accuracy"] <= 1.0

    monkeypatch.setattr(cnn_train, "trained_dir", lambda name: tmp_path / "resumed")
    monkeypatch.setattr(cnn_train, "CHECKPOINT_EVERY", 2)
    # an interrupted run: two steps, checkpointed, then killed before publishing
    original = cnn_train.assets.publish_dir
    monkeypatch.setattr(cnn_train.assets, "publish_dir", lambda tmp, final: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        cnn_train.train("fmnist-cnn", steps=2)
    monkeypatch.setattr(cnn_train.assets, "publish_dir", original)
    assert (tmp_path / "resumed.training" / cnn_train.CHECKPOINT).exists()
    resumed = cnn_train.train("fmnist-cnn", steps=4)
    a, b = cnn_model.load(straight)[1].state_dict(), cnn_model.load(resumed)[1].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def tiny_artifact(tmp_path_factory):
    from accelc.compiler.compile import compile_recipe
    from accelc.compiler.recipe import load_recipe

    root = tmp_path_factory.mktemp("cnn")
    recipe = root / "recipe.yaml"
    recipe.write_text(FPGA_RECIPE.format(extra="", cache=root / "cache"))
    manifest = compile_recipe(load_recipe(recipe), root / "art")
    return root / "art", manifest


def test_fpga_artifact_is_proved_bit_exact_with_its_placement(tiny_artifact):
    art, manifest = tiny_artifact
    metrics = manifest["metrics"]
    assert metrics["bit_exact"] is True
    assert metrics["fabric_mac_fraction"] == 1.0  # every conv2d and linear of the tiny CNN
    assert metrics["int8_agreement_with_fp32"] > 0.95
    placement = json.loads((art / "targets/fpga/placement.json").read_text())
    assert placement["config_tag"] == "1x16_i8w8a32_15_15_18_17"
    where = {step["op"]: step["where"] for step in placement["steps"]}
    assert where == {"conv2d": "fabric", "linear": "fabric", "max_pool2d": "fabric", "flatten": "host"}
    pools = [step for step in placement["steps"] if step["op"] == "max_pool2d"]
    assert [p["fused_into"] for p in pools] == [0, 3]  # each on the ALU in its conv2d's stream
    files = manifest["files"]
    for step in placement["steps"]:
        for rel in step.get("files", {}).values():
            assert f"targets/fpga/{rel}" in files  # checksummed by the manifest
    report = json.loads((art / "reports/fpga.json").read_text())
    assert report["cycles_per_image"] == sum(row.get("cycles", 0) for row in report["layers"]) > 0


def test_accelc_run_classifies_and_a_corrupted_stream_is_refused(tiny_artifact, tmp_path, cli):
    import shutil

    art, _ = tiny_artifact
    code, out, _ = cli("run", art, "--samples", "20", "--seed", "3", "--out", tmp_path / "preds.json")
    assert code == 0 and "accuracy" in out
    preds = json.loads((tmp_path / "preds.json").read_text())
    assert len(preds["predictions"]) == 20 and preds["seed"] == 3

    copy = tmp_path / "copy"
    shutil.copytree(art, copy)
    insn = next((copy / "targets/fpga/layers").glob("*.insn.bin"))
    data = bytearray(insn.read_bytes())
    data[3] ^= 0x10
    insn.write_bytes(bytes(data))
    code, _, err = cli("run", copy, "--samples", "5")
    assert code == 2 and "damaged" in err and insn.name in err


def test_an_op_the_fabric_cannot_run_forced_onto_it_is_exit_2(tmp_path, cli):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(FPGA_RECIPE.format(extra="    fabric_layers: [6]", cache=tmp_path / "cache"))
    code, _, err = cli("compile", recipe, "-o", tmp_path / "art")
    assert code == 2 and "layer 6 is flatten" in err
    # pooling is fabric work only when fused into its conv2d's stream
    extra = "    fuse_pooling: false\n    fabric_layers: [2]"
    recipe.write_text(FPGA_RECIPE.format(extra=extra, cache=tmp_path / "cache"))
    code, _, err = cli("compile", recipe, "-o", tmp_path / "art")
    assert code == 2 and "layer 2 is max_pool2d" in err


def test_int8_quantisation_uses_shifts_the_fabric_can_do():
    from accelc.targets.cnn_quantize import quantise
    from accelc.targets.vta_lower import SHIFT_MAX

    config = cnn_model.BUILTINS["tiny-cnn"]
    model = cnn_model.seeded(config)
    x, _ = cnn_model.fashion_mnist_inputs(config.input, "train", 64)
    int8 = quantise(config, model, x)
    layers = [s for s in int8.steps if s["op"] in ("conv2d", "linear")]
    assert len(layers) == 4 and all(0 <= s["shift"] <= SHIFT_MAX for s in layers)
    assert [s["low"] for s in layers] == [0, 0, 0, -128]  # ReLUs fused; the logits are signed
    for s in layers:
        w, b = int8.weights[s["layer"]]
        assert w.dtype == np.int8 and b.dtype == np.int32 and np.abs(w).max() > 32  # the range is used


def test_a_stream_that_disagrees_with_the_reference_is_rejected(tmp_path, cli, monkeypatch):
    from accelc.targets import vta_lower

    lower = vta_lower.lower_layer

    def off_by_one_shift(w, bias, shift, low, shape, config, where):
        return lower(w, bias, min(shift + 1, vta_lower.SHIFT_MAX), low, shape, config, where)

    monkeypatch.setattr(vta_lower, "lower_layer", off_by_one_shift)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(FPGA_RECIPE.format(extra="", cache=tmp_path / "cache"))
    code, _, err = cli("compile", recipe, "-o", tmp_path / "art")
    assert code == 5 and "differs from the int32 reference at layers" in err
    assert not (tmp_path / "art").exists() and (tmp_path / "art.rejected" / "reports" / "fpga.json").exists()


def test_a_malformed_vta_config_is_exit_2_naming_it(tmp_path, cli):
    (tmp_path / "vta_config.json").write_text(json.dumps({"TARGET": "pynq", "LOG_BLOCK": 4}))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(FPGA_RECIPE.format(extra="    config: vta_config.json", cache=tmp_path / "cache"))
    code, _, err = cli("compile", recipe, "-o", tmp_path / "art")
    assert code == 2 and "vta_config.json: missing key(s) HW_VER" in err
