"""The cuda target's check on a GPU: TVM CUDA and ONNX Runtime CUDA decoding against torch eager.

    python -m benchmarks.gpu_check prepare | run --json OUT.json | twin --json OUT.json

Three steps, each a subcommand (docs/cuda.md says how a session runs them on the device machine):

    prepare  (here, no GPU)   build the payload: SmolLM2-135M's decoder for sm_80 and sm_90 (CUDA
                              library + nvcc fatbin, the same with CUDA graphs, the llvm twin for
                              any x86-64-v3 CPU), a runtime-only TVM for Python 3.12, the config.
                              No weights: about 33 MB.
    run      (on the GPU)     seeded weights of that config; load the artifact (kernels from the
                              fatbin, not compiled at load), prefill and decode, logits against
                              torch on the GPU and the CPU twin, decode tokens/s of TVM CUDA (with
                              and without its CUDA graph), ORT CUDA (where onnxruntime-gpu is
                              installed) and torch eager, side by side; one JSON.
    twin     (here)           the llvm twin's parity with torch on the real SmolLM2 weights.

Weights are drawn on the GPU machine (torch.manual_seed) rather than carried: the payload limit
is 64 MiB and SmolLM2's float32 weights are 540 MB, and the speed of a decoder does not depend
on its weights' values. Every engine of one run uses the same weights.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import REPO, median, paired_ratios, protocol, quiet_threads

PAYLOAD = REPO / "gpu_payload"
ARCHS = ["sm_80", "sm_90"]  # A100 and H100/H200: the GPUs such a check gets
TWIN_CPU = {"kind": "llvm", "mcpu": "x86-64-v3"}  # AVX2: runs on whatever CPU hosts the GPU
PROMPT_TOKENS = 32
PARITY_STEPS = 8
GOAL_SPEEDUP = 2.0  # TVM CUDA decode vs torch eager at batch 1 (issue 17)
# the GPU build compiles with --use_fast_math (nvcc's default in TVM): a looser bound than the
# CPU twin's 1e-4, relative to the largest logit
GPU_PARITY_RTOL = 1e-3


def _smollm2_dir() -> Path:
    from accelc import assets

    return assets.smollm2_dir()


# -- prepare (here) ---------------------------------------------------------------------------


def prepare(args) -> None:
    import tvm
    import tvm_ffi

    from accelc.targets.tvm_nn_build import lower_decoder

    model_dir = Path(args.model) if args.model else _smollm2_dir()
    out = Path(args.payload)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    shutil.copy(model_dir / "config.json", out / "config.json")
    t0 = time.perf_counter()
    lower_decoder(model_dir, out / "decoder", architectures=args.arch, twin_target=TWIN_CPU, write_params=False)
    lower_decoder(
        model_dir, out / "decoder_graph", architectures=args.arch, twin=False, cuda_graph=True, write_params=False
    )
    build_s = time.perf_counter() - t0
    # TVM without its 260 MB compiler library: the runtime alone loads a built artifact
    # (import tvm.runtime.vm, not tvm.relax; TVM_USE_RUNTIME_LIB=1)
    skip = shutil.ignore_patterns("libtvm_compiler.so", "3rdparty", "src", "include", "__pycache__")
    shutil.copytree(Path(tvm.__file__).parent, out / "site" / "tvm", ignore=skip)
    # tvm_ffi is a compiled extension: the GPU machine's Python is 3.12
    wheels = out / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", "3.12"]
        + ["--platform", "manylinux_2_28_x86_64", "-d", str(wheels), f"apache-tvm-ffi=={tvm_ffi.__version__}"],
        check=True,
    )
    (wheel,) = wheels.glob("*.whl")
    shutil.unpack_archive(wheel, out / "site", format="zip")
    shutil.rmtree(wheels)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    record = {
        "model": str(model_dir),
        "architectures": args.arch,
        "twin_target": TWIN_CPU,
        "tvm": tvm.__version__,
        "tvm_ffi_wheel": wheel.name,
        "build_s": round(build_s, 1),
        "bytes": size,
    }
    (out / "payload.json").write_text(json.dumps(record, indent=2))
    print(json.dumps(record, indent=2))


# -- twin (here) ------------------------------------------------------------------------------


def twin(args) -> None:
    """The llvm twin's prefill and decode logits against torch on the real SmolLM2 weights."""
    import tempfile

    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from accelc.runtime.cuda_tvm_backend import PagedKVStepModel
    from accelc.runtime.torch_backend import TorchStepModel
    from accelc.targets.tvm_nn_build import lower_decoder

    model_dir = Path(args.model) if args.model else _smollm2_dir()
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        lower_decoder(model_dir, Path(tmp), architectures=None)
        build_s = time.perf_counter() - t0
        model = PagedKVStepModel(Path(tmp), "cpu")
        ref = TorchStepModel(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32))
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        rows = []
        for prompt in ("The capital of France is", "Once upon a time, in a small village,"):
            ids = np.array(tokenizer(prompt)["input_ids"])
            (a, s), (b, r) = model.prefill(ids), ref.prefill(ids)
            row = {
                "prompt": prompt,
                "prefill_max_abs_diff": float(np.abs(a - b).max()),
                "max_abs_logit": float(np.abs(b).max()),
            }
            worst = 0.0
            for _ in range(PARITY_STEPS):
                token = np.array([int(b[-1].argmax())])
                (a, s), (b, r) = model.extend(s, token), ref.extend(r, token)
                worst = max(worst, float(np.abs(a - b).max()))
            row["decode_max_abs_diff"] = worst
            rows.append(row)
    result = {
        "protocol": protocol(benchmark="gpu_check twin", model=str(model_dir), build_s=round(build_s, 1)),
        "rows": rows,
    }
    Path(args.json).write_text(json.dumps(result, indent=2, default=str))
    print(json.dumps(rows, indent=2))


