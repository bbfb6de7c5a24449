"""Every input given at run time is checked where it enters: exit 2 and one line naming the
input, the limit and the fix (issue 22), never an internal error from deep inside a backend."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import TINY_RECIPE, write_recipe

CONTEXT = 512  # families/tiny.py: every tiny model's max_position_embeddings / n_positions


def one_line_usage_error(code: int, err: str) -> str:
    """The one error line of an exit-2 refusal (and nothing that looks like a bug)."""
    errors = [line for line in err.splitlines() if line.startswith("accelc: error:")]
    assert code == 2, err
    assert len(errors) == 1 and "Traceback" not in err and "internal error" not in err, err
    return errors[0]


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    """One tiny-llama artifact (ORT and torch) shared by the run, bench and eval cases."""
    from accelc.cli import main

    root = tmp_path_factory.mktemp("run_inputs")
    body = TINY_RECIPE.format(model="tiny-llama", backends="[ort]", cache=root / "cache")
    assert main(["-q", "compile", str(write_recipe(root, body)), "-o", str(root / "art")]) == 0
    return root / "art"


# --------------------------------------------------------------------------- accelc run


def test_the_context_length_is_the_artifact_models(artifact):
    from accelc.families.causal_lm import _builtin_dir
    from accelc.runtime.artifact import Artifact
    from accelc.runtime.limits import context_length

    assert Artifact(artifact).context_length == CONTEXT
    # GPT-2 names it n_positions; a folder without a config (an ONNX-graph artifact) has none
    assert context_length([_builtin_dir("tiny-gpt2")]) == CONTEXT
    assert context_length([artifact / "no-such-folder"]) is None


@pytest.mark.parametrize("value", ["0", "-5"])
def test_max_new_tokens_below_one(cli, artifact, value):
    line = one_line_usage_error(*cli("-q", "run", artifact, "--prompt", "hi", "--max-new-tokens", value)[::2])
    assert f"--max-new-tokens {value}" in line and "minimum 1" in line


@pytest.mark.parametrize("value", ["-0.5", "nan", "inf"])
def test_temperature_negative_or_not_finite(cli, artifact, value):
    line = one_line_usage_error(*cli("-q", "run", artifact, "--prompt", "hi", "--temperature", value)[::2])
    assert "--temperature" in line and "0 (greedy) or a positive number" in line


def test_empty_prompt(cli, artifact):
    line = one_line_usage_error(*cli("-q", "run", artifact, "--raw", "--prompt", "")[::2])
    assert "prompt is empty" in line


def test_prompt_plus_generation_past_the_context(cli, artifact):
    # the byte-level tiny tokenizer makes one token of each ASCII character
    prompt = "w" * 500
    code, out, err = cli("-q", "run", artifact, "--raw", "--prompt", prompt, "--max-new-tokens", "12", "--show-tokens")
    assert code == 0, err  # 500 + 12 = the context exactly: allowed
    assert len(json.loads(out.splitlines()[-1])) == 12
    code, _, err = cli("-q", "run", artifact, "--raw", "--prompt", prompt, "--max-new-tokens", "13")
    line = one_line_usage_error(code, err)
    assert "the prompt (500 tokens) plus --max-new-tokens 13 needs 513 positions" in line
    assert f"context length {CONTEXT}" in line and "--max-new-tokens to at most 12" in line
    # a prompt longer than the context alone (it died inside GroupQueryAttention before)
    line = one_line_usage_error(*cli("-q", "run", artifact, "--raw", "--prompt", "word " * 200)[::2])
    assert "the prompt (1000 tokens)" in line and "shorten the prompt to at most" in line


# --------------------------------------------------------------------------- accelc bench


@pytest.mark.parametrize(("option", "value"), [("--repeats", "0"), ("--prompt-tokens", "-1"), ("--new-tokens", "0")])
def test_bench_counts_below_one(cli, artifact, option, value):
    line = one_line_usage_error(*cli("-q", "bench", artifact, option, value)[::2])
    assert f"{option} {value} is below its minimum 1" in line


def test_bench_unknown_backend_lists_the_artifacts(cli, artifact):
    line = one_line_usage_error(*cli("-q", "bench", artifact, "--backends", "ort", "nope", "--repeats", "1")[::2])
    assert "--backends nope" in line and "torch, ort" in line


def test_bench_lengths_past_the_context(cli, artifact, tmp_path):
    args = ("-q", "bench", artifact, "--prompt-tokens", "500", "--new-tokens", "13", "--json", tmp_path / "b.json")
    line = one_line_usage_error(*cli(*args)[::2])
    assert "prompt_tokens 500 plus new_tokens 13 needs 513 positions" in line and f"length {CONTEXT}" in line
    assert not (tmp_path / "b.json").exists()


# --------------------------------------------------------------------------- accelc eval


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text("It is a truth universally acknowledged. " * 40)  # 1,600 byte tokens
    return path


@pytest.mark.parametrize(
    ("option", "value", "minimum"), [("--window", "1", 2), ("--stride", "0", 1), ("--max-windows", "-1", 1)]
)
def test_eval_counts_below_their_minimum(cli, artifact, text_file, option, value, minimum):
    line = one_line_usage_error(*cli("-q", "eval", artifact, "--text", text_file, option, value)[::2])
    assert f"{option} {value} is below its minimum {minimum}" in line


def test_eval_window_past_the_context(cli, artifact, text_file):
    line = one_line_usage_error(*cli("-q", "eval", artifact, "--text", text_file, "--window", "513")[::2])
    assert "window of 513 tokens" in line and f"--window {CONTEXT} or less" in line
    code, out, err = cli("-q", "eval", artifact, "--text", text_file, "--window", "512", "--max-windows", "1")
    assert code == 0, err
    assert set(json.loads(out)["backends"]) == {"torch", "ort"}


def test_eval_unknown_backend(cli, artifact, text_file):
    line = one_line_usage_error(*cli("-q", "eval", artifact, "--text", text_file, "--backends", "tvm")[::2])
    assert "--backends tvm: not a backend of this artifact" in line and "torch, ort" in line


def test_eval_text_missing_not_utf8_or_short(cli, artifact, tmp_path):
    line = one_line_usage_error(*cli("-q", "eval", artifact, "--text", tmp_path / "absent.txt")[::2])
    assert "absent.txt" in line and "no such file" in line
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\xff\xfe\x00" + bytes(range(256)))
    line = one_line_usage_error(*cli("-q", "eval", artifact, "--text", binary)[::2])
    assert "binary.txt is not UTF-8 text" in line
    short = tmp_path / "short.txt"
    short.write_text("too short")
    line = one_line_usage_error(*cli("-q", "eval", artifact, "--text", short, "--window", "16")[::2])
    assert "shorter than one window: it has 9 tokens, a window needs 16" in line and "smaller window" in line


# --------------------------------------------------------------------------- model files at ingest


def model_recipe(tmp_path, path, steps=""):
    return write_recipe(
        tmp_path,
        f"model:\n  path: {path}\n{steps}targets:\n  - kind: cpu\n    backends: [ort]\n"
        f"cache:\n  dir: {tmp_path / 'cache'}\n",
    )


def test_random_bytes_named_onnx(cli, tmp_path):
    fake = tmp_path / "model.onnx"
    fake.write_bytes(np.random.default_rng(0).bytes(100))
    recipe = model_recipe(tmp_path, fake)
    for command in (("validate", recipe), ("compile", recipe, "-o", tmp_path / "out")):
        line = one_line_usage_error(*cli("-q", *command)[::2])
        assert "model.onnx: not a valid ONNX model" in line
    assert not (tmp_path / "out").exists()
    fake.write_bytes(b"")  # parses as an empty ModelProto: no graph at all
    assert "no IR version, opset or graph nodes" in one_line_usage_error(*cli("-q", "validate", recipe)[::2])


def test_truncated_gguf_is_named(cli, tmp_path):
    gguf = pytest.importorskip("gguf")
    path = tmp_path / "model.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tensor("token_embd.weight", np.ones((64, 32), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    path.write_bytes(path.read_bytes()[:-100])
    recipe = model_recipe(tmp_path, path, "passes:\n  - type: export_onnx\n")
    for command in (("validate", recipe), ("compile", recipe, "-o", tmp_path / "out")):
        line = one_line_usage_error(*cli("-q", *command)[::2])
        assert "model.gguf is" in line and "GGUF file" in line


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ([1, 2], 'is not a model config (no "model_type")'),
        ({"hidden_size": 64}, 'is not a model config (no "model_type")'),
        ({"model_type": "no-such-architecture"}, "transformers cannot read this model config"),
        ({"model_type": "llama", "max_position_embeddings": 0}, "max_position_embeddings is 0"),
    ],
)
def test_checkpoint_config_that_is_not_a_model_config(cli, tmp_path, config, expected):
    from accelc.families.causal_lm import _builtin_dir

    folder = tmp_path / "checkpoint"
    folder.mkdir()
    for f in _builtin_dir("tiny-llama").iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    (folder / "config.json").write_text(json.dumps(config))
    recipe = model_recipe(tmp_path, folder, "passes:\n  - type: export_onnx\n")
    for command in (("validate", recipe), ("compile", recipe, "-o", tmp_path / "out")):
        line = one_line_usage_error(*cli("-q", *command)[::2])
        assert "checkpoint/config.json" in line and expected in line


def test_a_usage_error_is_one_line_with_exit_2():
    """argparse's own refusals (a word for a count, an unknown backend) read like every other
    input error: one line naming the input, exit 2, no usage dump."""
    import subprocess
    import sys

    for args in (["--max-new-tokens", "many"], ["--backend", "cuda"]):
        done = subprocess.run(
            [sys.executable, "-m", "accelc", "run", "art", "--prompt", "hi", *args], capture_output=True, text=True
        )
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2 and len(lines) == 1 and args[0] in lines[0] and "accelc run --help" in lines[0]


def test_eval_over_several_texts_reports_each_and_gates_on_the_worst(cli, artifact, text_file, tmp_path):
    other = tmp_path / "other.txt"
    other.write_text("Section 1. Definitions. " * 300)  # another domain than text_file's
    args = ("-q", "eval", artifact, "--text", text_file, "--text", other, "--window", "64", "--max-windows", "2")
    code, out, err = cli(*args)
    result = json.loads(out)
    assert code == 0, err
    assert set(result["texts"]) == {str(text_file), str(other)}
    assert all(set(r["backends"]) == {"torch", "ort"} for r in result["texts"].values())
    assert result["worst_ratio"] == max(result["ratios"].values()) and result["ok"] is True
    assert result["ratios"][result["worst_text"]] == result["worst_ratio"]


def test_across_texts_gates_a_pruned_model_on_its_worst_text():
    from accelc.compiler.evaluation import across_texts

    def pruned(ratio: float, ok: bool) -> dict:
        failure = None if ok else f"perplexity of the pruned model is {ratio}x the source model's"
        return {"backends": {"torch": {"ratio_vs_source": ratio, "ratio_vs_torch": 1.0}}, "ok": ok, "failure": failure}

    result = across_texts({"austen:persuasion": pruned(1.2, True), "legal.txt": pruned(1.9, False)})
    assert result["worst_text"] == "legal.txt" and result["worst_ratio"] == 1.9
    assert result["ok"] is False and result["failure"].startswith("legal.txt: perplexity of the pruned model")
