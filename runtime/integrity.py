"""Artifact integrity: each file the runtime opens is checked against the manifest's sha256.

The manifest's `files` table (compiler/artifacts.py `ArtifactWriter.file_table`) records every
artifact file's `bytes` and `sha256`. A damaged file (a bad copy, a truncated download, bytes
overwritten on disk) otherwise surfaces as whatever its reader throws ("InvalidProtobuf", a
segfault in a TVM library); here it is refused up front with its name and `accelc verify`.

Damage is a user-fixable input problem (recompile or restore the artifact), so it is a
UsageError and exits 2, like every other bad input (README, exit codes); `accelc verify` lists
the damaged files, and scripts that need to tell damage apart read its output.

A warm start must not re-hash gigabytes: a file once hashed is remembered in one small JSON file
under the asset cache root (accelc/assets.py `cache_root()`), keyed by its real path, inode,
size and mtime_ns. It lives there and not beside the artifact because the runtime never writes
into an artifact (it may be read-only, shared, or checked by `verify` itself). A size that
differs from the manifest's fails without hashing. This guards against accidents, not against
someone who rewrites a file and restores its mtime: `accelc verify` always re-hashes.

Files the manifest does not list (artifacts written before manifests had `files`, or new files)
are opened as before. `reports/` is informational: `accelc bench` rewrites reports/bench.json and
its plot after the manifest was written, and the runtime never reads them.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from accelc.errors import UsageError
from accelc.fileutil import sha256_file
from accelc.progress import bar

MANIFEST = "manifest.json"
REPORTS = "reports"  # rewritten by `accelc bench` after compile: never corruption
CACHE_PARTS = ("integrity", "sha256.json")
CACHE_SCHEMA = 1
# A file modified again within the same timestamp tick after it was hashed would keep its mtime;
# like git's "racy clean" rule, a file whose mtime is this recent is hashed but not remembered.
RACY_SECONDS = 1.0
# Files above this many bytes in total get a progress bar while they are hashed.
BAR_BYTES = 64 << 20

# Files hashed by this process (real path -> times): how tests see that a warm start hashed nothing.
hashed: Counter[str] = Counter()


class CorruptArtifact(UsageError):
    """A file of an artifact is missing, or differs from the manifest's size or sha256 (exit 2)."""


@dataclass(frozen=True)
class Finding:
    """One file that differs from the manifest: `problem` is missing, truncated (size differs),
    changed (sha256 differs) or unexpected (on disk, not in the manifest)."""

    rel: str
    problem: str
    detail: str

    @property
    def informational(self) -> bool:
        """Whether the runtime never reads it (reports/) or it is only an extra file."""
        return self.rel.split("/", 1)[0] == REPORTS or self.problem == "unexpected"

    @property
    def label(self) -> str:
        if self.rel.split("/", 1)[0] == REPORTS:
            return {"unexpected": "added since compile", "missing": "removed since compile"}.get(
                self.problem, "rewritten since compile"
            )
        return self.problem


class HashCache:
    """(real path, inode, size, mtime_ns) -> sha256 of files already hashed, in one JSON file.

    Written atomically (a temporary sibling renamed over it); two processes writing at once can
    only lose each other's new entries, which costs a re-hash, never a wrong answer. A cache that
    cannot be read or written is treated as empty: integrity never depends on it."""

    def __init__(self, path: Path | None = None):
        if path is None:
            from accelc.assets import cache_root

            path = cache_root().joinpath(*CACHE_PARTS)
        self.path = path
        self._entries: dict[str, list] | None = None
        self._new: dict[str, list] = {}

    def _load(self) -> dict[str, list]:
        if self._entries is None:
            try:
                data = json.loads(self.path.read_text())
                self._entries = data["files"] if data.get("schema") == CACHE_SCHEMA else {}
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                self._entries = {}
        return self._entries

    @staticmethod
    def _identity(st: os.stat_result) -> list:
        return [st.st_ino, st.st_size, st.st_mtime_ns]

    def lookup(self, real: str, st: os.stat_result) -> str | None:
        entry = self._new.get(real) or self._load().get(real)
        if isinstance(entry, list) and len(entry) == 4 and entry[:3] == self._identity(st):
            return entry[3]
        return None

    def record(self, real: str, st: os.stat_result, sha256: str) -> None:
        if time.time() - st.st_mtime_ns / 1e9 >= RACY_SECONDS:
            self._new[real] = [*self._identity(st), sha256]

    def save(self) -> None:
        """Merge the new entries into the file on disk; drop entries of files that are gone."""
        if not self._new:
            return
        self._entries = None  # re-read: another process may have written since
        merged = {real: entry for real, entry in self._load().items() if os.path.exists(real)}
        merged.update(self._new)
        tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps({"schema": CACHE_SCHEMA, "files": merged}))
            os.replace(tmp, self.path)
        except OSError:  # a read-only cache only costs re-hashing next time
            tmp.unlink(missing_ok=True)
            return
        self._entries, self._new = merged, {}


