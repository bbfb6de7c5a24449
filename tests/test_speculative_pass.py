"""The `speculative` pass end to end: plan figures, validation of the rewritten loop, bad drafts."""

from __future__ import annotations

import json
import re

import pytest
from conftest import write_recipe

SPEC = """
  - type: speculative
    draft: {{keep_layers: [0]}}
    strategy: {strategy}
    fallback: {fallback}
"""


def spec_recipe(tiny_recipe, strategy="speculative", fallback="false", draft=None):
    recipe = tiny_recipe()
    step = SPEC.format(strategy=strategy, fallback=fallback)
    if draft is not None:
        step = step.replace("{keep_layers: [0]}", f"{{path: {draft}}}")
    recipe.write_text(recipe.read_text().replace("passes:\n", "passes:" + step))
    return recipe


@pytest.mark.parametrize("strategy", ["speculative", "pearl", "stairs", "batch_speculative"])
def test_rewritten_loop_is_validated_on_every_backend(cli, tiny_recipe, tmp_path, strategy):
    out = tmp_path / "out"
    code, _, err = cli("compile", spec_recipe(tiny_recipe, strategy), "-o", out)
    assert code == 0, err
    plan = json.loads((out / "decode" / "plan.json").read_text())
    assert plan["strategy"] == strategy and plan["fallback"] is False
    for key in ("alpha", "cost_ratio", "gamma", "predicted_speedup", "predicted_curve"):
        assert key in plan
    assert 0.0 <= plan["alpha"] <= 1.0 and plan["cost_ratio"] > 0
    assert "replayed" in plan["prediction"]  # every loop is priced over the measured acceptance
    report = json.loads((out / "reports" / "validation.json").read_text())
    assert report["decode_plan"]["verdict"] == "pass"
    assert set(report["decode_plan"]["backends"]) == {"torch", "ort"}
    assert report["draft"]["verdict"] == "pass"  # the draft's ONNX graph matches the torch draft
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["decode_plan"]["strategy"] == strategy and "model/draft_hf/config.json" in manifest["files"]
    code, _, err = cli("run", out, "--prompt", "Hello", "--raw", "--max-new-tokens", 10)
    assert code == 0 and f"[{strategy}]" in err and "target calls" in err
    assert re.search(rf"steady state .*\[{strategy}\] [0-9.]+ tok/s, plain greedy [0-9.]+ tok/s", err)


def test_subnet_draft_comes_from_the_pruning_passes(cli, tiny_recipe, tmp_path):
    recipe = spec_recipe(tiny_recipe)
    recipe.write_text(
        recipe.read_text().replace(
            "{keep_layers: [0]}", "{subnet_ratio: 0.5, search_generations: 2, search_population: 6}"
        )
    )
    out = tmp_path / "out"
    code, _, err = cli("compile", recipe, "-o", out)
    assert code == 0, err
    draft = json.loads((out / "reports" / "draft_pruned_model.json").read_text())
    assert draft["method"] == "arch_search" and draft["reformed"]
    assert draft["params"]["removed_ratio"] >= 0.5 - 1e-9
    assert (out / "reports" / "draft_search_log.json").exists()
    report = json.loads((out / "reports" / "validation.json").read_text())
    assert report["draft"]["verdict"] == "pass" and report["decode_plan"]["verdict"] == "pass"


def test_after_export_alpha_and_cost_are_measured_on_the_ort_graphs(cli, tiny_recipe, tmp_path):
    recipe = tiny_recipe()
    step = SPEC.format(strategy="speculative", fallback="false")
    recipe.write_text(
        recipe.read_text().replace("  - type: export_onnx\n", "  - type: export_onnx\n" + step.lstrip("\n"))
    )
    out = tmp_path / "out"
    code, _, err = cli("compile", recipe, "-o", out)
    assert code == 0, err
    manifest = json.loads((out / "manifest.json").read_text())
    assert [p["name"] for p in manifest["passes"]] == ["export_onnx", "speculative"]
    assert manifest["decode_plan"]["cost_backend"] == "ort"
    assert "model/onnx/draft.onnx" in manifest["files"]
    report = json.loads((out / "reports" / "validation.json").read_text())
    assert report["draft"]["verdict"] == "pass" and report["decode_plan"]["verdict"] == "pass"


