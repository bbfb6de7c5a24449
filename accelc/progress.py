"""Progress reporting: status lines and timed steps on stderr, tqdm bars for loops.

Everything goes to stderr so that stdout stays machine-readable (`accelc inspect --json`).
"""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager

_quiet = False


def set_quiet(value: bool) -> None:
    global _quiet
    _quiet = value


def status(message: str) -> None:
    if not _quiet:
        print(f"[accelc] {message}", file=sys.stderr, flush=True)


@contextmanager
def step(message: str):
    """Announce a step, then report how long it took (or that it failed)."""
    status(f"{message} ...")
    start = time.perf_counter()
    ok = False
    try:
        yield
        ok = True
    finally:
        elapsed = time.perf_counter() - start
        status(f"{message}: {'done' if ok else 'FAILED'} in {elapsed:.1f}s")


def bar(iterable=None, **kwargs):
    from tqdm.auto import tqdm

    kwargs.setdefault("file", sys.stderr)
    kwargs.setdefault("leave", False)
    kwargs.setdefault("dynamic_ncols", True)
    kwargs.setdefault("disable", _quiet)
    return tqdm(iterable, **kwargs)
