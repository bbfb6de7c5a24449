"""Shared pieces of the fuzz suite (issue 22, tests/test_fuzz_*.py): the Hypothesis profiles, the
contract every bad input is held to, digests that prove nothing was modified, file damage, and
the tiny artifact the run-time cases open.

Profiles: `ci` (the default) is derandomized, so a CI run is reproducible and a failure reruns
as it failed, and skips shrinking, so a strict xfail costs one search, not a minimisation.
`ACCELC_FUZZ_PROFILE=explore ACCELC_FUZZ_SCALE=10` searches randomly, ten times as long, and
shrinks what it finds.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

from hypothesis import HealthCheck, Phase, settings

_QUIET_CHECKS = [HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large]
settings.register_profile(
    "ci",
    derandomize=True,
    database=None,
    deadline=None,
    print_blob=True,
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=_QUIET_CHECKS,
)
settings.register_profile("explore", deadline=None, suppress_health_check=_QUIET_CHECKS)
settings.load_profile(os.environ.get("ACCELC_FUZZ_PROFILE", "ci"))
SCALE = int(os.environ.get("ACCELC_FUZZ_SCALE", "1"))

# the documented exit codes of a refused input (README): usage, missing dependency, validation
REFUSED = (2, 3, 5)


def examples(n: int):
    """Hypothesis settings for a test of n examples (times ACCELC_FUZZ_SCALE)."""
    return settings(max_examples=n * SCALE, deadline=None)


def assert_refused(result, codes=REFUSED, *, also_ok: bool = False):
    """The contract of issue 22: a documented exit code, no traceback, no "internal error"."""
    code, out, err = result
    allowed = codes + ((0,) if also_ok else ())
    assert code in allowed, f"exit {code}, expected one of {allowed}; stderr ends:\n{err[-1500:]}"
    assert "Traceback" not in err and "Traceback" not in out, err[-3000:]
    assert "internal error" not in err, err[-1500:]
    return code, out, err


HASHED_UP_TO = 1 << 20  # bytes


def tree_state(root: Path) -> dict[str, object]:
    """relative path -> the state of every file under root (empty when root is absent): the
    sha256 of a small file; of a larger one its size, mtime and inode, which any later write or
    replacement changes. Hashing every byte would read the pass cache (gigabytes on a used
    machine) twice per case."""
    root = Path(root)
    if not root.exists():
        return {}
    out: dict[str, object] = {}
    for p in sorted(root.rglob("*")):
        if p.is_file():
            st = p.stat()
            small = st.st_size <= HASHED_UP_TO
            out[str(p.relative_to(root))] = (
                hashlib.sha256(p.read_bytes()).hexdigest() if small else (st.st_size, st.st_mtime_ns, st.st_ino)
            )
    return out


@contextmanager
def unchanged(*roots: Path):
    """Assert that no file under the roots is added, removed or changed by the block."""
    before = {str(r): tree_state(r) for r in roots}
    yield
    for r in roots:
        after = tree_state(r)
        changed = sorted(set(before[str(r)].items()) ^ set(after.items()))
        assert not changed, f"{r} was modified: {[name for name, _ in changed][:10]}"


# ------------------------------------------------------------------------------------------- damage
def truncate(path: Path, fraction: float) -> None:
    """Keep the first `fraction` of the file's bytes (an interrupted copy or download)."""
    data = path.read_bytes()
    path.write_bytes(data[: min(int(len(data) * fraction), len(data) - 1)])


def flip_bits(path: Path, positions: list[float], bit: int = 0) -> None:
    """Flip one bit at each relative position in [0, 1) (a bad disk or a bad transfer)."""
    data = bytearray(path.read_bytes())
    for p in positions:
        data[min(int(p * len(data)), len(data) - 1)] ^= 1 << bit
    path.write_bytes(bytes(data))


def overwrite(path: Path, position: float, junk: bytes) -> None:
    """Overwrite bytes at a relative position with junk (the issue's "7 bytes overwritten")."""
    data = bytearray(path.read_bytes())
    start = min(int(position * len(data)), max(len(data) - len(junk), 0))
    data[start : start + len(junk)] = junk
    path.write_bytes(bytes(data))


def damage(path: Path, how: tuple) -> None:
    """Apply one damage drawn by `damages()` in the tests: ("truncate", f), ("flip", [p...], bit), ("junk", p, bytes)."""
    kind, *args = how
    {"truncate": truncate, "flip": flip_bits, "junk": overwrite}[kind](path, *args)


# ------------------------------------------------------------------------------------ the artifact
TINY_ARTIFACT_RECIPE = """\
version: 1
model:
  builtin: tiny-llama
passes:
  - type: export_onnx
targets:
  - kind: cpu
    backends: {backends}
eval:
  parity: {{greedy_tokens: 4, decode_steps: 2}}
  perplexity: {{enabled: false}}
  bench: {{enabled: false}}
cache:
  dir: {cache}
"""

_ARTIFACTS: dict[str, Path] = {}


def tiny_artifact(tmp_path_factory, backends: str = "[ort]") -> Path:
    """A compiled tiny-llama artifact, once per test process and backend list (never damaged:
    cases copy it with `copy_artifact`)."""
    if backends not in _ARTIFACTS:
        from accelc.cli import main

        root = tmp_path_factory.mktemp("fuzz-artifact")
        recipe = root / "recipe.yaml"
        recipe.write_text(TINY_ARTIFACT_RECIPE.format(backends=backends, cache=root / "cache"))
        assert main(["-q", "compile", str(recipe), "-o", str(root / "artifact")]) == 0
        _ARTIFACTS[backends] = root / "artifact"
    return _ARTIFACTS[backends]


def copy_artifact(src: Path, dst: Path) -> Path:
    """A real copy (no hard links: damaging a linked file would damage the original too)."""
    shutil.copytree(src, dst, copy_function=shutil.copyfile)
    return dst


def cli_in_subprocess(*args) -> tuple[int, str, str]:
    """`accelc ARGS` in its own process: for inputs that can crash the interpreter (a damaged
    shared library is dlopen'ed: a bus error), which in-process would end the test run."""
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(repo) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [sys.executable, "-m", "accelc", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        cwd=repo,
        timeout=300,
    )
    return proc.returncode, proc.stdout, proc.stderr
