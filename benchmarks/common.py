"""What every benchmark shares: the thread environment it runs in, the recipes it compiles
(recipes/bench/*.yaml through accelc's own loader and `--set` overrides), the prompts it decodes,
the protocol record of the machine and software, rows + protocol written as JSON, medians and
ratios of measurements taken side by side, and plots.

Spinning thread pools on a shared machine make timings up to 50x worse (compiler/benchmark.py),
so every benchmark calls `quiet_threads()` before torch or ONNX Runtime load, and its ORT sessions
keep spinning off (`ORT_SESSION`, or the artifact's session options, which default to it).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCH_RECIPES = REPO / "recipes" / "bench"
ORT_SESSION = {"intra_op_threads": 0, "allow_spinning": False}  # one thread per physical core, no spinning
THREAD_VARIABLES = ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "TOKENIZERS_PARALLELISM", "HF_HUB_OFFLINE")
PACKAGES = ("accelc", "torch", "onnxruntime", "apache-tvm", "transformers", "onnx", "numpy")
# the CPU features the kernels' speed depends on (x86: vector width, int8/bf16 dot products, AMX)
CPU_FLAGS = (
    "avx",
    "avx2",
    "fma",
    "f16c",
    "avx_vnni",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512_vnni",
    "avx512_bf16",
    "amx_tile",
    "amx_int8",
    "amx_bf16",
)


def run(main) -> int:
    """A benchmark's entry point: accelc's expected errors (a bad option, a missing dependency)
    end it with their one-line message and exit code, as the CLI does, not a traceback."""
    from accelc.errors import AccelcError

    try:
        return main()
    except AccelcError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code


def quiet_threads(threads: int | None = None) -> dict:
    """Passive OpenMP waits, no tokenizer thread pool, no Hugging Face Hub calls; `threads` caps
    OpenMP and torch threads (None: one per core). Call before torch or ORT load; returns the
    environment as set, for the protocol. Values the user exported are kept."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if threads:
        os.environ["OMP_NUM_THREADS"] = str(threads)
        import torch

        torch.set_num_threads(threads)
    return {name: os.environ.get(name) for name in THREAD_VARIABLES}


def parser(doc: str) -> argparse.ArgumentParser:
    """An argument parser described by the module docstring's first paragraph, with the options
    every benchmark takes: `--json OUT.json` (rows; the protocol and plot beside it) and `--threads`."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--json", required=True, help="write the rows here (protocol: OUT.protocol.json, plot: OUT.png)")
    p.add_argument("--threads", type=int, help="cap OpenMP and torch threads (default: one per core)")
    return p


def bench_recipe(name: str) -> Path:
    """recipes/bench/NAME.yaml."""
    return BENCH_RECIPES / f"{name}.yaml"


def override(key: str, value) -> str:
    """A `--set key=value` assignment for any JSON value (JSON is YAML, so lists and mappings pass whole)."""
    return f"{key}={json.dumps(value)}"


def load_bench_recipe(name: str, overrides: Sequence[str] = ()):
    """recipes/bench/NAME.yaml with `--set` style overrides, validated by accelc's recipe loader."""
    from accelc.compiler.recipe import load_recipe

    return load_recipe(bench_recipe(name), list(overrides))


def compile_bench_recipe(recipe: str | Path, out: Path, overrides: Sequence[str] = ()) -> None:
    """`accelc compile RECIPE -o OUT --set ...`, in this process; RECIPE is a path or a recipes/bench name."""
    from accelc.cli import main as accelc

    path = Path(recipe) if str(recipe).endswith((".yaml", ".yml")) else bench_recipe(str(recipe))
    out.parent.mkdir(parents=True, exist_ok=True)
    sets = [arg for assignment in overrides for arg in ("--set", assignment)]
    code = accelc(["compile", str(path), "-o", str(out), *sets])
    if code:
        raise SystemExit(code)


def persuasion_prompts(tokenizer, n: int, length: int = 48) -> list[list[int]]:
    """n prompts of `length` tokens from "Persuasion": every fifth window, so they come from
    different places in the novel (held out: the drafts' vocab and the pass calibrate on emma)."""
    import numpy as np

    from accelc.data import load_text, token_windows

    ids = np.asarray(tokenizer.encode(load_text("austen:persuasion"), add_special_tokens=False))
    windows = token_windows(ids, length, length, n * 5, what="prompt text")
    return [w.tolist() for w, _ in windows][::5]


def _cpuinfo() -> dict:
    """Model name, flags and physical cores from /proc/cpuinfo (Linux); empty elsewhere."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    model, flags, cores, physical = None, set(), set(), None
    for line in text.splitlines():
        key, _, value = (part.strip() for part in line.partition(":"))
        if key == "model name" and model is None:
            model = value
        elif key == "flags" and not flags:
            flags = set(value.split())
        elif key == "physical id":
            physical = value
        elif key == "core id":
            cores.add((physical, value))
    return {
        "cpu": model,
        "flags": [f for f in CPU_FLAGS if f in flags],
        "physical_cores": len(cores) or None,
    }


def machine() -> dict:
    """The CPU (model, the vector features that matter, cores), memory and operating system."""
    info = {"cpu": platform.processor() or platform.machine(), "flags": [], "physical_cores": None, **_cpuinfo()}
    info["logical_cores"] = os.cpu_count()
    if hasattr(os, "sched_getaffinity"):
        info["usable_cores"] = len(os.sched_getaffinity(0))
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                info["memory_gib"] = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    info["machine"] = platform.machine()
    info["system"] = platform.platform()
    return info


def versions() -> dict:
    """Installed versions of Python and the packages a measurement depends on (None: not installed)."""
    found = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def git_commit() -> dict:
    """The checkout's commit and whether it had uncommitted changes (None outside a git checkout)."""

    def git(*args: str) -> str | None:
        try:
            proc = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return proc.stdout.strip() if proc.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": None if status is None else bool(status)}


def protocol(**fields) -> dict:
    """The record that makes a result reproducible: the command line, date, git commit, machine,
    versions, thread environment and load, then the benchmark's own `fields`."""
    argv = getattr(sys, "orig_argv", None) or [sys.executable, *sys.argv]
    return {
        "command": argv,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git": git_commit(),
        "machine": machine(),
        "versions": versions(),
        "threads": {name: os.environ.get(name) for name in THREAD_VARIABLES},
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        **fields,
    }


def write_results(path: str | Path, rows, record: dict) -> tuple[Path, Path]:
    """The rows at `path` and the protocol beside them (OUT.protocol.json); returns both paths."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows, indent=2))
    beside = path.with_suffix(".protocol.json")
    beside.write_text(json.dumps(record, indent=2, default=str))
    return path, beside


def median(values: Iterable[float]) -> float:
    return statistics.median(values)


def paired_ratios(numerators: Sequence[float], denominators: Sequence[float]) -> list[float]:
    """Ratios of measurements taken side by side (same prompt, same round): pairing cancels the
    drift of machine load that separate medians would keep."""
    if len(numerators) != len(denominators):
        raise ValueError(
            f"paired ratios need as many measurements on each side, got {len(numerators)} and {len(denominators)}"
        )
    return [a / b for a, b in zip(numerators, denominators)]


def median_ratio(numerators: Sequence[float], denominators: Sequence[float]) -> float:
    """The median of the paired ratios."""
    return statistics.median(paired_ratios(numerators, denominators))


def pyplot():
    """matplotlib.pyplot on the Agg backend (files only: benchmarks run without a display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    pyplot().close(fig)
    return Path(path)
