"""Perplexity of any StepModel on a text, with the protocol recorded next to the number.

A perplexity means nothing without its protocol (text, tokenizer, window, stride, tokens), and
token perplexities of models with different tokenizers do not compare, so the result also
carries bits per UTF-8 byte of the scored text. Backend agnostic: only `prefill` logits are
used, so torch is never imported here.
"""

from __future__ import annotations

import math
import time

import numpy as np

from accelc.data import token_windows
from accelc.errors import ValidationFailed
from accelc.runtime.base import StepModel

# Rows of logits converted to float64 at a time: bounds the temporary at
# ROWS_PER_CHUNK x vocab x 8 bytes (25 MB for a 49k vocabulary) instead of window x vocab x 8.
ROWS_PER_CHUNK = 64


def _scored_nll(logits: np.ndarray, targets: np.ndarray) -> float:
    """Sum over rows of -log softmax(logits[i])[targets[i]], in float64.

    logits [n, V] (row i predicts targets[i]), targets int64 [n].
    """
    total = 0.0
    for lo in range(0, len(targets), ROWS_PER_CHUNK):
        x = logits[lo : lo + ROWS_PER_CHUNK].astype(np.float64)  # [c, V]
        t = targets[lo : lo + ROWS_PER_CHUNK]  # [c]
        peak = x.max(axis=1)  # [c], for a stable logsumexp
        lse = peak + np.log(np.exp(x - peak[:, None]).sum(axis=1))
        total += float((lse - x[np.arange(len(t)), t]).sum())
    return total


def perplexity(
    step_model: StepModel,
    tokenizer,
    text: str,
    *,
    text_name: str,
    window: int = 512,
    stride: int = 512,
    max_windows: int | None = 8,
    progress: bool = True,
    tokenizer_name: str | None = None,
) -> dict:
    """Strided-window perplexity (see accelc.data.token_windows) of `step_model` on `text`.

    `tokenizer` is duck-typed like a Hugging Face tokenizer: `encode(text,
    add_special_tokens=False)`, `decode(ids, clean_up_tokenization_spaces=False)` and
    `name_or_path`. No BOS or other special token is added, so the text alone is scored.
    `tokenizer_name` is how the result names the tokenizer (default: its `name_or_path`).

    Returns the protocol and the result: text, tokenizer, window, stride, windows,
    tokens_scored, nll_mean (nats per token), ppl, bits_per_byte (total NLL in bits over the
    UTF-8 bytes of the decoded scored tokens), bytes_scored, backend, seconds (wall time of the
    whole evaluation, tokenising included).
    """
    from accelc.progress import bar as progress_bar

    start = time.perf_counter()
    ids = np.asarray(tokenizer.encode(text, add_special_tokens=False), dtype=np.int64)
    windows = token_windows(ids, window, stride, max_windows, what=f"text '{text_name}'")

    total_nll = 0.0
    runs: list[list[int]] = []  # [start, end) of the scored tokens in `ids`, adjacent ones merged
    bar = progress_bar(
        windows, desc=f"perplexity {text_name}", unit="window", **({} if progress else {"disable": True})
    )
    for k, (win, n) in enumerate(bar):
        logits, _ = step_model.prefill(win)  # [window, V]
        logits = np.asarray(logits)
        if logits.ndim != 2 or logits.shape[0] != len(win):
            raise ValidationFailed(
                f"backend '{step_model.name}' returned logits of shape {logits.shape} for {len(win)} tokens"
            )
        # Row i predicts token i + 1, so the last n tokens are predicted by rows [-n-1, -1).
        window_nll = _scored_nll(logits[len(win) - n - 1 : len(win) - 1], win[len(win) - n :])
        if not math.isfinite(window_nll):
            raise ValidationFailed(
                f"backend '{step_model.name}' produced non-finite logits in window {k} of '{text_name}'"
            )
        total_nll += window_nll
        end = k * stride + len(win)
        if runs and runs[-1][1] == end - n:
            runs[-1][1] = end
        else:
            runs.append([end - n, end])

    # Decoding each contiguous run of scored tokens at once (one run when stride < window)
    # avoids splitting multi-byte characters between tokens, which would miscount bytes.
    n_bytes = sum(
        len(tokenizer.decode(ids[a:b].tolist(), clean_up_tokenization_spaces=False).encode("utf-8")) for a, b in runs
    )
    n_scored = sum(b - a for a, b in runs)
    nll_mean = total_nll / n_scored
    return {
        "text": text_name,
        "tokenizer": tokenizer_name or getattr(tokenizer, "name_or_path", type(tokenizer).__name__),
        "window": window,
        "stride": stride,
        "windows": len(windows),
        "tokens_scored": n_scored,
        "nll_mean": nll_mean,
        "ppl": math.exp(nll_mean),
        "bits_per_byte": total_nll / math.log(2) / n_bytes if n_bytes else float("nan"),
        "bytes_scored": n_bytes,
        "backend": step_model.name,
        "seconds": time.perf_counter() - start,
    }


def across_texts(results: dict[str, dict]) -> dict:
    """`accelc eval --text A --text B ...`: each text's evaluation (Family.evaluate), and the worst
    text by the ratio that gates a changed model (`ratio_vs_source` of its torch model, a pruned
    model's cost over its source's), else by the backends' ratio to torch. The verdict is every
    text's: a gate such as `max_ratio_vs_source` holds on the worst text, not on an average."""

    def ratio(result: dict) -> float | None:
        torch = result.get("backends", {}).get("torch", {})
        if "ratio_vs_source" in torch:
            return torch["ratio_vs_source"]
        ratios = [r["ratio_vs_torch"] for r in result.get("backends", {}).values() if "ratio_vs_torch" in r]
        return max(ratios) if ratios else None

    scored = {text: ratio(r) for text, r in results.items() if ratio(r) is not None}
    worst = max(scored, key=scored.get) if scored else None
    failures = [f"{text}: {r['failure']}" for text, r in results.items() if not r["ok"]]
    return {
        "texts": results,
        "ratios": scored,
        "worst_text": worst,
        "worst_ratio": scored.get(worst),
        "ok": not failures,
        "failure": "; ".join(failures) or None,
    }
