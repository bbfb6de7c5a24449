"""End-to-end compiles of tiny seeded models: the same code paths users run, in seconds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from accelc.runtime.artifact import Artifact


@pytest.mark.parametrize("family", ["tiny-llama", "tiny-gpt2", "tiny-opt", "tiny-qwen2"])
def test_compile_each_family_passes_validation(cli, tiny_recipe, tmp_path, family):
    out = tmp_path / "out"
    code, _stdout, err = cli("compile", tiny_recipe(model=family), "-o", out)
    assert code == 0, err
    manifest = json.loads((out / "manifest.json").read_text())
    report = json.loads((out / "reports" / "validation.json").read_text())
    assert report["verdict"] == "pass"
    assert report["backends"]["ort"]["max_abs_diff"]["prefill_logits"] < 1e-4
    for case in report["cases"]:
        assert case["backends"]["ort"]["greedy_tokens"] == case["expected_tokens"]
    # every file is listed with its checksum, and the ONNX graph is there
    assert "model/onnx/decoder.onnx" in manifest["files"]
    assert all(len(f["sha256"]) == 64 for f in manifest["files"].values())
    assert manifest["passes"][0]["name"] == "export_onnx"
    assert manifest["dependencies"]["onnxruntime"]


def test_run_matches_transformers_generate(cli, tiny_recipe, tmp_path):
    out = tmp_path / "out"
    assert cli("compile", tiny_recipe(), "-o", out)[0] == 0
    from accelc.compiler.validation import reference_greedy

    art = Artifact(out)
    prompt = "Hello world, this is"
    ids = list(art.tokenizer(prompt)["input_ids"])
    expected = reference_greedy(art.torch_model(), ids, 12)
    for backend in ("ort", "torch"):
        code, stdout, err = cli(
            "run", out, "--prompt", prompt, "--max-new-tokens", 12, "--backend", backend, "--raw", "--show-tokens"
        )
        assert code == 0
        assert json.loads(stdout.strip().splitlines()[-1]) == expected
        assert f"{backend} steady state (warm sessions" in err  # a warm rate, not only the cold first one


def test_second_compile_reuses_the_cache_and_no_cache_bypasses_it(cli, tiny_recipe, tmp_path):
    recipe = tiny_recipe()
    assert cli("compile", recipe, "-o", tmp_path / "a")[0] == 0
    code, _, err = cli("compile", recipe, "-o", tmp_path / "b")
    assert code == 0 and "pass export_onnx: cached" in err
    a = json.loads((tmp_path / "a" / "manifest.json").read_text())
    b = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert a["bundle_id"] == b["bundle_id"]
    assert a["files"]["model/onnx/decoder.onnx"] == b["files"]["model/onnx/decoder.onnx"]
    code, _, err = cli("compile", recipe, "-o", tmp_path / "c", "--no-cache")
    assert code == 0 and "cached" not in err
    # a changed parameter changes the chain: no stale reuse
    code, _, err = cli("compile", recipe, "-o", tmp_path / "d", "--set", "passes.0.opset=17")
    assert code == 0 and "pass export_onnx: cached" not in err


def test_dry_run_does_nothing(cli, tiny_recipe, tmp_path):
    code, out, _ = cli("compile", tiny_recipe(), "-o", tmp_path / "out", "--dry-run")
    assert code == 0 and json.loads(out)["passes"][0]["type"] == "export_onnx"
    assert not (tmp_path / "out").exists()


def test_int8_quantisation_shrinks_the_graph_and_stays_close(cli, tiny_recipe, tmp_path):
    recipe = tiny_recipe()
    assert cli("compile", recipe, "-o", tmp_path / "fp32")[0] == 0
    recipe.write_text(
        recipe.read_text().replace(
            "  - type: export_onnx\n", "  - type: export_onnx\n  - type: quantize_dynamic_int8\n"
        )
    )
    out = tmp_path / "int8"
    # int8 weights drift: parity is judged with a looser tolerance and no token-for-token check
    # (the fused graph's packed q|k|v MatMul shares one per-tensor scale across the three)
    code, _, err = cli(
        "compile", recipe, "-o", out, "--set", "eval.parity.atol=1.0", "--set", "eval.parity.greedy_tokens=0"
    )
    assert code == 0, err
    manifest = json.loads((out / "manifest.json").read_text())
    assert [p["name"] for p in manifest["passes"]] == ["export_onnx", "quantize_dynamic_int8"]
    fp32 = json.loads((tmp_path / "fp32" / "manifest.json").read_text())

    def graph_bytes(files: dict) -> int:  # the graph and its weights' data file
        return sum(files[name]["bytes"] for name in files if name.startswith("model/onnx/decoder.onnx"))

    assert graph_bytes(manifest["files"]) < 0.6 * graph_bytes(fp32["files"])
    report = json.loads((out / "reports" / "validation.json").read_text())
    assert 0 < report["backends"]["ort"]["max_abs_diff"]["prefill_logits"] < 1.0


def test_validation_failure_exits_5_and_keeps_reports(cli, tiny_recipe, tmp_path):
    out = tmp_path / "out"
    recipe = tiny_recipe()
    recipe.write_text(
        recipe.read_text().replace(
            "  - type: export_onnx\n", "  - type: export_onnx\n  - type: quantize_dynamic_int8\n"
        )
    )
    code, _, err = cli("compile", recipe, "-o", out, "--set", "eval.parity.atol=1e-7")
    assert code == 5 and "validation failed" in err
    assert not out.exists()
    assert json.loads((tmp_path / "out.rejected" / "reports" / "validation.json").read_text())["verdict"] == "fail"


def test_onnx_file_input_is_lowered_for_ort_and_checked_against_itself(cli, tmp_path):
    """A plain ONNX graph (not a decoder): lowering only, parity against the unoptimised graph."""
    import onnx
    from conftest import write_recipe
    from onnx import TensorProto, helper

    rng = __import__("numpy").random.default_rng(0)
    w = helper.make_tensor("w", TensorProto.FLOAT, [8, 4], rng.standard_normal(32).astype("float32").tolist())
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Relu", ["h"], ["y"])],
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
        [w],
    )
    path = tmp_path / "mlp.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    recipe = write_recipe(
        tmp_path,
        f"model:\n  path: {path}\ntargets:\n  - kind: cpu\n    backends: [ort]\ncache:\n  dir: {tmp_path / 'cache'}\n",
    )
    code, _, err = cli("compile", recipe, "-o", tmp_path / "out")
    assert code == 0, err
    report = json.loads((tmp_path / "out" / "reports" / "validation.json").read_text())
    assert report["verdict"] == "pass" and report["backends"]["ort"]["max_abs_diff"]["y"] < 1e-5
    # TVM lowers causal-LM checkpoints only: a clear usage error, not a traceback
    code, _, err = cli("compile", recipe, "-o", tmp_path / "out2", "--set", "targets.0.backends=[tvm]")
    assert code == 2 and "causal LM" in err


def test_int4_weight_quantisation_uses_matmulnbits(cli, tiny_recipe, tmp_path):
    import onnx

    recipe = tiny_recipe()
    recipe.write_text(
        recipe.read_text().replace(
            "  - type: export_onnx\n", "  - type: export_onnx\n  - type: quantize_weights_int4\n    block_size: 16\n"
        )
    )
    out = tmp_path / "int4"
    code, _, err = cli(
        "compile", recipe, "-o", out, "--set", "eval.parity.atol=5", "--set", "eval.parity.greedy_tokens=0"
    )
    assert code == 0, err
    graph = onnx.load(str(out / "model" / "onnx" / "decoder.onnx"), load_external_data=False)
    # every projection of the 2 layers: the fused graph packs q|k|v, so 5 weight MatMuls per layer
    weights = {t.name for t in graph.graph.initializer}
    assert sum(n.op_type == "MatMulNBits" for n in graph.graph.node) >= 2 * 5
    assert not [n.name for n in graph.graph.node if n.op_type == "MatMul" and n.input[1] in weights]
    report = json.loads((out / "reports" / "validation.json").read_text())
    assert 0 < report["backends"]["ort"]["max_abs_diff"]["prefill_logits"] < 5
    # the weights travel in an external-data file renamed with the graph, which names it
    locations = {e.value for t in graph.graph.initializer for e in t.external_data if e.key == "location"}
    assert locations == {"decoder.onnx.data"} and (out / "model" / "onnx" / "decoder.onnx.data").is_file()
    assert "model/onnx/decoder.onnx.data" in json.loads((out / "manifest.json").read_text())["files"]
    # ...a file of its own (onnx refuses data with more than one hard link), as readable as the graph
    data, proto = out / "model" / "onnx" / "decoder.onnx.data", out / "model" / "onnx" / "decoder.onnx"
    assert data.stat().st_nlink == 1 and data.stat().st_mode == proto.stat().st_mode
    assert len(onnx.load(str(proto)).graph.initializer) == len(graph.graph.initializer)


def test_no_report_names_the_temporary_build_folder(cli, tmp_path):
    """The artifact is built in `.NAME.tmp-PID` and renamed when complete: a path into that
    folder in a report or the manifest would name a folder that no longer exists."""
    from conftest import write_recipe

    recipe = write_recipe(
        tmp_path,
        f"""
        model: {{builtin: tiny-llama}}
        passes: [{{type: export_onnx}}]
        targets: [{{kind: cpu, backends: [ort]}}]
        eval:
          parity: {{greedy_tokens: 4, decode_steps: 1}}
          perplexity: {{window: 32, max_windows: 1}}
          bench: {{repeats: 1, prompt_tokens: 8, new_tokens: 2, backends: [ort]}}
        cache: {{dir: {tmp_path / "cache"}}}
        """,
    )
    out = tmp_path / "out"
    code, _stdout, err = cli("compile", recipe, "-o", out)
    assert code == 0, err
    written = [p for p in out.rglob("*") if p.suffix in (".json", ".yaml")]
    assert {"manifest.json", "eval.json", "bench.json", "validation.json"} <= {p.name for p in written}
    for path in written:
        assert ".tmp-" not in path.read_text(), path
    evaluation = json.loads((out / "reports" / "eval.json").read_text())
    assert {r["tokenizer"] for r in evaluation["backends"].values()} == {"model/hf"}


def test_compile_json_is_one_summary_for_ci_with_cache_hits_and_failures(cli, tiny_recipe, tmp_path):
    recipe = tiny_recipe()
    code, out, _ = cli("-q", "compile", recipe, "-o", tmp_path / "a", "--json")
    first = json.loads(out)
    assert code == 0 and first["ok"] and first["cache"] == {"cached": 0, "ran": 2, "all_hits": False}
    assert [s["step"] for s in first["steps"]] == ["pass export_onnx", "target cpu"]
    code, out, err = cli("compile", recipe, "-o", tmp_path / "b", "--json")
    second = json.loads(out)
    assert code == 0 and second["cache"] == {"cached": 2, "ran": 0, "all_hits": True} and "all cache hits" in err
    assert second["bundle_id"] == first["bundle_id"] and second["metrics"]["validation"]["ort"] == "pass"
    # a parity gate that cannot hold: exit 5, the summary says so on stdout, no artifact at the destination
    code, out, _ = cli("-q", "compile", recipe, "-o", tmp_path / "c", "--json", "--set", "eval.parity.atol=1e-12")
    failed = json.loads(out)
    assert code == 5 and failed["ok"] is False and failed["exit_code"] == 5 and "validation failed" in failed["error"]
    assert not (tmp_path / "c").exists()


def test_the_ci_example_workflow_runs_commands_accelc_accepts():
    import shlex

    import yaml

    from accelc.cli import build_parser

    workflow = yaml.safe_load((Path(__file__).parents[1] / "examples/github-actions/compile.yml").read_text())
    commands = [step["run"] for step in workflow["jobs"]["compile"]["steps"] if "run" in step]
    accelc = [shlex.split(c.split(">")[0]) for c in commands if c.startswith("accelc ")]
    assert [a[1] for a in accelc] == ["compile", "verify"]
    for argv in accelc:
        build_parser().parse_args(argv[1:])  # an option the CLI lost would exit 2 here
    assert "--json" in accelc[0]


def test_deploy_profile_ships_what_its_backends_read_after_proving_against_torch(cli, tiny_recipe, tmp_path):
    dev, deploy = tmp_path / "dev", tmp_path / "deploy"
    recipe = tiny_recipe()
    assert cli("-q", "compile", recipe, "-o", dev)[0] == 0
    assert cli("-q", "compile", recipe, "-o", deploy, "--set", "output.profile=deploy")[0] == 0
    manifest = json.loads((deploy / "manifest.json").read_text())
    dropped = manifest["model_of_record"]["files"]
    assert manifest["profile"] == "deploy" and manifest["metrics"]["validation"] == {"torch": "pass", "ort": "pass"}
    assert "model/hf/model.safetensors" in dropped and not (deploy / "model/hf/model.safetensors").exists()
    assert (
        dropped["model/hf/model.safetensors"]
        == json.loads((dev / "manifest.json").read_text())["files"]["model/hf/model.safetensors"]
    )  # the model of record, identified by the same size and sha256 the dev artifact ships
    assert not any(f.endswith(".safetensors") for f in manifest["files"])
    code, out, err = cli("run", deploy, "--prompt", "hello", "--max-new-tokens", 3, "--raw", "--show-tokens")
    assert code == 0, err
    code, _, err = cli("run", deploy, "--prompt", "hello", "--backend", "torch")
    assert code == 2 and "ships no torch weights" in err and "available: ort" in err
    code, out, _ = cli("inspect", deploy)
    graph = sum(manifest["files"][f"model/onnx/decoder.onnx{suffix}"]["bytes"] for suffix in ("", ".data"))
    assert code == 0 and f"model {graph / 2**20:.1f} MiB" in out and "profile   deploy" in out
    total = sum(f["bytes"] for f in manifest["files"].values())
    assert total < 1.2 * graph  # the weights its backend needs, and little else
