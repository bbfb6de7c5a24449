"""cpu: lower a causal LM for CPU serving with ONNX Runtime, OpenVINO and/or Apache TVM (llvm).

ONNX Runtime runs the exported graph; what is lowered is its session configuration (threads,
graph optimisation level, spinning), recorded so the artifact runs exactly as validated.
OpenVINO (its CPU plugin is oneDNN) runs the same ONNX graph, compiled when opened: what is
lowered is its compile properties, checked against the installed plugin so a typo is exit 2.
TVM compiles the torch model of record through its Relax torch frontend into a VM library with
a KV cache, for the host CPU (detected: `-mcpu=native` is silently generic in TVM 0.27).
"""

from __future__ import annotations

import json
import os
from typing import Literal

from pydantic import Field, model_validator

from accelc.compiler import registry
from accelc.errors import UsageError


class OrtOptions(registry.Params):
    intra_op_threads: int = Field(0, ge=0, description="threads inside an op; 0 = one per physical core")
    inter_op_threads: int = Field(1, ge=0, description="threads across ops (sequential execution uses 1)")
    graph_optimization_level: Literal["disable", "basic", "extended", "all"] = "all"
    allow_spinning: bool = Field(
        False, description="spin-wait threads: faster on an idle machine, much slower when cores are shared"
    )
    # ORT's default spin (~2^20 pauses after every op) is what costs a shared machine; 20 us covers
    # the gap between one decode step's ops, so a dedicated machine keeps the whole gain (docs/peers.md)
    spin_duration_us: int | None = Field(
        None,
        ge=1,
        description="with allow_spinning: how long an idle thread spins before it sleeps "
        "(ORT's session.intra_op.spin_duration_us); unset: ORT's default, much longer",
    )
    kv_cache: Literal["auto", "copy"] = Field(
        "auto",
        description="auto: keep the KV cache in place for graphs "
        "that declare it (fused), else copy it each step; copy: always copy",
    )

    @model_validator(mode="after")
    def _spin_duration_needs_spinning(self):
        if self.spin_duration_us is not None and not self.allow_spinning:
            raise ValueError("spin_duration_us bounds spinning: set allow_spinning: true with it, or remove it")
        return self


class OpenVinoOptions(registry.Params):
    threads: int = Field(0, ge=0, description="INFERENCE_NUM_THREADS; 0 = the plugin's choice (the cores)")
    streams: int = Field(1, ge=1, description="NUM_STREAMS: parallel inference streams (batch 1 decoding uses 1)")
    performance_hint: Literal["LATENCY", "THROUGHPUT"] = Field("LATENCY", description="PERFORMANCE_HINT")
    pinning: bool = Field(
        False, description="ENABLE_CPU_PINNING: pins threads to cores; hurts when the cores are shared"
    )
    precision: Literal["f32", "bf16"] = Field(
        "f32",
        description="INFERENCE_PRECISION_HINT; f32 keeps parity with torch (a bf16-capable CPU otherwise "
        "computes in bf16); bf16 is faster there but needs looser eval.parity tolerances",
    )
    properties: dict[str, str | int | bool] = Field(
        default_factory=dict,
        description="further OpenVINO CPU properties by name (EXECUTION_MODE_HINT, KV_CACHE_PRECISION, ...)",
    )

    def compile_properties(self) -> dict[str, str | int | bool]:
        """The options as OpenVINO property names, what the runtime compiles with."""
        named = {
            "INFERENCE_NUM_THREADS": self.threads,
            "NUM_STREAMS": self.streams,
            "PERFORMANCE_HINT": self.performance_hint,
            "ENABLE_CPU_PINNING": self.pinning,
            "INFERENCE_PRECISION_HINT": self.precision,
        }
        clash = sorted(set(named) & set(self.properties))
        if clash:
            raise UsageError(
                f"targets: cpu openvino.properties sets {', '.join(clash)}, which its own options set; "
                "use the option (threads, streams, performance_hint, pinning, precision) instead"
            )
        return {**named, **self.properties}


class TvmOptions(registry.Params):
    mcpu: str = Field("auto", description="LLVM CPU name; auto = the host CPU as LLVM names it")
    num_threads: int = Field(0, ge=0, description="TVM runtime threads (TVM_NUM_THREADS); 0 = all cores")