def test_no_predicted_gain_falls_back_to_autoregressive(cli, tiny_recipe, tmp_path, monkeypatch):
    from accelc.loops import timing

    # Timings of tiny models on a busy machine decide nothing reliably, so the draft is priced
    # like the target (c = 1, verification = one step per token): then no gamma can pay,
    # whatever alpha is measured, and the pass must keep plain decoding.
    def as_costly_as_the_target(target, draft, prompt, verify_lengths=(), **_):
        return timing.CostMeasurement(1.0, 1e-3, 1e-3, {k: float(k) for k in verify_lengths})

    monkeypatch.setattr(timing, "measure_cost_ratio", as_costly_as_the_target)
    out = tmp_path / "out"
    code, _, err = cli("compile", spec_recipe(tiny_recipe, fallback="true"), "-o", out)
    assert code == 0, err
    plan = json.loads((out / "decode" / "plan.json").read_text())
    assert plan["fallback"] is True and plan["strategy"] == "greedy" and "no gain" in plan["reason"]
    assert plan["predicted_speedup"] <= 1.0
    assert not (out / "model" / "draft_hf").exists()


def test_draft_with_another_vocabulary_is_a_usage_error(cli, tiny_recipe, tmp_path):
    import shutil

    from accelc.families.causal_lm import _builtin_dir
    from accelc.families.tiny import byte_tokenizer

    draft = tmp_path / "draft"
    shutil.copytree(_builtin_dir("tiny-llama"), draft)
    tok = byte_tokenizer()
    tok.add_tokens(["<extra>"])
    tok.save_pretrained(draft)
    code, _, err = cli("compile", spec_recipe(tiny_recipe, draft=draft), "-o", tmp_path / "out")
    assert code == 2 and "different tokenizer" in err and "Traceback" not in err


def test_bad_layer_selection_is_a_usage_error(cli, tiny_recipe, tmp_path):
    recipe = spec_recipe(tiny_recipe)
    recipe.write_text(recipe.read_text().replace("keep_layers: [0]", "keep_layers: [5]"))
    code, _, err = cli("compile", recipe, "-o", tmp_path / "out")
    assert code == 2 and "keep_layers" in err


def after_export(tiny_recipe, draft: str, backends: str = "[ort]"):
    recipe = tiny_recipe(backends=backends)
    step = SPEC.format(strategy="speculative", fallback="false").replace("{keep_layers: [0]}", draft)
    recipe.write_text(
        recipe.read_text().replace("  - type: export_onnx\n", "  - type: export_onnx\n" + step.lstrip("\n"))
    )
    return recipe


@pytest.mark.parametrize("layout, block, symmetric", [("", 32, False), (", block_size: 16, symmetric: true", 16, True)])
def test_compressed_self_draft_int8_weights_and_truncated_head(cli, tiny_recipe, tmp_path, layout, block, symmetric):
    import numpy as np
    import onnx

    from accelc.runtime.artifact import Artifact

    out = tmp_path / "out"
    recipe = after_export(
        tiny_recipe, f"{{from_target: true, weights: int8{layout}, vocab: 24}}", backends="[ort, tvm]"
    )
    code, _, err = cli("compile", recipe, "-o", out)
    assert code == 0, err
    manifest = json.loads((out / "manifest.json").read_text())
    # the draft is the target's own weights: it exists only as its compressed graph, so torch and
    # TVM (where it would be the target itself) carry none and decode plainly, and say so
    assert "draft" not in manifest["targets"][0]["runtime"]["tvm"]["dirs"]
    assert not any(f.startswith("model/draft_hf/") for f in manifest["files"])
    assert sorted(w.split("'")[1] for w in manifest["warnings"] if "has no draft" in w) == ["torch", "tvm"]
    # its keys and values mean the target's: the draft starts from the target's prompt cache
    plan = json.loads((out / "decode" / "plan.json").read_text())
    assert plan["draft_prompt_kv"] == "target" and plan["draft_source"] == "from_target"
    assert "int8" in manifest["graph_meta"]["draft"]["compression"]
    assert "head scores" in manifest["graph_meta"]["draft"]["compression"]
    graph = onnx.load(str(out / "model" / "onnx" / "draft.onnx"), load_external_data=False).graph
    nbits = [n for n in graph.node if n.op_type == "MatMulNBits"]
    attrs = [{a.name: a.i for a in n.attribute} for n in nbits]
    assert nbits and {a["bits"] for a in attrs} == {8} and {a["block_size"] for a in attrs} == {block}
    has_zero_points = [len(n.input) > 3 and n.input[3] != "" for n in nbits]
    assert not any(has_zero_points) if symmetric else all(has_zero_points)
    # the draft scores only its subset (plus special tokens); elsewhere its probability is exactly 0
    draft = Artifact(out).step_model("ort", "draft")
    logits, _ = draft.extend(draft.empty_state(), np.array([[72, 101, 108]]))
    scored = np.isfinite(logits[-1])
    assert 24 <= scored.sum() < logits.shape[-1]
    report = json.loads((out / "reports" / "validation.json").read_text())
    assert report["draft"]["not_compared"]["ort"].startswith("compressed draft graph")
    assert report["decode_plan"]["verdict"] == "pass" and report["verdict"] == "pass"
    ran = {b: r["strategy"] for b, r in report["decode_plan"]["backends"].items()}
    assert ran == {"torch": "greedy", "ort": "speculative", "tvm": "greedy"}
    code, _, err = cli("run", out, "--prompt", "Hello", "--raw", "--max-new-tokens", 10)
    assert code == 0 and "[speculative]" in err
    code, _, err = cli("run", out, "--prompt", "Hello", "--raw", "--max-new-tokens", 10, "--backend", "tvm")
    assert code == 0 and "[greedy]" in err and "has no draft for the 'speculative' plan" in err


