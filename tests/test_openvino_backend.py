"""The OpenVINO backend runs accelc's ONNX graphs as ORT does: same logits, same tokens, every plan.

Real OpenVINO on the tiny seeded Llama's fused graph (GroupQueryAttention included), with the
precision pinned to f32: a bf16-capable CPU would otherwise compute in bf16 and miss parity.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("openvino")
torch = pytest.importorskip("torch")

from accelc.compiler import fused_decoder  # noqa: E402
from accelc.runtime.openvino_backend import OpenVinoStepModel  # noqa: E402
from accelc.runtime.ort_backend import OrtStepModel  # noqa: E402

F32 = {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": 1}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from accelc.families import tiny
    from accelc.families.causal_lm import load_model

    tmp = tmp_path_factory.mktemp("openvino")
    model = load_model(tiny.build("tiny-llama", tmp / "tiny-llama"))
    graph = fused_decoder.build(model, tmp / "onnx")
    return model, graph


def test_prefill_and_decode_match_ort(tiny):
    model, graph = tiny
    ids = np.random.default_rng(0).integers(0, model.config.vocab_size, size=24)
    ov, ort = OpenVinoStepModel(graph, F32), OrtStepModel(graph)
    assert ov.vocab_size == model.config.vocab_size
    a, ov_state = ov.prefill(ids[:12])
    b, ort_state = ort.prefill(ids[:12])
    np.testing.assert_allclose(a, b, atol=1e-4, rtol=0)
    for t in ids[12:18]:
        a, ov_state = ov.extend(ov_state, np.array([t]))
        b, ort_state = ort.extend(ort_state, np.array([t]))
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=0)
    for x, y in zip(ov.kv_numpy(ov_state), ort.kv_numpy(ort_state)):
        np.testing.assert_allclose(x, y, atol=1e-4, rtol=0)
    # a rejection then a k-token verification, from a truncated (strided) state
    a, _ = ov.extend(ov.truncate(ov_state, 15), ids[15:20])
    b, _ = ort.extend(ort.truncate(ort_state, 15), ids[15:20])
    np.testing.assert_allclose(a, b, atol=1e-4, rtol=0)
    # a state adopted from another backend's KV tensors continues the same way
    adopted = ov.state_from_kv(ort.kv_numpy(ort_state))
    a, _ = ov.extend(adopted, ids[18:20])
    b, _ = ort.extend(ort_state, ids[18:20])
    np.testing.assert_allclose(a, b, atol=1e-4, rtol=0)


def test_greedy_tokens_equal_torch(tiny):
    from accelc.loops.autoregressive import generate

    model, graph = tiny
    prompt = [3, 17, 42, 99, 5, 8]
    with torch.no_grad():
        expected = model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, min_new_tokens=12)
    got = generate(OpenVinoStepModel(graph, F32), prompt, 12)
    assert got.tokens == expected[0, len(prompt) :].tolist()


@pytest.mark.parametrize("strategy", ["speculative", "pearl\n    pearl_threads: [1, 1]"])
def test_compile_with_openvino_validates_and_runs_the_plan(cli, tiny_recipe, tmp_path, strategy):
    recipe = tiny_recipe(backends="[ort, openvino]")
    step = f"  - type: speculative\n    draft: {{keep_layers: [0]}}\n    strategy: {strategy}\n    fallback: false\n"
    strategy = strategy.split()[0]
    recipe.write_text(
        recipe.read_text()
        .replace("passes:\n", "passes:\n" + step)
        .replace("backends: [ort, openvino]", "backends: [ort, openvino]\n    openvino: {threads: 1}")
    )
    out = tmp_path / "out"
    code, _, err = cli("compile", recipe, "-o", out)
    assert code == 0, err
    report = json.loads((out / "reports" / "validation.json").read_text())
    assert report["backends"]["openvino"]["verdict"] == "pass"
    assert report["draft"]["backends"]["openvino"]["verdict"] == "pass"
    # the plan on openvino (PEARL: each worker its share of the threads) reproduces the target's greedy tokens
    assert report["decode_plan"]["backends"]["openvino"]["strategy"] == strategy
    assert report["decode_plan"]["backends"]["openvino"]["verdict"] == "pass"

    from accelc.runtime.artifact import Artifact

    model = Artifact(out).step_model("openvino")
    assert model.compiled.get_property("INFERENCE_NUM_THREADS") == 1
    assert str(model.compiled.get_property("INFERENCE_PRECISION_HINT")) in ("f32", "<Type: 'float32'>")
    code, _, err = cli("run", out, "--backend", "openvino", "--prompt", "Hello", "--raw", "--max-new-tokens", 8)
    assert code == 0 and f"openvino [{strategy}]" in err, err


def test_a_misspelt_property_is_exit_2_naming_it(cli, tiny_recipe, tmp_path):
    recipe = tiny_recipe(backends="[openvino]")
    recipe.write_text(
        recipe.read_text().replace(
            "backends: [openvino]", "backends: [openvino]\n    openvino: {properties: {INFERENCE_NUM_THREDS: 2}}"
        )
    )
    code, _, err = cli("compile", recipe, "-o", tmp_path / "out")
    assert code == 2 and "INFERENCE_NUM_THREDS" in err and "Traceback" not in err


def test_without_openvino_validate_is_exit_3_with_the_pip_command(tiny_recipe, tmp_path):
    # a package named openvino that fails to import stands in for an environment without it
    shadow = tmp_path / "no-openvino" / "openvino"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('openvino is not installed here')\n")
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(shadow.parent), str(root)])}
    recipe = tiny_recipe(backends="[ort, openvino]")
    done = subprocess.run(
        [sys.executable, "-m", "accelc", "validate", str(recipe)], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 3, done.stderr
    assert "pip install openvino==2026.4.1" in done.stderr


def test_a_4bit_draft_of_the_targets_weights_runs_on_openvino(cli, tiny_recipe, tmp_path):
    # the compressed draft graph (MatMulNBits) starts from the target's prompt cache (state_from_kv)
    recipe = tiny_recipe(backends="[ort, openvino]")
    step = "  - type: speculative\n    draft: {from_target: true, weights: int4}\n    strategy: speculative\n"
    recipe.write_text(recipe.read_text().replace("  - type: export_onnx\n", "  - type: export_onnx\n" + step))
    out = tmp_path / "out"
    code, _, err = cli("compile", recipe, "-o", out, "--set", "passes.1.fallback=false")
    assert code == 0, err
    report = json.loads((out / "reports" / "validation.json").read_text())
    assert set(report["draft"]["not_compared"]) == {"ort", "openvino"}
    row = report["decode_plan"]["backends"]["openvino"]
    assert row["strategy"] == "speculative" and row["verdict"] == "pass"