# -- run (on the GPU machine) -----------------------------------------------------------------


def _runtime_only_tvm(payload: Path) -> None:
    """Run on the payload's runtime-only TVM: if this process would import another tvm, start it
    again with the payload's tree first on PYTHONPATH (before any tvm import: a process cannot
    swap its tvm once loaded). Then load CUDA 13's runtime library, which TVM's
    libtvm_runtime_cuda.so needs (the GPU machine has it from the nvidia-cuda-runtime wheel, not
    on the loader's path)."""
    import importlib.util

    site = (payload / "site").resolve()
    found = importlib.util.find_spec("tvm")
    if found is None or site not in Path(found.origin).resolve().parents:
        env = {**os.environ, "TVM_USE_RUNTIME_LIB": "1"}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), env.get("PYTHONPATH")]))
        os.execve(sys.executable, [sys.executable, "-m", "benchmarks.gpu_check", *sys.argv[1:]], env)

    spec = importlib.util.find_spec("nvidia")
    roots = list(spec.submodule_search_locations) if spec and spec.submodule_search_locations else []
    for root in roots:
        for lib in sorted(Path(root).glob("*/lib/libcudart.so.13*")):
            ctypes.CDLL(str(lib), mode=ctypes.RTLD_GLOBAL)
            return


def _gpu_info() -> dict:
    import torch

    info = {"torch": torch.__version__, "cuda_available": torch.cuda.is_available()}
    if torch.cuda.is_available():
        info["name"] = torch.cuda.get_device_name(0)
        major, minor = torch.cuda.get_device_capability(0)
        info["capability"] = f"sm_{major}{minor}"
    smi = shutil.which("nvidia-smi")
    if smi:
        query = "--query-gpu=name,driver_version,memory.total,clocks.max.sm"
        out = subprocess.run([smi, query, "--format=csv,noheader"], capture_output=True, text=True)
        info["nvidia_smi"] = out.stdout.strip()
    return info


class TorchEager:
    """The model of record on the GPU, batch 1, Hugging Face's own cache: the baseline."""

    name = "torch-eager"

    def __init__(self, model):
        import torch

        self.torch, self.model = torch, model

    def prefill(self, ids):
        return self._run(ids, None)

    def extend(self, state, ids):
        return self._run(ids, state)

    def _run(self, ids, cache):
        torch = self.torch
        with torch.inference_mode():
            x = torch.as_tensor(ids, dtype=torch.long, device="cuda").reshape(1, -1)
            out = self.model(input_ids=x, past_key_values=cache, use_cache=True)
        return out.logits[0].float().cpu().numpy(), out.past_key_values  # logits to the host, as every engine


