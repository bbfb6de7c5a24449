"""Small filesystem helpers shared by the cache, the asset store and artifacts."""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Callable
from pathlib import Path

CHUNK = 1 << 22  # 4 MiB reads keep hashing of multi-GB artifacts at disk speed


def sha256_file(path: Path, progress: Callable[[int], object] | None = None) -> str:
    """The file's sha256; `progress` is called with each chunk's byte count (a tqdm bar's update)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
            if progress is not None:
                progress(len(chunk))
    return digest.hexdigest()


def link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link when src and dst share a filesystem (artifacts reuse cached GB-size graphs for
    free), copy otherwise. Cached files are never modified in place, so sharing inodes is safe."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if src.is_dir():
        for child in src.iterdir():
            link_or_copy(child, dst / child.name)
        return
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()
