"""fpga: lower a CNN to int8 VTA instruction streams, with the placement of every layer.

Flavour `vta` (Moreau et al., arXiv 1807.04188): the model is quantised to int8 with
power-of-two scales on real training images (targets/cnn_quantize.py), every conv2d and linear
layer is lowered to a stream of 128-bit instructions, 32-bit micro-ops and DRAM images for the
configured bitstream (targets/vta_lower.py; default the PYNQ `1x16_i8w8a32_15_15_18_17`), a max
pooling right after a conv2d runs in that conv2d's stream, and the rest (flatten, a ReLU not
fused into its layer, a pooling that cannot be fused) stays on the host. The artifact's
`targets/fpga/` holds `vta_config.json`, `int8/` (the int8 model the host runs),
`layers/L<i>.{insn,uop,wgt,acc}.bin` and `placement.json` (each step on the fabric or the host
and why, with its MACs, tiling and instruction counts); the manifest checksums every file, so a
damaged stream is refused before it runs. The family proves it (families/cnn.py): the simulator
against the int32 reference, bit for bit.
"""

from __future__ import annotations

import json
from typing import Literal

from pydantic import Field

from accelc import progress
from accelc.compiler import registry
from accelc.errors import UsageError

FABRIC_OPS = ("conv2d", "linear")
HOST_REASONS = {
    "max_pool2d": "max pooling not after a fabric conv2d whose output it divides (fused pooling is the ALU's MAX)",
    "flatten": "a layout change on the host",
    "relu": "a ReLU not after a conv2d/linear (fused ReLUs are the fabric's clip)",
}


def write_stream(workdir, entry: dict, stream) -> dict[str, str]:
    """Write a fabric layer's stream and DRAM images; return their artifact-relative names."""
    from accelc.runtime import cnn_fabric

    files = cnn_fabric.layer_files(entry)
    (workdir / cnn_fabric.LAYER_DIR).mkdir(exist_ok=True)
    (workdir / files["insn"]).write_bytes(stream.insns)
    (workdir / files["uop"]).write_bytes(stream.uops)
    (workdir / files["wgt"]).write_bytes(stream.wgt.tobytes())
    (workdir / files["acc"]).write_bytes(stream.acc.astype("<i4").tobytes())
    return files


LM_PROMPTS = (
    "The capital of France is",
    "Once upon a time, in a small village,",
    "The three primary colours are",
    "To make a cup of tea, first",
    "Photosynthesis is the process by which",
    "The quick brown fox",
    "In 1969, the first humans",
    "def fibonacci(n):",
)


