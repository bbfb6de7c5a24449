"""Shared fixtures: tiny recipes, an isolated pass cache, and the CLI called in-process."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest

# Spinning thread pools on a shared 2-core machine make everything crawl (docs/platform-notes.md section 4).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]


def _bind_transformers_logging_now():
    """transformers creates its one log handler on first use, bound to the sys.stderr of that
    moment; if that is a test's capsys stream, later warnings hit a closed file. Bind it to the
    session's stream instead."""
    from transformers.utils import logging as hf_logging

    hf_logging.get_logger("transformers")


_bind_transformers_logging_now()


def write_recipe(directory: Path, body: str, name: str = "recipe.yaml") -> Path:
    path = directory / name
    path.write_text(textwrap.dedent(body).lstrip())
    return path


TINY_RECIPE = """
version: 1
model:
  builtin: {model}
passes:
  - type: export_onnx
targets:
  - kind: cpu
    backends: {backends}
eval:
  parity:
    greedy_tokens: 8
    decode_steps: 3
  perplexity:
    enabled: false
  bench:
    enabled: false
cache:
  dir: {cache}
"""


@pytest.fixture
def tiny_recipe(tmp_path):
    """A factory: tiny_recipe(model="tiny-llama", backends="[ort]") -> recipe path in tmp_path."""

    def make(model: str = "tiny-llama", backends: str = "[ort]", extra: str = "") -> Path:
        body = TINY_RECIPE.format(model=model, backends=backends, cache=tmp_path / "cache") + textwrap.dedent(extra)
        return write_recipe(tmp_path, body)

    return make


@pytest.fixture
def cli(capsys):
    """Run `accelc ARGS` in-process; return (exit code, stdout, stderr)."""
    from accelc.cli import main

    def run(*args: str):
        code = main([str(a) for a in args])
        out, err = capsys.readouterr()
        return code, out, err

    return run


@pytest.fixture(scope="module")
def one_torch_thread():
    """torch on one thread for a module's tiny models (thread start-up costs more than they compute)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