class Integrity:
    """The manifest's file table of one artifact, checked file by file as the runtime opens them."""

    def __init__(self, root: Path, table: Mapping[str, Mapping] | None, cache: HashCache | None = None):
        self.root = Path(root)
        self.table = dict(table or {})
        self.cache = cache if cache is not None else HashCache()
        self._checked: set[str] = set()

    @property
    def recorded(self) -> bool:
        """Whether the manifest has a file table (artifacts of older accelc versions do not)."""
        return bool(self.table)

    def entries(self, paths: Iterable[str | os.PathLike]) -> list[str]:
        """The manifest's files at or under each of `paths` (absolute or artifact-relative)."""
        out = []
        root = self.root.absolute()
        for path in paths:
            path = Path(path)
            try:
                rel = (path.absolute().relative_to(root) if path.is_absolute() else path).as_posix()
            except ValueError:
                continue  # outside the artifact: nothing recorded for it
            out += [r for r in self.table if r == rel or r.startswith(rel.rstrip("/") + "/")]
        return sorted(set(out))

    def require(self, *paths: str | os.PathLike) -> None:
        """Refuse (CorruptArtifact, exit 2) a missing or damaged manifest file at or under `paths`;
        each file is checked once per Artifact, hashed only when the cache does not know it."""
        todo = [rel for rel in self.entries(paths) if rel not in self._checked]
        try:
            for rel, finding in self._check(todo, trust_cache=True):
                if finding is not None:
                    raise CorruptArtifact(
                        f"{finding.detail}: the artifact is damaged; run `accelc verify {self.root}` "
                        "to list every damaged file, then recompile it or restore it from a copy"
                    )
                self._checked.add(rel)
        finally:
            self.cache.save()

    def scan(self, *, trust_cache: bool) -> list[Finding]:
        """Every file of the manifest checked, plus files on disk it does not list; `trust_cache`
        False re-hashes everything (`accelc verify`)."""
        try:
            found = [f for _, f in self._check(sorted(self.table), trust_cache=trust_cache) if f is not None]
        finally:
            self.cache.save()
        on_disk = (p.relative_to(self.root).as_posix() for p in self.root.rglob("*") if p.is_file())
        for rel in sorted(set(on_disk) - set(self.table) - {MANIFEST}):
            found.append(Finding(rel, "unexpected", f"{self.root / rel} is not in the manifest"))
        return found

    def _check(self, rels: list[str], *, trust_cache: bool):
        """(rel, Finding or None) for each of `rels`, sizes first so a truncation fails unhashed."""
        pending = []
        for rel in rels:
            path, want = self.root / rel, self.table[rel]
            try:
                st = path.stat()
            except OSError:
                yield rel, Finding(rel, "missing", f"{path} is missing (the manifest lists {want['bytes']} bytes)")
                continue
            if st.st_size != want["bytes"]:
                yield (
                    rel,
                    Finding(rel, "truncated", f"{path} is {st.st_size} bytes where the manifest says {want['bytes']}"),
                )
                continue
            real = os.path.realpath(path)
            known = self.cache.lookup(real, st) if trust_cache else None
            if known is not None:
                yield rel, self._compare(rel, known)
            else:
                pending.append((rel, path, real, st))
        total = sum(st.st_size for *_, st in pending)
        small = {} if total > BAR_BYTES else {"disable": True}
        with bar(total=total, unit="B", unit_scale=True, desc="sha256", **small) as b:
            for rel, path, real, st in pending:
                sha = sha256_file(path, progress=b.update)
                hashed[real] += 1
                self.cache.record(real, st, sha)
                yield rel, self._compare(rel, sha)

    def _compare(self, rel: str, sha: str) -> Finding | None:
        want = self.table[rel]["sha256"]
        if sha == want:
            return None
        return Finding(
            rel,
            "changed",
            f"{self.root / rel} fails its manifest checksum (sha256 {sha[:12]}..., expected {want[:12]}...)",
        )


def remember(root: Path, table: Mapping[str, Mapping]) -> None:
    """Record the checksums a compile just computed for the files of the artifact at `root`, so
    the first run after a compile does not hash them again (files written within the last
    second stay unrecorded, as HashCache.record says)."""
    cache = HashCache()
    for rel, entry in table.items():
        path = root / rel
        try:
            st = path.stat()
        except OSError:
            continue
        if st.st_size == entry.get("bytes"):
            cache.record(os.path.realpath(path), st, entry["sha256"])
    cache.save()
