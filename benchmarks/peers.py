"""accelc against the CPU runtimes a deployment engineer would pick instead (llama.cpp, ONNX Runtime
GenAI), on one machine, the same model, the same prompts: decode tokens/s, time to first token, peak
RSS and perplexity per (runtime, precision) row.

    python -m benchmarks.peers [--quick] [--repeats N] [--prompts N] [--windows N] [--no-build]
                               [--only RUNTIME[:PRECISION] ...] [--lock FILE]
                               [--llama-cpp-build native|no-amx] --json OUT.json

SmolLM2-135M-Instruct from the embedded assets only (the shipped Q4_1 GGUF and the Hugging Face
folder accelc converts it to; the hub is never asked). Prompts: `--prompts` windows of 64 tokens of
held-out "Persuasion", 128 new greedy tokens each (end-of-text ignored), token ids from the Hugging
Face tokenizer for every runtime. Each row runs warm in a process of its own
(`python -m benchmarks.peers_runner`), rows interleaved round by round, medians over prompts and rounds.
Perplexity: `--windows` disjoint windows of 512 tokens of "Persuasion", each runtime's own logits;
`exact` is true where it is within 1% of the source model's (torch, the model of record).

The peers install into a venv of their own under the asset cache, made by this script from
benchmarks/peers_requirements.txt on first use (llama-cpp-python builds llama.cpp from source,
under `nice`, without its multimodal library: ~20 minutes on 2 busy cores); their models are made
by their own tools (llama.cpp's quantize API for the F32 and Q8_0 GGUFs, ORT GenAI's model builder
for fp32 and int4) and cached beside it. A peer that cannot be built or run is a row with `skipped` and the reason.
`--llama-cpp-build no-amx` builds llama.cpp in a venv of its own without AMX, whose ggml matmul dies
of a segmentation fault on virtualised Sapphire Rapids hosts (ggml-org/llama.cpp#20824).

Threads: every row gets `--threads` (default: the usable cores) and no spinning between calls where
the runtime lets us say so: accelc's ORT sessions with spinning off (except the `accelc-ort-spin`
and `accelc-ort-speculative-spin` rows, which spin as ORT GenAI does, and `accelc-ort-spin20us`,
bounded to 20 us: ORT GenAI 0.18's config has no key for ORT's spinning, so its pool always
spins, and with `--peers-omp-wait active` llama.cpp's spin too), and OMP_WAIT_POLICY=PASSIVE for
OpenMP, which is what llama.cpp's graph threads are in llama-cpp-python's default build (left to
libgomp's default they spin after every token, which on shared cores slows whatever else runs and
makes llama.cpp's own timings swing). `--peers-omp-wait active` lets the peers' threads spin and
measures that; it applies to the peers' worker processes only (exporting OMP_WAIT_POLICY=ACTIVE
would also leave this process's torch threads spinning after its compiles and perplexity
passes, slowing every row).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from benchmarks import common

RUNNER = "benchmarks.peers_runner"  # run as a module from the repository root, by either environment's python
REQUIREMENTS = Path(__file__).with_name("peers_requirements.txt")
PROMPT_TOKENS = 64
NEW_TOKENS = 128
WINDOW = 512
EXACT_PPL = 0.01  # `exact`: perplexity within 1% of the source model's
QUICK = {"repeats": 1, "prompts": 4, "windows": 2}
FULL = {"repeats": 3, "prompts": 8, "windows": 4}
WORKER_TIMEOUT_S = 900


@dataclasses.dataclass(frozen=True)
class Row:
    """One configuration: `runtime` and `precision` as reported; for accelc rows `source` is the
    recipe (repo-relative) compiled through `accelc compile`, decoded on `backend` (with the
    artifact's decode plan when `plan`); for peers it names the model their own tools make."""

    runtime: str
    precision: str
    source: str
    backend: str = ""
    plan: bool = False
    spin: bool = False  # the artifact's ORT threads spin between ops (as ORT GenAI's always do)
    spin_us: int | None = None  # with spin: how long before they sleep (None: ORT's default)

    @property
    def name(self) -> str:
        return f"{self.runtime}:{self.precision}"

    @property
    def recipe_sets(self) -> list[str]:
        """`--set` overrides of the row's recipe: the spin policy of its (first) target's sessions."""
        if not self.spin:
            return []
        bound = [] if self.spin_us is None else [f"targets.0.ort.spin_duration_us={self.spin_us}"]
        return ["targets.0.ort.allow_spinning=true", *bound]

    @property
    def artifact(self) -> Path:
        suffix = "" if not self.spin else "-spin" if self.spin_us is None else f"-spin{self.spin_us}us"
        return common.REPO / "artifacts" / "bench" / "peers" / (Path(self.source).stem + suffix)

    @property
    def is_peer(self) -> bool:
        return not self.backend


# The source model of record: its perplexity and greedy tokens are what `exact` is judged against.
SOURCE = Row("torch", "fp32", "recipes/bench/peers.yaml", "torch")
# accelc's configurations, one line each: (runtime, precision, recipe, backend[, plan]).
ACCELC = (
    Row("accelc-ort", "fp32", "recipes/bench/peers.yaml", "ort"),
    Row("accelc-ort-speculative", "fp32", "recipes/bench/speculative.yaml", "ort", plan=True),
    # the plan's draft and target sessions spinning, for the table where every runtime spins
    Row("accelc-ort-speculative-spin", "fp32", "recipes/bench/speculative.yaml", "ort", plan=True, spin=True),
    Row("accelc-openvino", "fp32", "recipes/bench/peers.yaml", "openvino"),
    Row("accelc-tvm", "fp32", "recipes/bench/peers.yaml", "tvm"),
    Row("accelc-ort", "int4", "recipes/quickstart_int4.yaml", "ort"),
    # ORT GenAI's threads spin (its config cannot turn that off): the same int4 artifact with its
    # threads spinning too, as ORT GenAI's do (ORT's default) and bounded to 20 us, the setting
    # that loses little on a shared machine (docs/peers.md)
    Row("accelc-ort-spin", "int4", "recipes/quickstart_int4.yaml", "ort", spin=True),
    Row("accelc-ort-spin20us", "int4", "recipes/quickstart_int4.yaml", "ort", spin=True, spin_us=20),
    Row("accelc-ort", "q4_1", "recipes/quickstart.yaml", "ort"),  # the GGUF's own blocks: exact weights
    Row("accelc-ort-spin", "q4_1", "recipes/quickstart.yaml", "ort", spin=True),
    Row("accelc-ort-spin20us", "q4_1", "recipes/quickstart.yaml", "ort", spin=True, spin_us=20),
    # the same blocks with int8 activations and the Q8_0 head, computed as llama.cpp computes Q4_1
    Row("accelc-ort", "q4_1-int8", "recipes/bench/q4_1_int8.yaml", "ort"),
    Row("accelc-ort-spin", "q4_1-int8", "recipes/bench/q4_1_int8.yaml", "ort", spin=True),
    Row("accelc-ort-spin20us", "q4_1-int8", "recipes/bench/q4_1_int8.yaml", "ort", spin=True, spin_us=20),
)
# The peers, each on a model its own tools make from the shipped GGUF or accelc's HF folder.
PEERS = (
    Row("llama.cpp", "q4_1", "gguf:shipped"),
    Row("llama.cpp", "int8", "gguf:Q8_0"),
    Row("llama.cpp", "fp32", "gguf:F32"),
    Row("ort-genai", "fp32", "builder:fp32"),
    Row("ort-genai", "int4", "builder:int4"),
)
ROWS = (SOURCE, *ACCELC, *PEERS)


class Skip(Exception):
    """A row that cannot be measured, with the reason its JSON row carries."""


def select(only: Sequence[str]) -> list[Row]:
    """The rows named by `--only` (RUNTIME or RUNTIME:PRECISION), the source always first."""
    from accelc.errors import UsageError

    if not only:
        return list(ROWS)
    known = {r.name for r in ROWS} | {r.runtime for r in ROWS}
    unknown = [o for o in only if o not in known]
    if unknown:
        raise UsageError(f"--only {' '.join(unknown)}: no such row; known: {', '.join(sorted(known))}")
    return [r for r in ROWS if r is SOURCE or r.name in only or r.runtime in only]


def settings(quick: bool, repeats: int | None, prompts: int | None, windows: int | None) -> dict:
    """Rounds, prompts and perplexity windows: --quick's or the full run's, each overridable."""
    from accelc.errors import UsageError

    chosen = dict(QUICK if quick else FULL)
    for name, value, least in (("repeats", repeats, 1), ("prompts", prompts, 1), ("windows", windows, 0)):
        if value is None:
            continue
        if value < least:
            raise UsageError(f"--{name} must be at least {least}, got {value}")
        chosen[name] = value
    return chosen


# ---------------------------------------------------------------- the peers' environment and models


# llama.cpp's build flavours. `native` compiles for the build host (-march=native), as
# llama-cpp-python does by default; `no-amx` names the extensions every AMX host has (AVX-512 with
# VNNI and BF16) instead and leaves out AMX,
# whose ggml matmul dies of SIGSEGV on virtualised Sapphire Rapids hosts (ggml-org/llama.cpp#20824;
# seen in session 19: Q4_1 and Q8_0 crash in the first decode, F32 runs)
LLAMA_CPP_BUILDS = {
    "native": "",
    "no-amx": "-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON "
    "-DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON",
}


def env_key(flavour: str = "native") -> str:
    """The venv's key: its requirements, and llama.cpp's build flavour when it is not `native`."""
    import hashlib

    from accelc import assets

    built_from = REQUIREMENTS.read_bytes() + LLAMA_CPP_BUILDS[flavour].encode()
    return assets.key(hashlib.sha256(built_from).hexdigest())


def venv_dir(flavour: str = "native") -> Path:
    from accelc import assets

    return assets.cache_root() / "peers" / f"env-{env_key(flavour)}"


def models_dir(hf_dir: Path) -> Path:
    """Where the peers' own tools write their models (they do not depend on llama.cpp's flavour)."""
    return venv_dir().parent / f"models-{env_key()}-{hf_dir.name}"


def _niced(cmd: list[str]) -> list[str]:
    """Builds and conversions run at the lowest priority (the machine may be timing something)."""
    return ["nice", "-n", "19", *cmd] if shutil.which("nice") else cmd


def peers_python(build: bool, flavour: str = "native") -> Path:
    """The venv's python, building the venv first (llama.cpp as `flavour` says) when it is missing
    and `build`; Skip otherwise. A venv is complete once it holds a copy of the requirements it was
    built from."""
    from accelc import progress

    env = venv_dir(flavour)
    done = env / "requirements.done"
    if done.is_file() and done.read_bytes() == REQUIREMENTS.read_bytes():
        return env / "bin" / "python"
    if not build:
        raise Skip(f"the peers' environment {env} is not built (--no-build); run without it once (~20 min)")
    shutil.rmtree(env, ignore_errors=True)
    log = env.with_suffix(".log")
    env.parent.mkdir(parents=True, exist_ok=True)
    cores = str(len(os.sched_getaffinity(0)))
    steps = (
        # system site packages: torch, onnx and onnxruntime for ORT GenAI's builder come from accelc's
        # environment (PyPI's torch would pull GBs of CUDA libraries); everything pip installs lands in the venv
        [sys.executable, "-m", "venv", "--system-site-packages", str(env)],
        # no wheel cache: pip keys a built wheel by its sdist, not by CMAKE_ARGS, so another flavour's
        # llama.cpp would be installed in place of this one's
        [str(env / "bin" / "python"), "-m", "pip", "install", "--no-cache-dir", "-r", str(REQUIREMENTS)],
    )
    what = f"peers: building {env.name} (llama.cpp compiles from source, ~20 min; log {log})"
    with progress.step(what), open(log, "w") as out:
        for cmd in steps:
            # no llava/mtmd library (a third of llama.cpp's build; the benchmark decodes text only)
            cmake = f"-DLLAVA_BUILD=OFF {LLAMA_CPP_BUILDS[flavour]}".strip()
            build_env = {"CMAKE_ARGS": cmake, **os.environ, "CMAKE_BUILD_PARALLEL_LEVEL": cores}
            proc = subprocess.run(_niced(cmd), stdout=out, stderr=subprocess.STDOUT, env=build_env)
            if proc.returncode != 0:
                raise Skip(
                    f"building the peers' environment failed ({' '.join(cmd[:4])}... exit {proc.returncode}); see {log}"
                )
    shutil.copyfile(REQUIREMENTS, done)
    return env / "bin" / "python"


def _made(final: Path, make) -> Path:
    """`make(tmp)` writes into a temporary sibling of `final`, published by rename when it succeeds."""
    from accelc import assets

    if final.exists():
        return final
    tmp = assets.temp_sibling_dir(final)
    try:
        made = make(tmp)
        return assets.publish_dir(made, final) if made.is_dir() else assets.publish_file(made, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _run_tool(cmd: list[str], what: str) -> None:
    proc = subprocess.run(_niced(cmd), cwd=common.REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
        raise Skip(f"{what} failed (exit {proc.returncode}): {tail}")


def peer_model(row: Row, python: Path, gguf: Path, hf_dir: Path) -> Path:
    """The model file or folder `row` runs, made once by the peer's own tools and cached."""
    from accelc import progress

    kind, _, variant = row.source.partition(":")
    if row.source == "gguf:shipped":
        return gguf
    models = models_dir(hf_dir)
    models.mkdir(parents=True, exist_ok=True)
    if kind == "gguf":  # llama.cpp's quantize API (llama_model_quantize) from the shipped GGUF

        def make(tmp: Path) -> Path:
            out = tmp / f"model.{variant}.gguf"
            with progress.step(f"peers: {row.name}: llama.cpp quantize {gguf.name} -> {variant}"):
                _run_tool([str(python), "-m", RUNNER, "--quantize", str(gguf), str(out), variant], "llama.cpp quantize")
            return out

        return _made(models / f"{gguf.stem}.{variant}.gguf", make)
    if kind == "builder":  # ORT GenAI's own model builder on the HF folder

        def make(tmp: Path) -> Path:
            out = tmp / "model"
            cmd = [str(python), "-m", "onnxruntime_genai.models.builder", "-i", str(hf_dir), "-o", str(out)]
            cmd += ["-p", variant, "-e", "cpu", "-c", str(tmp / "cache")]
            with progress.step(f"peers: {row.name}: ORT GenAI model builder -p {variant}"):
                _run_tool(cmd, "ORT GenAI's model builder")
            return out

        return _made(models / f"ort-genai-{variant}", make)
    raise ValueError(f"unknown peer source {row.source!r}")


# ---------------------------------------------------------------- inputs, workers, rounds


def inputs(tokenizer, n_prompts: int, n_windows: int) -> tuple[list[list[int]], list[tuple[list[int], int]]]:
    """Prompt ids (64 tokens each) and perplexity windows ([ids], scored) of held-out "Persuasion"."""
    import numpy as np

    from accelc.data import load_text, token_windows

    prompts = common.persuasion_prompts(tokenizer, n_prompts, PROMPT_TOKENS)
    if not n_windows:
        return prompts, []
    ids = np.asarray(tokenizer.encode(load_text("austen:persuasion"), add_special_tokens=False))
    windows = token_windows(ids, WINDOW, WINDOW, n_windows, what="text 'austen:persuasion'")
    return prompts, [(w.tolist(), int(n)) for w, n in windows]


def run_worker(python: Path, spec: dict, timeout: float = WORKER_TIMEOUT_S) -> dict:
    """peers_runner.py on `spec` in a fresh process: its result, or Skip with the worker's last words."""
    wait = spec.get("omp_wait", "passive").upper()
    env = {**os.environ, "OMP_WAIT_POLICY": wait, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(spec, f)
    try:
        proc = subprocess.run(
            [str(python), "-m", RUNNER, f.name],
            cwd=common.REPO,
            capture_output=True,
            text=True,
            env=env,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        raise Skip(f"the worker did not finish in {timeout:.0f} s") from None
    finally:
        os.unlink(f.name)
    if proc.returncode != 0:
        tail = " | ".join(proc.stderr.strip().splitlines()[-3:])
        if proc.returncode == -signal.SIGSEGV:
            tail += " (a segmentation fault: on hosts where ggml's AMX kernels crash, try --llama-cpp-build no-amx)"
        raise Skip(f"the worker failed (exit {proc.returncode}): {tail}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def shape_row(row: Row, runs: list[dict], source: dict | None, threads: int) -> dict:
    """The JSON row of `row` from its workers' results: medians over every prompt of every round,
    perplexity from the run that scored windows, `exact` and `same_tokens` against the source's."""
    out = {"runtime": row.runtime, "precision": row.precision, "source": row.source, "threads": threads}
    if row.spin:
        out["spin_us"] = row.spin_us  # None: ORT's default spin
    if row.backend:
        out["backend"] = row.backend
    ttft = [x for r in runs for x in r["ttft_ms"]]
    rates = [x for r in runs for x in r["decode_tok_s"]]
    out.update(
        decode_tok_s=statistics.median(rates),
        ttft_ms=statistics.median(ttft),
        rss_mb=statistics.median(r["rss_mb"] for r in runs),
        load_s=statistics.median(r["load_s"] for r in runs),
        samples=len(rates),
    )
    scored = next((r for r in runs if "nll" in r), None)
    out["ppl"] = _ppl(scored)
    reference = _ppl(source)
    out["ppl_ratio"] = out["ppl"] / reference if out["ppl"] is not None and reference else None
    out["exact"] = out["ppl_ratio"] is not None and abs(out["ppl_ratio"] - 1) <= EXACT_PPL
    if source is not None:  # greedy tokens equal to the source model's, prompt by prompt
        same = [a == b for a, b in zip(runs[0]["tokens"], source["tokens"])]
        out["same_tokens"] = sum(same) / len(same)
    return out


def _ppl(run: dict | None) -> float | None:
    import math

    if run is None or "nll" not in run or not run.get("scored"):
        return None
    return math.exp(run["nll"] / run["scored"])


def skipped_row(row: Row, reason: str) -> dict:
    return {"runtime": row.runtime, "precision": row.precision, "source": row.source, "skipped": reason}


def print_table(rows: list[dict]) -> None:
    print(
        f"{'runtime':<24} {'precision':<9} {'decode tok/s':>12} {'ttft ms':>8} {'rss MB':>7} {'ppl':>7} "
        f"{'exact':>5} {'same tok':>8}"
    )
    for r in rows:
        head = f"{r['runtime']:<24} {r['precision']:<9}"
        if "skipped" in r:
            print(f"{head} skipped: {r['skipped']}")
            continue
        ppl = f"{r['ppl']:>7.2f}" if r["ppl"] is not None else f"{'-':>7}"
        same = f"{r['same_tokens']:>8.2f}" if "same_tokens" in r else f"{'-':>8}"
        print(
            f"{head} {r['decode_tok_s']:>12.1f} {r['ttft_ms']:>8.1f} {r['rss_mb']:>7.0f} {ppl} "
            f"{str(r['exact']).lower():>5} {same}"
        )


def plot(rows: list[dict], path: Path) -> None:
    plt = common.pyplot()
    shown = [r for r in rows if "skipped" not in r]
    fig, axes = plt.subplots(1, 2, figsize=(13, 0.45 * len(shown) + 1.6))
    labels = [f"{r['runtime']} {r['precision']}" for r in shown]
    colors = ["#2a7" if r["runtime"].startswith("accelc") else "#888" for r in shown]
    for ax, key, title in (
        (axes[0], "decode_tok_s", "decode tokens/s (higher is better); label: perplexity"),
        (axes[1], "ttft_ms", "time to first token, ms (lower is better)"),
    ):
        values = [r[key] for r in shown]
        ax.barh(labels, values, color=colors)
        ax.invert_yaxis()
        ax.set_title(title, fontsize=9)
        for i, (v, r) in enumerate(zip(values, shown)):
            note = f" ppl {r['ppl']:.2f}" if key == "decode_tok_s" and r["ppl"] is not None else ""
            ax.text(v, i, f" {v:.3g}{note}", va="center", fontsize=8)
    fig.suptitle(
        f"SmolLM2-135M-Instruct, {PROMPT_TOKENS}-token prompts, {NEW_TOKENS} greedy tokens, one machine",
        fontsize=10,
    )
    common.save_figure(fig, path)


class _Lock:
    """An exclusive flock on `path` while a round is timed (None: no lock)."""

    def __init__(self, path: str | None):
        self.path = path

    def __enter__(self):
        if self.path:
            import fcntl

            from accelc import progress

            self.file = open(self.path, "a")
            progress.status(f"peers: waiting for the lock {self.path}")
            fcntl.flock(self.file, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        if self.path:
            self.file.close()


def main(argv: list[str] | None = None) -> int:
    p = common.parser(__doc__)
    p.add_argument(
        "--quick",
        action="store_true",
        help=f"{QUICK['prompts']} prompts, {QUICK['repeats']} round, {QUICK['windows']} perplexity windows "
        "(under 10 minutes once the peers are built)",
    )
    p.add_argument("--repeats", type=int, help=f"rounds over every row (default {FULL['repeats']})")
    p.add_argument("--prompts", type=int, help=f"prompts of {PROMPT_TOKENS} tokens (default {FULL['prompts']})")
    p.add_argument("--windows", type=int, help=f"perplexity windows of {WINDOW} tokens (default {FULL['windows']})")
    p.add_argument("--only", nargs="+", default=[], metavar="RUNTIME[:PRECISION]", help="measure only these rows")
    p.add_argument("--no-build", action="store_true", help="skip the peers instead of building their environment")
    p.add_argument("--lock", help="hold an exclusive flock on this file during each timed round")
    p.add_argument(
        "--peers-omp-wait",
        choices=("passive", "active"),
        default="passive",
        help="OpenMP wait policy of the peers' workers (llama.cpp's threads): active lets them spin",
    )
    p.add_argument(
        "--llama-cpp-build",
        choices=sorted(LLAMA_CPP_BUILDS),
        default="native",
        help="how llama.cpp is compiled: for this host (native), or without AMX (no-amx: ggml's AMX "
        "matmul crashes on virtualised Sapphire Rapids hosts); each flavour is a venv of its own",
    )
    args = p.parse_args(argv)
    chosen = settings(args.quick, args.repeats, args.prompts, args.windows)
    rows = select(args.only)
    threads = args.threads or len(os.sched_getaffinity(0))
    environment = common.quiet_threads(args.threads)

    from accelc import assets, progress
    from accelc.families.causal_lm import load_tokenizer

    gguf, hf_dir = assets.smollm2_gguf(), assets.smollm2_dir()
    prompts, windows = inputs(load_tokenizer(hf_dir), chosen["prompts"], chosen["windows"])
    base = {"threads": threads, "prompts": prompts, "new_tokens": NEW_TOKENS, "context": WINDOW}

    specs: dict[Row, tuple[Path, dict]] = {}
    skipped: dict[Row, str] = {}
    python, no_env = None, None
    if any(row.is_peer for row in rows):
        try:
            python = peers_python(build=not args.no_build, flavour=args.llama_cpp_build)
        except Skip as exc:  # every peer's row says so; the accelc rows still run
            no_env = str(exc)
    for row in rows:
        try:
            if row.is_peer:
                if no_env:
                    raise Skip(no_env)
                model = peer_model(row, python, gguf, hf_dir)
                spec = {**base, "runtime": row.runtime, "model": str(model), "omp_wait": args.peers_omp_wait}
                specs[row] = (python, spec)
            else:
                artifact = row.artifact
                # compiled every run: the step cache makes an unchanged artifact a few seconds'
                # proof, and an artifact left by older code (a pass's new version) is never timed
                sets = ["eval.perplexity.enabled=false", "eval.bench.enabled=false", *row.recipe_sets]
                try:
                    common.compile_bench_recipe(common.REPO / row.source, artifact, sets)
                except SystemExit as exc:  # the compile's own message is above; the row says which
                    raise Skip(f"accelc compile {row.source} failed (exit {exc.code})") from None
                spec = {**base, "runtime": "accelc", "model": str(artifact), "backend": row.backend, "plan": row.plan}
                specs[row] = (Path(sys.executable), spec)
        except Skip as exc:
            skipped[row] = str(exc)
            progress.status(f"peers: {row.name} skipped: {exc}")

    runs: dict[Row, list[dict]] = {row: [] for row in specs}
    started = time.time()

    def write(rounds_done: int) -> list[dict]:
        """The rows so far, written after every round: an interrupted run keeps its finished rounds."""
        source = runs[SOURCE][0] if runs.get(SOURCE) else None
        out = [
            skipped_row(row, skipped[row]) if row in skipped else shape_row(row, runs[row], source, threads)
            for row in rows
            if row in skipped or runs.get(row)
        ]
        record = common.protocol(
            environment=environment,
            settings=chosen,
            rounds_done=rounds_done,
            prompt_tokens=PROMPT_TOKENS,
            new_tokens=NEW_TOKENS,
            perplexity={"text": "austen:persuasion", "window": WINDOW, "stride": WINDOW, "windows": len(windows)},
            peers_env=str(venv_dir(args.llama_cpp_build)),
            llama_cpp_build=args.llama_cpp_build,
            peers_omp_wait=args.peers_omp_wait,
            requirements=REQUIREMENTS.read_text(),
            timed_seconds=time.time() - started,
        )
        common.write_results(args.json, out, record)
        return out

    bar = progress.bar(total=chosen["repeats"] * len(specs), desc="peers")
    for k in range(chosen["repeats"]):
        with _Lock(args.lock):  # a round at a time: other timings on the machine wait minutes, not the whole run
            for row, (python_, spec) in specs.items():
                if row in skipped or (row is SOURCE and k):  # the source is the reference: one round
                    bar.update()
                    continue
                bar.set_postfix_str(row.name)
                try:  # perplexity in the first round only: it does not change between rounds
                    runs[row].append(run_worker(python_, {**spec, "windows": windows if k == 0 else []}))
                except Skip as exc:
                    skipped[row] = str(exc)
                    progress.status(f"peers: {row.name} skipped: {exc}")
                bar.update()
        out = write(k + 1)
    bar.close()
    print_table(out)
    plot(out, Path(args.json).with_suffix(".png"))
    return 0


if __name__ == "__main__":
    sys.exit(common.run(main))
