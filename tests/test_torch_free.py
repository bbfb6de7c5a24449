"""A process that decodes on a backend other than torch keeps torch out (runtime/torch_free.py)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

PROBE = """
import sys
from accelc.runtime.torch_free import keep_torch_out
out = keep_torch_out(sys.argv[1])
from transformers import PreTrainedTokenizerFast  # what a causal LM's tokenizer needs
print(out, "torch" in sys.modules)
"""


@pytest.mark.parametrize(("backend", "expected"), [("ort", "True False"), ("torch", "False True")])
def test_transformers_loads_without_torch_unless_the_backend_is_torch(backend, expected):
    env = {k: v for k, v in os.environ.items() if k != "USE_TORCH"}
    done = subprocess.run(
        [sys.executable, "-c", PROBE, backend], env=env, capture_output=True, text=True, timeout=120, check=True
    )
    assert done.stdout.split("\n")[-2] == expected


def test_a_process_that_already_has_transformers_is_left_alone(monkeypatch):
    import transformers  # noqa: F401  (conftest imported it already: a test session keeps torch)

    from accelc.runtime.torch_free import keep_torch_out

    monkeypatch.delenv("USE_TORCH", raising=False)
    assert keep_torch_out("ort") is False and "USE_TORCH" not in os.environ