def test_lookup_drafts_are_planned_priced_and_validated(cli, tiny_recipe, tmp_path):
    out = tmp_path / "out"
    code, _, err = cli(
        "compile", after_export(tiny_recipe, "{keep_layers: [0], lookup: 6, lookup_ngram: 2}"), "-o", out
    )
    assert code == 0, err
    plan = json.loads((out / "decode" / "plan.json").read_text())
    assert 0.0 <= plan["lookup_match_rate"] <= 1.0
    # copying stays on only where the replay predicts it gains, and the plan shows both figures
    gains = plan["lookup_predicted_speedup"] > plan["predicted_speedup_without_lookup"] * 1.05
    if gains:
        assert plan["lookup"] == {"tokens": 6, "max_ngram": 2, "min_ngram": 2}
        assert plan["predicted_speedup"] == plan["lookup_predicted_speedup"]
    else:
        assert "lookup" not in plan and "predicted less than a 5% gain, so it is off" in plan["prediction"]
    assert json.loads((out / "reports" / "validation.json").read_text())["decode_plan"]["verdict"] == "pass"
    code, _, err = cli("run", out, "--prompt", "Hello Hello Hello Hello", "--raw", "--max-new-tokens", 12)
    assert code == 0 and "[speculative]" in err


@pytest.mark.parametrize(
    "draft, placed_after_export, message",
    [
        ("{keep_layers: [0], lookup_ngram: 2}", True, "set 'lookup' too"),
        ("{from_target: true}", True, "needs 'weights'"),
        ("{from_target: true, weights: int4}", False, "after export_onnx"),
        ("{keep_layers: [0], vocab: 100000}", True, "exceeds the"),
        ("{keep_layers: [0], block_size: 64}", True, "set 'weights' too"),
        ("{from_target: true, weights: gguf, symmetric: true}", True, "gguf keeps the file's own blocks"),
    ],
)
def test_bad_compressed_drafts_are_usage_errors(cli, tiny_recipe, tmp_path, draft, placed_after_export, message):
    if placed_after_export:
        recipe = after_export(tiny_recipe, draft)
    else:
        recipe = spec_recipe(tiny_recipe)
        recipe.write_text(recipe.read_text().replace("{keep_layers: [0]}", draft))
    code, _, err = cli("compile", recipe, "-o", tmp_path / "out")
    assert code == 2 and message in err, err


def test_lookup_with_a_loop_that_cannot_copy_is_a_usage_error(cli, tiny_recipe, tmp_path):
    recipe = after_export(tiny_recipe, "{keep_layers: [0], lookup: 4}")
    recipe.write_text(recipe.read_text().replace("strategy: speculative", "strategy: batch_speculative"))
    code, _, err = cli("compile", recipe, "-o", tmp_path / "out")
    assert code == 2 and "not batch_speculative" in err and "Traceback" not in err


