"""Bad input gets one clear message and the documented exit code, and loses nothing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from conftest import REPO, write_recipe


def model_recipe(tmp_path, path, extra=""):
    return write_recipe(
        tmp_path,
        f"model:\n  path: {path}\npasses:\n  - type: export_onnx\n"
        f"targets:\n  - kind: cpu\n    backends: [ort]\ncache:\n  dir: {tmp_path / 'cache'}\n" + extra,
    )


def test_missing_model_path(cli, tmp_path):
    code, _, err = cli("compile", model_recipe(tmp_path, tmp_path / "nowhere"), "-o", tmp_path / "out")
    assert code == 2 and "does not exist" in err and "Traceback" not in err


def test_truncated_safetensors(cli, tmp_path):
    from accelc.families.causal_lm import _builtin_dir

    src = _builtin_dir("tiny-llama")
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in src.iterdir():
        data = f.read_bytes()
        (broken / f.name).write_bytes(data[: len(data) // 2] if f.suffix == ".safetensors" else data)
    code, _, err = cli("compile", model_recipe(tmp_path, broken), "-o", tmp_path / "out")
    assert code == 2 and "not a valid safetensors file" in err and "Traceback" not in err


def test_random_bytes_named_gguf(cli, tmp_path):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(os.urandom(4096))
    code, _, err = cli("compile", model_recipe(tmp_path, fake), "-o", tmp_path / "out")
    assert code == 2 and "model.gguf" in err and "Traceback" not in err


def test_folder_without_config(cli, tmp_path):
    (tmp_path / "empty").mkdir()
    code, _, err = cli("compile", model_recipe(tmp_path, tmp_path / "empty"), "-o", tmp_path / "out")
    assert code == 2 and "config.json" in err


def test_unwritable_output_dir(cli, tiny_recipe, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    code, _, err = cli("compile", tiny_recipe(), "-o", blocker / "out")
    assert code == 2 and "cannot be created" in err
    # a read-only mount: permission bits do not stop root, so the check must really try
    code, _, err = cli("compile", tiny_recipe(), "-o", "/proc/accelc-out")
    assert code == 2 and "not writable" in err


def test_quantize_without_export_is_a_usage_error(cli, tmp_path):
    recipe = write_recipe(
        tmp_path,
        f"model:\n  builtin: tiny-llama\npasses:\n  - type: quantize_dynamic_int8\n"
        f"cache:\n  dir: {tmp_path / 'cache'}\n",
    )
    code, _, err = cli("compile", recipe, "-o", tmp_path / "out")
    assert code == 2 and "export_onnx before it" in err


def test_failed_pass_exits_4_and_keeps_previous_artifact(cli, tiny_recipe, tmp_path):
    out = tmp_path / "out"
    code, _, _ = cli("compile", tiny_recipe(), "-o", out)
    assert code == 0
    before = (out / "manifest.json").read_text()
    # a real exporter failure: a masked LM has no text-generation-with-past export
    import torch
    from transformers import BertConfig, BertForMaskedLM

    from accelc.families.tiny import byte_tokenizer

    bert = tmp_path / "bert"
    torch.manual_seed(0)
    BertForMaskedLM(
        BertConfig(vocab_size=258, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    ).save_pretrained(bert)
    byte_tokenizer().save_pretrained(bert)
    code, _, err = cli("compile", model_recipe(tmp_path, bert), "-o", out)
    assert code == 4 and "'export_onnx' failed" in err.splitlines()[-1] and "Traceback" not in err
    assert (out / "manifest.json").read_text() == before
    assert not list(tmp_path.glob(".out.tmp-*"))


def test_interrupted_compile_keeps_artifact_and_resumes_from_cache(tiny_recipe, tmp_path):
    recipe = tiny_recipe(extra="")
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    first = subprocess.run(
        [sys.executable, "-m", "accelc", "compile", recipe, "-o", out, "--set", "eval.bench.enabled=false"],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
    )
    assert first.returncode == 0, first.stderr
    before = (out / "manifest.json").read_text()

    # second compile, with a long benchmark phase, interrupted once the pass and target are cached
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "accelc",
            "compile",
            recipe,
            "-o",
            out,
            "--set",
            "eval.bench.enabled=true",
            "--set",
            "eval.bench.repeats=20",
            "--set",
            "eval.bench.backends=[ort]",
        ],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        env=env,
        cwd=REPO,
    )
    seen = ""
    deadline = time.time() + 120
    while "bench" not in seen and time.time() < deadline:
        seen += proc.stderr.read(1)
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    rest = proc.stderr.read()
    assert proc.wait(timeout=60) == 130, seen + rest
    assert "interrupted" in rest and "Traceback" not in rest
    assert (out / "manifest.json").read_text() == before
    assert not list(tmp_path.glob(".out.tmp-*"))

    again = subprocess.run(
        [sys.executable, "-m", "accelc", "compile", recipe, "-o", out],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
    )
    assert again.returncode == 0, again.stderr
    assert "pass export_onnx: cached" in again.stderr and "target cpu: cached" in again.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert [p["status"] for p in manifest["passes"]] == ["cached"]
