"""The artifact directory: assembled in a temporary sibling, renamed into place when complete.

A failed compile never leaves a half-written artifact and never destroys the previous one: the
new tree is built in `.<name>.tmp-<pid>` next to the destination; on success the old artifact
(if any) is moved aside, the new one renamed into place, and the old one deleted. A compile that
fails validation keeps its tree as `<name>.rejected` so the reports can be read.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import shutil
import tempfile
from importlib import metadata
from pathlib import Path

from accelc import __version__
from accelc.errors import UsageError
from accelc.fileutil import link_or_copy, remove, sha256_file

SCHEMA_VERSION = 1
DEPENDENCIES = (
    "torch",
    "transformers",
    "optimum",
    "optimum-onnx",
    "onnx",
    "onnxruntime",
    "onnxscript",
    "apache-tvm",
    "numpy",
    "pydantic",
    "safetensors",
    "tokenizers",
)


def artifact_relative(path: str | os.PathLike, root: str | os.PathLike) -> str:
    """`path` as reports and the manifest record it: relative to the artifact `root` when inside it.

    During a compile the artifact lives in a temporary sibling that is renamed when complete, so
    an absolute path into it names a folder that is gone afterwards; a relative one stays true.
    Paths outside the artifact (a source checkpoint, a cache) are returned unchanged.
    """
    resolved, base = Path(path).resolve(), Path(root).resolve()
    if resolved == base or base in resolved.parents:
        return resolved.relative_to(base).as_posix() or "."
    return str(path)


def dependency_versions() -> dict[str, str | None]:
    out = {}
    for name in DEPENDENCIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def check_writable(out: Path) -> None:
    """Fail before any work if the output cannot be created (exit 2, nothing touched).

    Permission bits say nothing for root and nothing about read-only mounts, so this creates
    and removes a probe file in the nearest existing ancestor instead of asking os.access.
    """
    out = out.absolute()
    if out.exists() and not out.is_dir():
        raise UsageError(f"output path {out} exists and is not a directory")
    probe = out.parent
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise UsageError(f"output directory {out} cannot be created: {probe} is not a directory")
    try:
        fd, name = tempfile.mkstemp(prefix=".accelc-probe-", dir=probe)
        os.close(fd)
        os.unlink(name)
    except OSError as exc:
        raise UsageError(f"output directory {out} is not writable ({probe}: {exc.strerror})") from None


class ArtifactWriter:
    def __init__(self, out: Path):
        self.out = out.absolute()
        check_writable(self.out)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.out.parent / f".{self.out.name}.tmp-{os.getpid()}"
        remove(self.tmp)
        self.tmp.mkdir()

    def place(self, src: Path, rel: str, link: bool = True) -> Path:
        """Put a file or folder into the artifact: hard-linked from the cache, copied otherwise."""
        dst = self.tmp / rel
        if link:
            link_or_copy(src, dst)
        else:
            dst.parent.mkdir(parents=True, exist_ok=True)
            (shutil.copytree if src.is_dir() else shutil.copy2)(src, dst)
        return dst

    def write_json(self, rel: str, data) -> Path:
        path = self.tmp / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, indent=2, default=str))
        return path

    def file_table(self) -> dict[str, dict]:
        table = {}
        for path in sorted(p for p in self.tmp.rglob("*") if p.is_file() and p.name != "manifest.json"):
            table[str(path.relative_to(self.tmp))] = {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
        return table

    def commit(self) -> Path:
        old = self.out.parent / f".{self.out.name}.old-{os.getpid()}"
        if self.out.exists():
            os.replace(self.out, old)
        os.replace(self.tmp, self.out)
        remove(old)
        return self.out

    def reject(self) -> Path:
        rejected = self.out.parent / f"{self.out.name}.rejected"
        remove(rejected)
        os.replace(self.tmp, rejected)
        return rejected

    def abort(self) -> None:
        remove(self.tmp)


def base_manifest() -> dict:
    return {
        "schema_version": SCHEMA_VERSION,
        "accelc_version": __version__,
        "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "host": {"machine": platform.machine(), "python": platform.python_version(), "cpu_count": os.cpu_count()},
        "dependencies": dependency_versions(),
    }
