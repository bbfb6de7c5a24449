"""The fpga target on a causal LM: projections as int8 VTA streams, proved bit-exact, on a tiny Llama."""

from __future__ import annotations

import json

import numpy as np
import pytest

# a weight buffer of 32 blocks (8 KB): tiny-llama's 44-block MLP projections must be streamed in tiles
SMALL_WGT = {**json.loads('{"TARGET": "pynq", "HW_VER": "0.0.2", "LOG_INP_WIDTH": 3, "LOG_WGT_WIDTH": 3}'),
             "LOG_ACC_WIDTH": 5, "LOG_BATCH": 0, "LOG_BLOCK": 4, "LOG_UOP_BUFF_SIZE": 15, "LOG_INP_BUFF_SIZE": 15,
             "LOG_WGT_BUFF_SIZE": 13, "LOG_ACC_BUFF_SIZE": 17}  # fmt: skip

RECIPE = """
version: 1
model:
  builtin: {model}
data:
  calibration: austen:emma
  evaluation: austen:persuasion
targets:
  - kind: fpga
    config: vta_config.json
    calibration_windows: 2
    calibration_window: 64
    prompts: ["The capital of France is", "Once upon a time"]
    greedy_tokens: 4
    perplexity_windows: 1
eval:
  parity:
    prompts: ["Hello"]
    greedy_tokens: 2
  perplexity:
    enabled: false
  bench:
    enabled: false
cache:
  dir: {cache}
"""


def write_recipe(root, model: str = "tiny-llama"):
    (root / "vta_config.json").write_text(json.dumps(SMALL_WGT))
    recipe = root / "recipe.yaml"
    recipe.write_text(RECIPE.format(model=model, cache=root / "cache"))
    return recipe


@pytest.fixture(scope="module")
def lm_artifact(tmp_path_factory):
    from accelc.compiler.compile import compile_recipe
    from accelc.compiler.recipe import load_recipe

    root = tmp_path_factory.mktemp("fpga-lm")
    manifest = compile_recipe(load_recipe(write_recipe(root)), root / "art")
    return root / "art", manifest


def test_every_projection_runs_on_the_fabric_bit_exact(lm_artifact):
    art, manifest = lm_artifact
    metrics = manifest["metrics"]["fpga"]
    assert metrics["bit_exact"] is True and metrics["fabric_mac_fraction"] == 1.0
    assert 0.0 <= metrics["greedy_agreement"] <= 1.0 and np.isfinite(metrics["ppl_ratio"])
    placement = json.loads((art / "targets/fpga/placement.json").read_text())
    names = [step["name"] for step in placement["steps"]]
    assert len(names) == 2 * 7 and names[:2] == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj"]
    assert all(step["where"] == "fabric" for step in placement["steps"])
    assert {"rms_norm", "rotary_embedding", "attention", "lm_head"} <= {h["op"] for h in placement["host"]}
    # the MLP's weights do not fit the 32-block buffer: streamed tile by tile (more than one weight LOAD)
    down = next(s for s in placement["steps"] if s["name"].endswith("down_proj"))
    assert down["tiling"]["group"] * down["tiling"]["chunk"] < 44 and down["instructions"]["LOAD"] > 3
    for step in placement["steps"]:
        for rel in step["files"].values():
            assert f"targets/fpga/{rel}" in manifest["files"]  # checksummed by the manifest
    report = json.loads((art / "reports/fpga.json").read_text())
    assert report["cycles_per_token"] == sum(row["cycles"] for row in report["projections"]) > 0
    assert len(report["greedy"]["fp32"]) == 2 and report["perplexity"]["fp32"]["tokens_scored"] > 0


def test_offloaded_projections_follow_the_int8_reference_and_come_back(lm_artifact):
    import torch

    from accelc.families.causal_lm import load_model
    from accelc.runtime.cnn_fabric import FabricModel
    from accelc.runtime.lm_fabric import Offload, reference

    art, _ = lm_artifact
    model = load_model(art / "model/hf")
    fabric = FabricModel(art / "targets/fpga")
    ids = torch.tensor([[5, 17, 42, 9, 100, 3]])
    seen = []

    def recording(step, x_q):
        y = reference(fabric.model)(step, x_q)
        seen.append((step["name"], x_q.dtype, y.dtype))
        return y

    with torch.inference_mode():
        fp32 = model(ids).logits
        with Offload(model, fabric.model, recording):
            int8 = model(ids).logits
        again = model(ids).logits
    assert [s[0] for s in seen] == [s["name"] for s in fabric.model.steps]  # each projection once, in order
    assert all(x == np.int8 and y == np.int8 for _, x, y in seen)
    assert not torch.equal(int8, fp32) and torch.equal(again, fp32)  # offloaded, then its own layers again
    assert torch.corrcoef(torch.stack([int8.flatten(), fp32.flatten()]))[0, 1] > 0.9


def test_a_projection_stream_that_disagrees_with_the_reference_is_rejected(tmp_path, cli, monkeypatch):
    from accelc.targets import vta_lower

    lower = vta_lower.lower_layer

    def off_by_one_shift(w, bias, shift, low, shape, config, where):
        return lower(w, bias, np.minimum(np.asarray(shift) + 1, vta_lower.SHIFT_MAX), low, shape, config, where)

    monkeypatch.setattr(vta_lower, "lower_layer", off_by_one_shift)
    code, _, err = cli("compile", write_recipe(tmp_path), "-o", tmp_path / "art")
    assert code == 5 and "differs from the int32 reference at" in err and "model.layers.0." in err
    assert (tmp_path / "art.rejected" / "reports" / "fpga.json").exists()


def test_a_model_without_llama_projections_is_exit_2(tmp_path, cli):
    code, _, err = cli("compile", write_recipe(tmp_path, "tiny-gpt2"), "-o", tmp_path / "art")
    assert code == 2 and "has no Linear modules named q_proj" in err