def test_pearl_plan_prices_and_runs_its_workers_on_their_share_of_the_cores(cli, tiny_recipe, tmp_path):
    from accelc.fileutil import sha256_file
    from accelc.runtime.artifact import Artifact

    recipe = after_export(tiny_recipe, "{keep_layers: [0], lookup: 4}")
    recipe.write_text(recipe.read_text().replace("strategy: speculative", "strategy: pearl\n    pearl_threads: [1, 1]"))
    out = tmp_path / "out"
    code, _, err = cli("compile", recipe, "-o", out)
    assert code == 0, err
    plan = json.loads((out / "decode" / "plan.json").read_text())
    assert plan["strategy"] == "pearl" and plan["worker_threads"] == {"target": 1, "draft": 1}
    # PEARL copies drafts too, where its replay predicts that gains
    assert ("lookup" in plan) == (plan["lookup_predicted_speedup"] > plan["predicted_speedup_without_lookup"] * 1.05)
    assert plan["worker_slowdown"] > 0 and plan["worker_cost_ratio"] > 0
    target, draft = Artifact(out).decode_pair("ort")
    assert [m.session.get_session_options().intra_op_num_threads for m in (target, draft)] == [1, 1]
    # the prefill and the rounds of copied drafts run alone, on the target's session with the artifact's threads
    assert plan["alone_session"] and draft.alone_session is None
    artifact_threads = Artifact(out).backends()["ort"]["runtime"]["session"].get("intra_op_threads", 0)
    assert target.alone_session.get_session_options().intra_op_num_threads == artifact_threads
    # pearl_alone_session: false plans none (those calls then run on the worker's session); the
    # plan is rewritten as a compile would write it, its manifest checksum with it
    rewritten = out / "decode" / "plan.json"
    rewritten.write_text(json.dumps({**plan, "alone_session": False}))
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["files"]["decode/plan.json"] = {"bytes": rewritten.stat().st_size, "sha256": sha256_file(rewritten)}
    (out / "manifest.json").write_text(json.dumps(manifest))
    assert Artifact(out).decode_pair("ort")[0].alone_session is None
    assert json.loads((out / "reports" / "validation.json").read_text())["decode_plan"]["verdict"] == "pass"


@pytest.mark.parametrize(
    "plan, tvm_dirs, expected",
    [
        # a draft of its own on every backend: the plan runs everywhere
        (
            {"strategy": "stairs", "draft_source": "path"},
            {"target": "tvm/target", "draft": "tvm/draft"},
            {"torch": "stairs", "ort": "stairs", "tvm": "stairs"},
        ),
        # made from the target's weights by an older accelc: torch's and TVM's "draft" is the target itself
        (
            {"strategy": "speculative", "draft_prompt_kv": "target"},
            {"target": "tvm/target", "draft": "tvm/target"},
            {"torch": "greedy", "ort": "speculative", "tvm": "greedy"},
        ),
        # a sampling plan falls back to sampling, not to greedy decoding
        (
            {"strategy": "pearl", "sampling": True, "draft_source": "from_target"},
            {"target": "tvm/target"},
            {"torch": "sample", "ort": "pearl", "tvm": "sample"},
        ),
    ],
)
def test_a_backend_without_the_draft_decodes_plainly_and_says_why(tmp_path, plan, tvm_dirs, expected):
    from accelc.runtime.artifact import HF_DIRS, Artifact

    for rel in HF_DIRS.values():  # a dev-profile artifact: torch checkpoints of both roles
        (tmp_path / rel).mkdir(parents=True)
        (tmp_path / rel / "config.json").write_text("{}")
        (tmp_path / rel / "model.safetensors").write_bytes(b"")
    runtime = {"ort": {"graphs": {"target": "decoder", "draft": "draft"}, "session": {}}, "tvm": {"dirs": tvm_dirs}}
    (tmp_path / "manifest.json").write_text(
        json.dumps({"targets": [{"kind": "cpu", "dir": "targets/cpu", "runtime": runtime}]})
    )
    (tmp_path / "decode").mkdir()
    (tmp_path / "decode" / "plan.json").write_text(json.dumps(plan))
    art = Artifact(tmp_path)
    ran = {b: art.plan_for(b) for b in ("torch", "ort", "tvm")}
    assert {b: p.strategy for b, p in ran.items()} == expected
    for p in ran.values():
        if p.strategy != plan["strategy"]:
            assert p.planned_strategy == plan["strategy"] and "runs on: ort" in p.reason


@pytest.mark.parametrize("chat_template", [True, False])
def test_alpha_is_calibrated_on_prompts_of_the_form_the_plan_decodes(tmp_path, chat_template):
    from types import SimpleNamespace

    from accelc import assets
    from accelc.compiler.recipe import load_recipe
    from accelc.families.causal_lm import load_tokenizer
    from accelc.passes.speculative import Speculative

    recipe = write_recipe(
        tmp_path,
        f"""
        version: 1
        model: {{builtin: smollm2-135m-instruct}}
        data: {{calibration: austen:emma}}
        passes: [{{type: export_onnx}}]
        decode: {{chat_template: {str(chat_template).lower()}}}
        """,
    )
    ctx = SimpleNamespace(recipe=load_recipe(recipe))
    step = Speculative(Speculative.Params(draft={"from_target": True, "weights": "int8"}, calibration_prompts=2))
    tokenizer = load_tokenizer(assets.smollm2_dir())
    text = [tokenizer.decode(p) for p in step._calibration_prompts(tokenizer, ctx)]
    assert len(text) == 2
    wrapped = ["<|im_start|>user" in t and t.rstrip().endswith("<|im_start|>assistant") for t in text]
    assert wrapped == [chat_template] * 2