def _parity(models: dict, reference: str, prompt) -> dict:
    """Prefill logits and PARITY_STEPS teacher-forced decode steps of each model against `reference`'s."""
    import numpy as np

    logits, states = {}, {}
    for name, model in models.items():
        logits[name], states[name] = [], None
        out, states[name] = model.prefill(prompt)
        logits[name].append(out)
    for _ in range(PARITY_STEPS):
        token = np.array([int(logits[reference][-1][-1].argmax())])
        for name, model in models.items():
            out, states[name] = model.extend(states[name], token)
            logits[name].append(out)
    scale = max(1.0, float(np.abs(logits[reference][0]).max()))
    rows = {}
    for name in models:
        if name == reference:
            continue
        diffs = [float(np.abs(a - b).max()) for a, b in zip(logits[name], logits[reference])]
        rows[name] = {
            "prefill_max_abs_diff": diffs[0],
            "decode_max_abs_diff": max(diffs[1:]),
            "max_abs_logit": scale,
            "ok": max(diffs) <= GPU_PARITY_RTOL * scale,
        }
    return rows


def _decode_seconds(model, prompt, steps: int) -> float:
    """Seconds for `steps` greedy decode steps after a prefill (the logits of each reach the host)."""
    import numpy as np

    logits, state = model.prefill(prompt)
    token = np.array([int(logits[-1].argmax())])
    t0 = time.perf_counter()
    for _ in range(steps):
        logits, state = model.extend(state, token)
        token = np.array([int(logits[-1].argmax())])
    return time.perf_counter() - t0


def _attempt(results: dict, name: str, fn):
    try:
        return fn()
    except Exception as exc:  # one engine failing must not cost the others' figures
        results["errors"][name] = (
            f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
        )
        return None


def run(args) -> None:
    quiet_threads()
    payload = Path(args.payload)
    _runtime_only_tvm(payload)
    import numpy as np
    import torch
    from safetensors.numpy import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    from accelc.runtime import cuda_tvm_backend
    from accelc.targets.tvm_nn_llm import fused_weights, read_config

    started = time.perf_counter()
    results: dict = {"gpu": _gpu_info(), "errors": {}, "timings_s": {}}
    config = AutoConfig.from_pretrained(payload)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    hf = Path(args.work) / "hf"
    model.save_pretrained(hf)
    for name in ("decoder", "decoder_graph"):
        meta = json.loads((payload / name / "decoder.json").read_text())
        save_file(fused_weights(hf, read_config(payload), meta["params"]), str(payload / name / meta["param_file"]))
    results["timings_s"]["weights"] = round(time.perf_counter() - started, 2)
    prompt = np.random.default_rng(0).integers(0, config.vocab_size, PROMPT_TOKENS)

    models = {"torch-eager": TorchEager(model.to("cuda"))}
    for name, folder, device in (
        ("tvm-cuda", "decoder", "cuda"),
        ("tvm-cuda-graph", "decoder_graph", "cuda"),
        ("tvm-twin-cpu", "decoder", "cpu"),
    ):
        t0 = time.perf_counter()
        opened = _attempt(results, name, lambda f=folder, d=device: cuda_tvm_backend.PagedKVStepModel(payload / f, d))
        if opened is not None:
            models[name] = opened
            results["timings_s"][f"load_{name}"] = round(time.perf_counter() - t0, 3)
    results["fatbin_loads"] = dict(cuda_tvm_backend.FATBIN_SERVED)
    results["ort"] = _attempt(results, "ort", lambda: _ort(model, Path(args.work), results)) or {}
    if results["ort"].get("model") is not None:
        models["ort-cuda"] = results["ort"].pop("model")

    results["parity"] = _attempt(results, "parity", lambda: _parity(models, "torch-eager", prompt))
    twin = models.pop("tvm-twin-cpu", None)  # the CPU twin proves logits; its speed is not the point here
    del twin
    timed = {name: [] for name in models}
    for _ in range(args.rounds):
        for name, engine in models.items():  # interleaved: a drift of clocks hits every engine alike
            seconds = _attempt(results, f"decode {name}", lambda e=engine: _decode_seconds(e, prompt, args.new_tokens))
            if seconds is not None:
                timed[name].append(seconds)
    speed = {}
    for name, seconds in timed.items():
        if len(seconds) == args.rounds:
            speed[name] = {"decode_tok_s_median": args.new_tokens / median(seconds), "seconds": seconds}
    for name in speed:
        if name != "torch-eager" and "torch-eager" in speed:
            ratios = paired_ratios(speed["torch-eager"]["seconds"], speed[name]["seconds"])
            speed[name]["speedup_vs_torch_eager_median"] = median(ratios)
    results["decode"] = speed
    tvm_speedup = speed.get("tvm-cuda", {}).get("speedup_vs_torch_eager_median")
    results["goal"] = {
        "tvm_cuda_vs_torch_eager": tvm_speedup,
        "target": GOAL_SPEEDUP,
        "met": None if tvm_speedup is None else tvm_speedup >= GOAL_SPEEDUP,
    }
    results["timings_s"]["total"] = round(time.perf_counter() - started, 1)
    record = protocol(
        benchmark="gpu_check",
        payload=json.loads((payload / "payload.json").read_text()),
        prompt_tokens=PROMPT_TOKENS,
        new_tokens=args.new_tokens,
        rounds=args.rounds,
        weights="seeded random (torch.manual_seed(0)) of the payload's config",
    )
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"protocol": record, "results": results}, indent=2, default=str))
    print(json.dumps(results, indent=2, default=str))


