"""cuda: lower a causal LM for NVIDIA GPUs with Apache TVM and/or ONNX Runtime's CUDA provider.

TVM: the model is rewritten as TVM's paged-KV decoder (targets/tvm_nn_llm.py, the way MLC-LLM
deploys LLMs) and compiled with dlight's GPU schedules for the oldest listed architecture; the
kernels are then compiled ahead of time by nvcc into one fatbin for every listed architecture
(targets/tvm_nn_build.py). The same module is also built for llvm, the CPU twin, which the
artifact's validation runs on a machine without a GPU (backend `tvm-twin`): it proves the graph,
the paged cache and the weights; the CUDA kernels themselves are checked on a GPU by
benchmarks/gpu_check.py.

ONNX Runtime: the exported graph runs on the CUDA provider; what is lowered is the session
configuration (provider options, the arena strategy, memory limit, whether CPU fallback is
refused), which the runtime (runtime/cuda_ort_backend.py) applies and checks at load.
"""

from __future__ import annotations

import json
from typing import Literal

from pydantic import Field, field_validator

from accelc.compiler import registry
from accelc.errors import UsageError
from accelc.targets.tvm_nn_build import DEFAULT_ARCHS, arch_error


class TvmCudaOptions(registry.Params):
    aot: Literal["auto", "require", "off"] = Field(
        "auto",
        description="kernels compiled ahead of time into a fatbin by nvcc: auto = when nvcc is installed "
        "(pip install nvidia-cuda-nvcc), require = fail without it, off = CUDA source compiled at load",
    )
    prefill_chunk_size: int = Field(512, ge=16, le=16384, description="most tokens one prefill call takes")
    page_size: int = Field(16, ge=8, le=128, description="positions per page of the paged KV cache")


class OrtCudaOptions(registry.Params):
    device_id: int = Field(0, ge=0, description="the GPU the session runs on")
    arena_extend_strategy: Literal["kSameAsRequested", "kNextPowerOfTwo"] = Field(
        "kSameAsRequested", description="kSameAsRequested keeps the growing KV cache from doubling the arena"
    )
    cudnn_conv_algo_search: Literal["HEURISTIC", "DEFAULT", "EXHAUSTIVE"] = Field(
        "HEURISTIC", description="EXHAUSTIVE benchmarks convolutions on first run (a decoder has none)"
    )
    cpu_fallback: Literal["refuse", "shape_ops"] = Field(
        "refuse",
        description="refuse: every node on CUDA (session.disable_cpu_ep_fallback); shape_ops: the CPU provider "
        "may take what CUDA declines; either way the session's first provider must be CUDA",
    )
    intra_op_threads: int = Field(1, ge=0, description="host threads for what runs on the CPU")
    graph_optimization_level: Literal["disable", "basic", "extended", "all"] = "all"


@registry.register_target
class CudaTarget(registry.Target):
    """NVIDIA GPU artifacts: a TVM paged-KV decoder (fatbin kernels) and/or ONNX Runtime CUDA session config."""

    kind = "cuda"
    version = 1  # cache key: bumped when the output changes for the same params (CHANGELOG.md)
    families = ("causal_lm",)

    class Params(registry.Params):
        backends: list[Literal["tvm", "ort"]] = Field(default_factory=lambda: ["tvm", "ort"], min_length=1)
        architectures: list[str] = Field(
            default_factory=lambda: list(DEFAULT_ARCHS),
            min_length=1,
            description="CUDA architectures the kernels are built for (sm_75 or newer)",
        )
        memory_limit_mb: int | None = Field(
            None, ge=64, description="GPU memory the artifact may use (ORT's gpu_mem_limit; TVM's KV cache size)"
        )
        cuda_graphs: bool = Field(False, description="capture TVM's decode as one CUDA graph (launch overhead)")
        tvm: TvmCudaOptions = Field(default_factory=TvmCudaOptions)
        ort: OrtCudaOptions = Field(default_factory=OrtCudaOptions)

        @field_validator("architectures")
        @classmethod
        def _known(cls, value: list[str]) -> list[str]:
            for name in value:
                problem = arch_error(name)
                if problem:
                    raise ValueError(problem)
            if len(set(value)) != len(value):
                raise ValueError(f"architectures lists one twice: {value}")
            return value

    @classmethod
    def flow(cls, params):
        return ("onnx_graph",) if "ort" in params.backends else (), cls.produces, cls.drops

    def lower(self, bundle, ctx):
        runtime = {}
        if "tvm" in self.params.backends:
            runtime.update(self._lower_tvm(bundle, ctx))
        if "ort" in self.params.backends:
            runtime["cuda-ort"] = self._lower_ort(bundle, ctx)
        return runtime

    def _lower_tvm(self, bundle, ctx):
        from accelc.runtime.tvm_backend import import_tvm

        import_tvm()  # a missing TVM is exit 3 with the pip command, before any work
        from accelc.targets.tvm_nn_build import lower_decoder

        dirs, built, metas = {}, {}, {}
        for role, checkpoint in bundle.checkpoints().items():
            name = "target" if role == "decoder" else role
            if checkpoint in built:  # a draft made from the target's own weights: one decoder serves both
                dirs[name] = dirs[built[checkpoint]]
                continue
            built[checkpoint] = name
            dirs[name] = f"tvm/{name}"
            meta = lower_decoder(
                checkpoint,
                ctx.workdir / dirs[name],
                architectures=self.params.architectures,
                cuda_graph=self.params.cuda_graphs,
                aot=self.params.tvm.aot,
                prefill_chunk_size=self.params.tvm.prefill_chunk_size,
                page_size=self.params.tvm.page_size,
            )
            metas[name] = {k: meta[k] for k in ("target", "architectures", "fatbin", "nvcc", "tvm_version")}
        shared = {"dirs": dirs, "memory_limit_mb": self.params.memory_limit_mb}
        cuda = {**shared, "architectures": self.params.architectures, "cuda_graph": self.params.cuda_graphs}
        return {"cuda-tvm": {**cuda, "meta": metas}, "tvm-twin": shared}

    def _lower_ort(self, bundle, ctx):
        from accelc.families.base import get_family
        from accelc.runtime.cuda_ort_backend import runtime_config

        graphs = get_family(bundle.family).graph_roles(bundle)
        if graphs["target"] not in bundle.graphs:
            raise UsageError(
                "the cuda target's ort backend needs an ONNX decoder: add `- type: export_onnx` "
                "to passes (or drop 'ort' from backends)"
            )
        o = self.params.ort
        config = runtime_config(
            graphs,
            device_id=o.device_id,
            arena_extend_strategy=o.arena_extend_strategy,
            cudnn_conv_algo_search=o.cudnn_conv_algo_search,
            cpu_fallback=o.cpu_fallback,
            intra_op_threads=o.intra_op_threads,
            graph_optimization_level=o.graph_optimization_level,
            memory_limit_mb=self.params.memory_limit_mb,
            cuda_graph_asked=self.params.cuda_graphs,
        )
        (ctx.workdir / "ort").mkdir()
        (ctx.workdir / "ort" / "session.json").write_text(json.dumps(config, indent=2))
        return config
