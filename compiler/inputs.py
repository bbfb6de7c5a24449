"""The recipe inputs a pass or target declares in `reads`: the view it gets, and what its cache key holds.

A step's output depends on its parameters and on the recipe sections it reads (the calibration
text, the decode section). The step cache keys on both, so changing either reruns the step; and
the step sees the recipe only through `DeclaredView`, so reading a section it did not declare
fails loudly instead of leaving a stale cache entry behind.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel

from accelc.errors import InternalError, UsageError
from accelc.fileutil import sha256_file


class UndeclaredInput(InternalError):
    """A pass or target read a recipe input it does not list in `reads`: a bug in that step."""


def _covers(reads: tuple[str, ...], path: str) -> bool:
    """Whether `path` is a declared input or lies inside one."""
    return any(path == r or path.startswith(r + ".") for r in reads)


def _leads_to(reads: tuple[str, ...], path: str) -> bool:
    """Whether `path` is a section holding a declared input (`data` for `data.calibration`)."""
    return any(r.startswith(path + ".") for r in reads)


class DeclaredView:
    """The recipe as a step may read it: declared inputs and the sections on the way to them."""

    def __init__(self, obj: Any, reads: tuple[str, ...], step: str, prefix: str = ""):
        self._obj, self._reads, self._step, self._prefix = obj, reads, step, prefix

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        path = f"{self._prefix}{name}"
        if _covers(self._reads, path):
            return getattr(self._obj, name)
        if _leads_to(self._reads, path):
            return DeclaredView(getattr(self._obj, name), self._reads, self._step, path + ".")
        raise UndeclaredInput(
            f"{self._step} read the recipe's '{path}' without declaring it: add it to the class's "
            f"`reads` {self._reads} so that it is part of the step's cache key"
        )


def lookup(recipe, path: str) -> Any:
    value = recipe
    for part in path.split("."):
        value = getattr(value, part)
    return value


def content_identity(path: Path) -> dict[str, Any]:
    """What a file or folder holds, for a cache key: the sha256 of each file (a folder's, by name)."""

    if path.is_file():
        return {"sha256": sha256_file(path)}
    if path.is_dir():
        return {"files": {p.name: sha256_file(p) for p in sorted(path.iterdir()) if p.is_file()}}
    raise UsageError(f"{path} does not exist")


def fingerprint(recipe, reads: tuple[str, ...]) -> dict[str, Any]:
    """The declared inputs' values as the cache key holds them: texts by identity (a file by its
    content), sections as plain data."""
    from accelc.data import text_identity

    out = {}
    for path in reads:
        value = lookup(recipe, path)
        if path.startswith("data."):  # a text, or a mixture of texts
            out[path] = text_identity(value)
        elif isinstance(value, BaseModel):
            out[path] = value.model_dump(mode="json")
        else:
            out[path] = value
    return out
