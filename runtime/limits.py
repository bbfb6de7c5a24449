"""The limits a run-time input is checked against where it enters, each refusal one UsageError line
(exit 2) that names the input, the limit and the fix.

The one limit that belongs to the model is its context length: the positions its KV cache and
position tables hold. The fused ONNX graph's rotary tables are sized from the same config value
(compiler/fused_decoder.py `_rotary_caches`), and GPT-2's learned position table ends there, so a
longer sequence fails deep inside a backend (GroupQueryAttention's "cos_cache dimension 0 shall
not be less than total_sequence_length") instead of with a message the user can act on.
`check_context` is the one check `run`, `bench`, `eval` (and the HTTP server) make against it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from accelc.errors import UsageError

# The config keys Hugging Face architectures name their context length by (GPT-2 and GPT-J say
# n_positions, older GPT-2 configs n_ctx, a few remote-code models seq_length).
CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "n_ctx", "seq_length")


def context_length(checkpoints: list[Path]) -> int | None:
    """The context length of the torch checkpoints an artifact decodes with (target and draft):
    the smallest, since a speculative loop feeds the draft the same sequence as the target. None
    where no checkpoint names one (an opaque ONNX graph): nothing is checked then."""
    lengths = []
    for directory in checkpoints:
        path = directory / "config.json"
        if not path.exists():
            continue
        config = json.loads(path.read_text())
        value = next((config[k] for k in CONTEXT_KEYS if isinstance(config.get(k), int)), None)
        if value is not None:
            lengths.append(value)
    return min(lengths, default=None)


def check_context(context: int | None, positions: int, what: str, fix: str) -> None:
    """Refuse `what` (e.g. "the prompt (900 tokens) plus --max-new-tokens 32") when it needs more
    than the model's `context` positions; `fix` says what to change."""
    if context is not None and positions > context:
        raise UsageError(f"{what} needs {positions} positions, more than the model's context length {context}; {fix}")


def check_generation(context: int | None, prompt_tokens: int, new_tokens: int, new_option: str) -> None:
    """A prompt and the tokens to generate after it, against the context: `run`'s and the server's
    check (`new_option` names the input that sets the generation length)."""
    if prompt_tokens < 1:
        raise UsageError("the prompt is empty (0 tokens after encoding); give a prompt of at least one token")
    if context is None:
        return
    fixes = []
    if context - new_tokens >= 1:
        fixes.append(f"shorten the prompt to at most {context - new_tokens} tokens")
    if context - prompt_tokens >= 1:
        fixes.append(f"set {new_option} to at most {context - prompt_tokens}")
    check_context(
        context,
        prompt_tokens + new_tokens,
        f"the prompt ({prompt_tokens} tokens) plus {new_option} {new_tokens}",
        " or ".join(fixes) or f"shorten the prompt and lower {new_option} to {context} tokens together",
    )


def at_least(option: str, value: int | None, minimum: int = 1) -> int | None:
    """A count the user gave (`--repeats`, `--window`, ...), refused below `minimum`; None (not
    given) passes, so the artifact's or recipe's default applies."""
    if value is not None and value < minimum:
        raise UsageError(f"{option} {value} is below its minimum {minimum}; give {option} {minimum} or more")
    return value


def temperature(value: float | None) -> float | None:
    """A sampling temperature: 0 means greedy, above 0 samples; negative or non-finite is refused."""
    if value is not None and not (math.isfinite(value) and value >= 0):
        raise UsageError(f"--temperature {value} is not a temperature; give 0 (greedy) or a positive number")
    return value


def backends(option: str, names: list[str] | None, available) -> list[str] | None:
    """Backend names the user gave, each one the artifact has (a registered backend the artifact
    was not lowered for is as unusable as a misspelt one); None (not given) passes."""
    unknown = [name for name in names or [] if name not in available]
    if unknown:
        raise UsageError(
            f"{option} {' '.join(unknown)}: not a backend of this artifact; choose from {', '.join(available)}"
        )
    return names
