"""The `fpga` target on a causal LM: its q/k/v/o and MLP projections as int8 VTA streams.

Each projection is a dense layer on one token (targets/vta_lower.py lowers it as the 1x1 image
of a 1x1 convolution), quantised per tensor with power-of-two scales on the recipe's calibration
text (targets/lm_quantize.py). A projection's weights (SmolLM2-135M: 0.3 to 0.9 MB each, against
a 256 KB weight buffer) are streamed through the weight buffer tile by tile, double buffered, for
every token. Everything else runs on the host, in fp32, for the reasons `HOST_OPS` records in the
placement report. The proof (families/causal_lm_fpga.py) checks every stream bit for bit against
the int32 reference, then measures greedy tokens and perplexity of the offloaded model against
fp32 with that reference.
"""

from __future__ import annotations

import json

from accelc import progress
from accelc.runtime import cnn_fabric
from accelc.targets.fpga import write_stream

HOST_OPS = {
    "embed_tokens": "a table lookup (no MACs)",
    "rms_norm": "a mean of squares, a reciprocal square root and a division: not MIN, MAX, ADD or SHR (the ALU's ops)",
    "rotary_embedding": "a per-position sine/cosine rotation of q and k: products by a table the GEMM core has no "
    "operand for",
    "attention": "QK^T and PV multiply two activations (the KV cache grows every token; the GEMM core takes "
    "a stationary weight operand) and the softmax between them needs exp and a division",
    "silu_gate": "SiLU needs exp and a division",
    "residual_add": "the residual stream's outliers do not fit one int8 exponent; kept in fp32",
    "lm_head": "the vocabulary projection decides the greedy token and the perplexity: kept in fp32 rather "
    "than cut to one int8 output exponent",
}


def lower_projections(params, bundle, ctx, vta) -> dict:
    from accelc.data import calibration_windows
    from accelc.families.causal_lm import load_model, load_tokenizer
    from accelc.targets.lm_quantize import quantise
    from accelc.targets.vta_lower import Shape, lower_layer

    model = load_model(bundle.model_dir)
    tokenizer = load_tokenizer(bundle.model_dir)
    calibration = ctx.recipe.data.calibration
    windows = calibration_windows(
        tokenizer, calibration, window=params.calibration_window, max_windows=params.calibration_windows
    )
    with progress.step(f"int8 calibration of the projections on {len(windows)} windows of {calibration}"):
        int8 = quantise(model, windows)
    int8.save(ctx.workdir / cnn_fabric.INT8_DIR)
    (ctx.workdir / cnn_fabric.CONFIG).write_text(json.dumps(vta.to_json(), indent=1))

    entries = []
    for step in progress.bar(int8.steps, desc="lower projections to VTA streams"):
        w, b = int8.weights[step["layer"]]
        cout, cin = w.shape
        entry = {"layer": step["layer"], "op": "linear", "name": step["name"], "in_shape": [cin],
                 "out_shape": [cout], "macs": cin * cout}  # fmt: skip
        stream = lower_layer(
            w, b, step["shift"], step["low"], Shape(cin, cout, 1, 1, 1, 0, channel_shifts=True), vta, step["name"]
        )
        files = write_stream(ctx.workdir, entry, stream)
        entries.append(
            {**entry, "where": "fabric", "files": files, "tiling": stream.tiling.to_json(), "instructions": stream.counts,
             "weight_bytes": int(stream.wgt.size), "dram_elements": {"inp": stream.inp_elems, "out": stream.out_elems}}
        )  # fmt: skip
    config = model.config
    head = config.hidden_size * config.vocab_size
    fabric = sum(e["macs"] for e in entries)
    placement = {
        "flavour": params.flavour,
        "config_tag": vta.tag,
        "family": "causal_lm",
        "steps": entries,
        "host": [{"op": op, "reason": why} for op, why in HOST_OPS.items()],
        "macs": {
            "per_token_projections": fabric,
            "fabric": fabric,
            "fabric_fraction": 1.0 if fabric else 0.0,
            "head_on_host": head,
            "fabric_fraction_with_head": fabric / (fabric + head),
            "attention_on_host_per_context_token": 2 * config.num_hidden_layers * config.hidden_size,
        },
        "weight_bytes_streamed_per_token": sum(e["weight_bytes"] for e in entries),
    }
    (ctx.workdir / cnn_fabric.PLACEMENT).write_text(json.dumps(placement, indent=1))
    progress.status(
        f"fpga: {len(entries)} projections ({fabric:,} MACs per token, {fabric / (fabric + head):.1%} with the head) "
        f"on the {vta.tag} fabric; {placement['weight_bytes_streamed_per_token'] / 1e6:.1f} MB of weights per token"
    )
    return {}  # no runtime backend: the proof reads the target's params and this folder