def _ort(model, work: Path, results: dict) -> dict:
    """ORT CUDA on accelc's fused graph of the same weights, where onnxruntime-gpu is installed.
    Whether every node runs on CUDA (cpu_fallback refuse) is the question a GPU answers."""
    import onnxruntime as ort

    from accelc.runtime.cuda_ort_backend import (
        CUDA_PROVIDER,
        ORT_GPU_INSTALL,
        DeviceKVStepModel,
        cuda_session,
        runtime_config,
    )

    if CUDA_PROVIDER not in ort.get_available_providers():
        return {"skipped": f"onnxruntime {ort.__version__} has no CUDA provider ({ORT_GPU_INSTALL})"}
    from accelc.compiler import fused_decoder

    graph = fused_decoder.build(model.to("cpu").float(), work / "onnx")
    model.to("cuda")
    report: dict = {"onnxruntime": ort.__version__}
    for fallback in ("refuse", "shape_ops"):
        cfg = runtime_config(
            {"target": "decoder"},
            device_id=0,
            arena_extend_strategy="kSameAsRequested",
            cudnn_conv_algo_search="HEURISTIC",
            cpu_fallback=fallback,
            intra_op_threads=1,
            graph_optimization_level="all",
            memory_limit_mb=None,
            cuda_graph_asked=False,
        )
        session = _attempt(results, f"ort cpu_fallback={fallback}", lambda c=cfg: cuda_session(graph, c))
        report[f"cpu_fallback_{fallback}"] = "opened on CUDA" if session is not None else "refused"
        if session is not None:
            report["model"] = DeviceKVStepModel(session, "cuda", 0)
            report["cpu_fallback"] = fallback
            return report
    return report


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    sp = sub.add_parser("prepare", help="build the payload here (no GPU needed)")
    sp.add_argument("--payload", default=str(PAYLOAD))
    sp.add_argument("--model", help="a Llama/Qwen2 HF folder (default: the builtin smollm2-135m-instruct)")
    sp.add_argument("--arch", nargs="+", default=ARCHS)
    sp.set_defaults(func=prepare)
    sp = sub.add_parser("run", help="on the GPU machine: parity and decode speed, one JSON")
    sp.add_argument("--payload", default=str(PAYLOAD))
    sp.add_argument("--json", default=str(Path(os.environ.get("OUT", REPO / "reports")) / "gpu_check.json"))
    sp.add_argument("--work", default="/tmp/gpu_check")
    sp.add_argument("--new-tokens", type=int, default=64)
    sp.add_argument("--rounds", type=int, default=5)
    sp.set_defaults(func=run)
    sp = sub.add_parser("twin", help="here: the llvm twin's parity with torch on real SmolLM2 weights")
    sp.add_argument("--model", help="a Llama/Qwen2 HF folder (default: the builtin smollm2-135m-instruct)")
    sp.add_argument("--json", required=True)
    sp.set_defaults(func=twin)
    args = p.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