@registry.register_target
class FpgaTarget(registry.Target):
    """FPGA artifacts: int8 VTA instruction streams, DRAM images and a per-layer placement report."""

    kind = "fpga"
    version = 2
    families = ("cnn", "causal_lm")
    reads = ("data.calibration",)  # a causal LM's calibration text

    class Params(registry.Params):
        flavour: Literal["vta", "hls4ml"] = Field(
            "vta",
            description="vta: instruction streams for VTA's overlay (CNNs, causal LMs); hls4ml: a Vitis HLS project "
            "of a small CNN written by hls4ml, its C simulation compiled with g++ (pip install 'accelc[hls4ml]')",
        )
        config: str | None = Field(
            None, description="a vta_config.json (relative to the recipe); default: the PYNQ 1x16_i8w8a32_15_15_18_17"
        )
        calibration_images: int = Field(
            512, ge=1, le=60000, description="Fashion-MNIST training images for calibration"
        )
        host_layers: list[int] = Field(default_factory=list, description="conv2d/linear layer indices kept on the host")
        fabric_layers: list[int] = Field(
            default_factory=list, description="layer indices that must run on the fabric (refused if they cannot)"
        )
        eval_images: int = Field(
            10000,
            ge=1,
            le=10000,
            description="Fashion-MNIST test images fp32 and the int8 reference classify in the proof",
        )
        fuse_pooling: bool = Field(
            True, description="run a max_pool2d after a fabric conv2d on the ALU (MAX over each window) in its stream"
        )
        prove_images: int = Field(
            1000, ge=1, le=10000, description="of those, the images the VTA simulator runs (and checks bit for bit)"
        )
        calibration_windows: int = Field(
            8, ge=1, le=256, description="causal LM: windows of data.calibration for the projections' int8 calibration"
        )
        calibration_window: int = Field(512, ge=16, le=8192, description="causal LM: tokens per calibration window")
        prompts: list[str] = Field(
            default_factory=lambda: list(LM_PROMPTS),
            min_length=1,
            description="causal LM: prompts whose greedy tokens fp32 and the offloaded model generate in the proof",
        )
        greedy_tokens: int = Field(16, ge=1, le=512, description="causal LM: greedy tokens generated per prompt")
        simulate_prompts: int = Field(
            1, ge=1, description="causal LM: prompts whose prefill runs every projection through the VTA simulator"
        )
        perplexity_windows: int = Field(
            4, ge=1, le=256, description="causal LM: 512-token windows of data.evaluation scored in the proof"
        )
        synthesise: bool = Field(
            False,
            description="hls4ml: also run the vendor build (C synthesis, IP export, Vivado synthesis); needs "
            "AMD Vitis (vitis-run on PATH)",
        )

    def _fusable_pool(self, steps: list[dict], n: int, conv_out: tuple) -> int:
        """The kernel of a max_pool2d right after conv2d step `n` that its stream can do, else 0."""
        if not self.params.fuse_pooling or steps[n]["op"] != "conv2d" or n + 1 == len(steps):
            return 0
        nxt = steps[n + 1]
        if nxt["op"] != "max_pool2d" or nxt["layer"] in self.params.host_layers:
            return 0
        k = nxt["kernel"]
        return k if conv_out[1] % k == 0 and conv_out[2] % k == 0 else 0

    @classmethod
    def files(cls, params) -> tuple[str, ...]:
        return (params.config,) if params.config else ()

    def lower(self, bundle, ctx):
        from accelc.runtime.vta_config import DEFAULT, VTAConfig

        if self.params.flavour == "hls4ml":
            if bundle.family != "cnn":
                raise UsageError(
                    f"targets: fpga flavour hls4ml takes CNN classifiers, not a {bundle.family} model "
                    "(hls4ml 1.3 mis-handles token-wise Linear and row softmax); use flavour vta"
                )
            from accelc.targets.fpga_hls4ml import lower_hls4ml

            return lower_hls4ml(self.params, bundle, ctx, self._calibrated(bundle, ctx))
        vta = VTAConfig.read(ctx.resolve(self.params.config)) if self.params.config else DEFAULT
        if bundle.family == "causal_lm":
            from accelc.targets.fpga_lm import lower_projections

            return lower_projections(self.params, bundle, ctx, vta)
        return self._lower_cnn(bundle, ctx, vta)

    def _calibrated(self, bundle, ctx):
        """A CNN's config, fp32 model and int8 program (calibrated, and saved into the target's folder)."""
        from accelc.families import cnn_model
        from accelc.runtime import cnn_fabric
        from accelc.targets.cnn_quantize import quantise

        p = self.params
        config, model = cnn_model.load(bundle.model_dir)
        with progress.step(f"int8 calibration on {p.calibration_images} Fashion-MNIST training images"):
            images, _ = cnn_model.fashion_mnist_inputs(config.input, "train", p.calibration_images)
            int8 = quantise(config, model, images)
        int8.save(ctx.workdir / cnn_fabric.INT8_DIR)
        return config, model, int8

    def _lower_cnn(self, bundle, ctx, vta):
        from accelc.families import cnn_model
        from accelc.runtime import cnn_fabric
        from accelc.targets.vta_lower import Shape, lower_layer

        p = self.params
        n_layers = len(cnn_model.read_config(bundle.model_dir).layers)
        for name, indices in (("host_layers", p.host_layers), ("fabric_layers", p.fabric_layers)):
            bad = [i for i in indices if not 0 <= i < n_layers]
            if bad:
                raise UsageError(f"targets: fpga {name} {bad}: the model has layers 0..{n_layers - 1}")
        config, _, int8 = self._calibrated(bundle, ctx)
        (ctx.workdir / cnn_fabric.CONFIG).write_text(json.dumps(vta.to_json(), indent=1))

        shapes, macs = config.shapes(), config.macs()
        entries = []
        fused: dict[int, int] = {}  # pooling layer -> the conv2d whose stream does it
        steps = int8.steps
        for n, step in enumerate(progress.bar(steps, desc="lower layers to VTA streams")):
            i, op = step["layer"], step["op"]
            entry = {
                "layer": i,
                "op": op,
                "in_shape": list(shapes[i]),
                "out_shape": list(shapes[i + 1]),
                "macs": macs[i],
            }
            forced = i in p.fabric_layers
            if i in fused:
                entries.append({**entry, "where": "fabric", "fused_into": fused[i],
                                "reason": f"fused into layer {fused[i]}'s stream: ALU MAX over each window"})  # fmt: skip
                continue
            if op not in FABRIC_OPS:
                if forced:
                    raise UsageError(
                        f"targets: fpga fabric_layers: layer {i} is {op}, which the VTA fabric cannot run here "
                        f"(it runs {', '.join(FABRIC_OPS)} with a fused ReLU, and max_pool2d fused after a conv2d)"
                    )
                entries.append({**entry, "where": "host", "reason": HOST_REASONS[op]})
                continue
            if i in p.host_layers:
                if forced:
                    raise UsageError(f"targets: fpga layer {i} is in both host_layers and fabric_layers")
                entries.append({**entry, "where": "host", "reason": "kept on the host by host_layers"})
                continue
            layer = config.layers[i]
            c, h, w = shapes[i] if op == "conv2d" else (shapes[i][0], 1, 1)
            k, pad = (layer["kernel"], layer["padding"]) if op == "conv2d" else (1, 0)
            pool = self._fusable_pool(steps, n, shapes[i + 1])
            if pool:
                fused[steps[n + 1]["layer"]] = i
                entry.update(
                    pool=pool, pool_layer=steps[n + 1]["layer"], out_shape=list(shapes[steps[n + 1]["layer"] + 1])
                )
            shape = Shape(c, shapes[i + 1][0], h, w, k, pad, pool or 1)
            weight, bias = int8.weights[i]
            where = f"layer {i} ({op} {c}->{shape.cout})"
            stream = lower_layer(weight, bias, step["shift"], step["low"], shape, vta, where)
            files = write_stream(ctx.workdir, entry, stream)
            entries.append(
                {**entry, "where": "fabric", "files": files, "tiling": stream.tiling.to_json(), "instructions": stream.counts,
                 "dram_elements": {"inp": stream.inp_elems, "out": stream.out_elems}}
            )  # fmt: skip
        total = sum(macs)
        fabric = sum(e["macs"] for e in entries if e["where"] == "fabric")
        placement = {
            "flavour": p.flavour,
            "config_tag": vta.tag,
            "input_exp": int8.input_exp,
            "steps": entries,
            "macs": {"total": total, "fabric": fabric, "fabric_fraction": fabric / total if total else 0.0},
        }
        (ctx.workdir / cnn_fabric.PLACEMENT).write_text(json.dumps(placement, indent=1))
        progress.status(f"fpga: {fabric / max(total, 1):.1%} of {total:,} MACs per image on the {vta.tag} fabric")
        proof = {"eval_images": p.eval_images, "prove_images": min(p.prove_images, p.eval_images)}
        return {"vta_sim": {"flavour": p.flavour, "config_tag": vta.tag, **proof}}
