"""Keep torch out of a process that decodes on a backend other than torch.

transformers 4.57 imports torch at `import transformers` whenever torch is installed, and a
causal LM's tokenizer comes from transformers: an `accelc serve` process on ORT held 416 MB
resident, 147 MB with torch kept out (SmolLM2's 4-bit artifact; docs/peers.md). ORT, OpenVINO
and TVM never call torch, nor do the tokenizers, so such a process sets transformers' own switch,
USE_TORCH=0, before transformers is first imported. A process that already imported it (a
compile, a test session, the torch backend) keeps torch; an explicit USE_TORCH is respected.
The variable is inherited by the worker processes the command starts, which decode on the same
backend.
"""

from __future__ import annotations

import os
import sys


def keep_torch_out(backend: str) -> bool:
    """Before transformers' first import, for a backend that is not torch: turn its torch off.
    Returns whether torch stays out of this process."""
    if backend != "torch" and "transformers" not in sys.modules and "torch" not in sys.modules:
        os.environ.setdefault("USE_TORCH", "0")
        # its import would otherwise advise that "models won't be available", which is the point
        os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    return os.environ.get("USE_TORCH") == "0" and "torch" not in sys.modules