@registry.register_target
class CpuTarget(registry.Target):
    """CPU artifacts: ONNX Runtime session config and/or a TVM llvm VM library."""

    kind = "cpu"
    version = 5  # cache key: bumped when the output changes for the same params (CHANGELOG.md)
    # an ONNX graph, a flow's blocks and a diffusion LM's denoiser lower to ORT only (their backends)
    families = ("causal_lm", "onnx", "tarflow", "diffusion_lm")

    class Params(registry.Params):
        backends: list[Literal["ort", "openvino", "tvm"]] = Field(default_factory=lambda: ["ort", "tvm"], min_length=1)
        ort: OrtOptions = Field(default_factory=OrtOptions)
        openvino: OpenVinoOptions = Field(default_factory=OpenVinoOptions)
        tvm: TvmOptions = Field(default_factory=TvmOptions)

    @classmethod
    def flow(cls, params):
        # ONNX Runtime and OpenVINO serve the exported graph; TVM compiles the torch checkpoint itself
        reads_graph = {"ort", "openvino"} & set(params.backends)
        return ("onnx_graph",) if reads_graph else (), cls.produces, cls.drops

    def lower(self, bundle, ctx):
        runtime = {}
        if "ort" in self.params.backends:
            runtime["ort"] = self._lower_ort(bundle, ctx)
        if "openvino" in self.params.backends:
            runtime["openvino"] = self._lower_openvino(bundle, ctx)
        if "tvm" in self.params.backends:
            runtime["tvm"] = self._lower_tvm(bundle, ctx)
        return runtime

    def _lower_ort(self, bundle, ctx):
        from accelc.families.base import get_family

        graphs = get_family(bundle.family).graph_roles(bundle)  # decode role -> graph role in the bundle
        if graphs["target"] not in bundle.graphs:
            raise UsageError(
                "the cpu target's ort backend needs an ONNX decoder: add `- type: export_onnx` "
                "to passes (or drop 'ort' from backends)"
            )
        import onnxruntime

        session = self.params.ort.model_dump()
        (ctx.workdir / "ort").mkdir()
        (ctx.workdir / "ort" / "session.json").write_text(json.dumps(session, indent=2))
        return {
            "graphs": graphs,
            "session": session,
            "onnxruntime": onnxruntime.__version__,
            "provider": "CPUExecutionProvider",
        }

    def _lower_openvino(self, bundle, ctx):
        from accelc.families.base import get_family
        from accelc.runtime.openvino_backend import OPENVINO, check_properties

        graphs = get_family(bundle.family).graph_roles(bundle)  # the graphs ORT reads: no second export
        if graphs["target"] not in bundle.graphs:
            raise UsageError(
                "the cpu target's openvino backend needs an ONNX decoder: add `- type: export_onnx` "
                "to passes (or drop 'openvino' from backends)"
            )
        OPENVINO.check()  # exit 3 with the pip command, before any work
        import openvino

        properties = self.params.openvino.compile_properties()
        check_properties(properties, "targets: cpu openvino")
        (ctx.workdir / "openvino").mkdir()
        (ctx.workdir / "openvino" / "properties.json").write_text(json.dumps(properties, indent=2))
        return {"graphs": graphs, "properties": properties, "openvino": openvino.__version__, "device": "CPU"}

    def _lower_tvm(self, bundle, ctx):
        from accelc.compiler.pruning.materialize import check_uniform_kv
        from accelc.families.base import get_family
        from accelc.families.causal_lm import load_model
        from accelc.runtime.tvm_backend import import_tvm

        import_tvm()  # a missing TVM is exit 3 with the pip command, before any work
        from accelc.targets import tvm_build

        target = tvm_build.host_llvm_target()
        if self.params.tvm.mcpu != "auto":
            target = {**target, "mcpu": self.params.tvm.mcpu}
        trust = bool(bundle.source.get("trust_remote_code"))
        # Graphs that ship with the artifact (ORT or OpenVINO reads them) can hold TVM's weights
        graphs = (
            get_family(bundle.family).graph_roles(bundle) if {"ort", "openvino"} & set(self.params.backends) else {}
        )
        dirs, metas, lowered, weights_in = {}, {}, {}, {}
        for role, checkpoint in bundle.checkpoints().items():
            name = "target" if role == "decoder" else role
            if checkpoint in lowered:  # a draft made from the target's own weights: one library serves both
                dirs[name], metas[name] = dirs[lowered[checkpoint]], metas[lowered[checkpoint]]
                if lowered[checkpoint] in weights_in:
                    weights_in[name] = weights_in[lowered[checkpoint]]
                continue
            lowered[checkpoint] = name
            dirs[name] = f"tvm/{name}"
            model = load_model(checkpoint, trust)
            check_uniform_kv(model, "the cpu target's tvm backend")
            graph_role = graphs.get(name)
            metas[name] = tvm_build.lower_causal_lm(
                model, ctx.workdir / dirs[name], target, weights_graph=bundle.graphs.get(graph_role)
            )
            if metas[name]["params_in_graph"]:
                weights_in[name] = graph_role
        threads = self.params.tvm.num_threads or os.cpu_count()
        return {"dirs": dirs, "target": target, "num_threads": threads, "meta": metas, "weights_graph": weights_in}
