"""A masked-diffusion LM compiled end to end: denoiser export, the sampling pass, ORT, `accelc run`."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import write_recipe

RECIPE = """
model: {model}
passes:
  - type: export_denoiser
  - type: diffusion_sampling
    gen_length: 16
    baseline_block_length: 8
    block_lengths: [8]
    calibration_prompts: 2
    prompt_tokens: 8
    min_agreement: {bound}
targets: [{{kind: cpu, backends: [ort]}}]
eval:
  parity: {{prompts: ["Hello there"]}}
cache: {{dir: {cache}}}
"""


def recipe(tmp_path, model="{builtin: tiny-llada}", bound=0.5):
    return write_recipe(tmp_path, RECIPE.format(model=model, bound=bound, cache=tmp_path / "cache"))


@pytest.mark.parametrize("model", ["tiny-llada", "tiny-dream"])
def test_compile_validates_ort_and_runs(cli, tmp_path, model):
    out = tmp_path / "out"
    code, _, err = cli("compile", recipe(tmp_path, f"{{builtin: {model}}}"), "-o", out)
    assert code == 0, err
    validation = json.loads((out / "reports" / "validation.json").read_text())
    assert validation["backends"]["ort"]["verdict"] == "pass"
    assert validation["backends"]["ort"]["max_abs_diff"] < 1e-4
    plan = json.loads((out / "decode" / "plan.json").read_text())
    measured = json.loads((out / "reports" / "diffusion_sampling.json").read_text())["measured"]
    assert measured[0]["options"]["sampler"] == "baseline" and plan["reason"]
    # the anchor is LLaDA as published (every position, one a call); its early-stopped form is a candidate
    assert not measured[0]["options"]["stop_at_eos"] and measured[0]["calls"] == 16
    assert measured[1]["options"] == {**measured[0]["options"], "stop_at_eos": True}
    factors = {m["options"]["factor"] for m in measured if m["options"]["sampler"] == "fast_factor"}
    assert factors == {1.0, 2.0}  # each sampler's own knob: one candidate per value
    code, _, err = cli("run", out, "--prompt", "Hello", "--backend", "ort")
    assert code == 0, err
    assert "calls" in err and "tokens per call" in err and "tok/s" in err
    report = tmp_path / "bench.json"
    code, text, err = cli(
        "bench", out, "--repeats", "2", "--prompt-tokens", "8", "--new-tokens", "16", "--json", report
    )
    assert code == 0, err
    rows = json.loads(report.read_text())["rows"]
    reference = rows[0]
    assert (reference["sampler"], reference["stop_at_eos"], reference["calls"]) == ("baseline", False, 16)
    assert {r["backend"] for r in rows} == {"torch", "ort"} and sum(r["planned"] for r in rows) == 2
    assert {r["sampler"] for r in rows} >= {"baseline", "fast_threshold", "fast_factor", "slowfast"}
    assert "x calls" in text and "fast_factor" in text and report.with_suffix(".png").exists()


def test_an_unreachable_quality_bound_plans_the_baseline(cli, tmp_path):
    out = tmp_path / "out"
    # agreement 1.0 with the baseline: only a configuration decoding exactly as it does qualifies
    code, _, err = cli("compile", recipe(tmp_path, bound=1.0), "-o", out)
    assert code == 0, err
    plan = json.loads((out / "decode" / "plan.json").read_text())
    if plan["fallback"]:
        assert plan["sampler"] == "baseline" and "no configuration" in plan["reason"]
    else:  # a candidate reproduced the baseline exactly on the random model
        measured = json.loads((out / "reports" / "diffusion_sampling.json").read_text())["measured"]
        assert any(m["agreement"] == 1.0 for m in measured[1:])


def test_a_block_length_that_does_not_tile_the_response_is_exit_2(cli, tmp_path):
    out = tmp_path / "out"
    assert cli("compile", recipe(tmp_path), "-o", out)[0] == 0
    code, _, err = cli("run", out, "--prompt", "Hi", "--max-new-tokens", "12")
    assert code == 2 and "block_length 8 does not divide gen_length 12" in err


def test_a_causal_lm_given_a_diffusion_pass_is_exit_2(cli, tmp_path):
    code, _, err = cli("validate", recipe(tmp_path, "{builtin: tiny-llama}"))
    assert code == 2 and "export_denoiser" in err and "masked-diffusion LM" in err


def test_a_folder_without_mask_token_is_exit_2(cli, tmp_path):
    from accelc.families import diffusion_lm_tiny

    folder = diffusion_lm_tiny.build("tiny-dream", tmp_path / "dream")
    config = json.loads((folder / "config.json").read_text())
    del config["mask_token_id"]
    (folder / "config.json").write_text(json.dumps(config))
    code, _, err = cli("compile", recipe(tmp_path, f"{{path: {folder}}}"), "-o", tmp_path / "out")
    assert code == 2 and "mask_token_id" in err


def test_a_diffusion_folder_is_recognised_by_its_config(tmp_path):
    from accelc.families import diffusion_lm_tiny
    from accelc.families.diffusion_lm import DiffusionLM

    folder = diffusion_lm_tiny.build("tiny-llada", tmp_path / "llada")
    assert DiffusionLM().recognises_path(folder)
    shutil.copy(folder / "config.json", tmp_path / "config.json")
    config = json.loads((tmp_path / "config.json").read_text())
    config["architectures"] = ["LlamaForCausalLM"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert not DiffusionLM().recognises_path(tmp_path)


def test_the_benchmark_writes_every_row_key(tmp_path):
    from benchmarks import diffusion

    out = tmp_path / "rows.json"
    args = ["--model", "tiny-dream", "--gen-lengths", "8", "--block-length", "4", "--prompts", "1"]
    args += ["--thresholds", "0.9", "0.7", "--factors", "1", "2", "--stop-rules", "settled", "eos"]
    assert diffusion.main([*args, "--prompt-tokens", "8", "--threads", "1", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    keys = {"sampler", "cache", "gen_length", "calls", "tokens_per_call", "tok_s", "calls_reduction", "speedup"}
    keys |= {"agreement", "quality", "baseline_quality", "stop_at_eos", "padding_calls", "text_tokens"}
    keys |= {"stop_rule", "same_texts", "baseline_spread"}
    measured = [r for r in rows if "calls" in r]
    assert {(r["sampler"], r["cache"]) for r in measured} >= {("baseline", "none"), ("fast_factor", "dual")}
    assert all(keys <= set(r) for r in measured)
    knobs = {(r["sampler"], r["threshold"], r["factor"]) for r in measured if r["cache"] == "none"}
    assert knobs >= {("fast_threshold", 0.9, None), ("fast_threshold", 0.7, None)}
    assert knobs >= {("fast_factor", None, 1.0), ("fast_factor", None, 2.0)}
    assert {r["stop_rule"] for r in measured if r["stop_at_eos"]} == {"settled", "eos"}
    assert {r["sampler"] for r in rows} >= {"smollm2_ar", "unigram"}
    baseline = next(r for r in measured if r["sampler"] == "baseline" and r["cache"] == "none")
    assert baseline["calls"] == 8 and baseline["agreement"] == 1.0 and baseline["calls_reduction"] == 1.0
    assert baseline["same_texts"] == 1
    assert not baseline["stop_at_eos"] and any(r["sampler"] == "baseline" and r["stop_at_eos"] for r in measured)
    assert out.with_suffix(".png").exists() and out.with_suffix(".protocol.json").exists()


def test_a_pass_block_length_that_does_not_tile_is_a_recipe_error(cli, tmp_path):
    path = write_recipe(
        tmp_path,
        """
        model: {builtin: tiny-dream}
        passes: [{type: export_denoiser}, {type: diffusion_sampling, gen_length: 16, baseline_block_length: 8, block_lengths: [8, 5]}]
        targets: [{kind: cpu, backends: [ort]}]
        """,
    )
    code, _, err = cli("validate", path)
    assert code == 2 and "block length 5 does not divide gen_length 16" in err


def test_run_encodes_the_prompt_as_training_did_without_special_tokens():
    from accelc import assets
    from accelc.families.causal_lm import load_tokenizer
    from accelc.families.diffusion_lm_proof import encode

    tokenizer = load_tokenizer(assets.smollm2_dir())  # its tokenizer adds <|im_start|> by default
    assert tokenizer("Hello")["input_ids"][0] == tokenizer.bos_token_id
    assert encode(tokenizer, "Hello") == tokenizer("Hello", add_special_tokens=False)["input_ids"]
