"""How a causal LM's fabric projections are proved: bit for bit, then tokens and perplexity.

1. Bit-exactness: the prefill of the first `simulate_prompts` prompts runs with every projection
   executed by the VTA simulator from the artifact's binary streams (runtime/vta_sim.py), each
   output compared with the int32 numpy reference on the same int8 input; the simulator's output
   is what the model then continues with. The artifact is refused (exit 5) on any difference.
   The simulator's cycle estimate of each stream (one token) summed over the projections is the
   fabric's cycles per token.
2. Quality: simulating every token of long texts in numpy is slow, so greedy decoding of the
   prompts and perplexity on the held-out text (`data.evaluation`) run the offloaded model with
   the int32 reference, which step 1 proved equal to the simulator, against the fp32 model.
Written to `reports/fpga.json` and the manifest's metrics.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from accelc import progress
from accelc.runtime import cnn_fabric
from accelc.runtime.lm_fabric import Offload, reference


def greedy(model, ids: list[int], tokens: int) -> list[int]:
    """`tokens` greedy tokens after `ids` (no early stop, so both models give as many)."""
    import torch

    eos = model.config.eos_token_id
    with torch.inference_mode():
        out = model.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            do_sample=False,
            max_new_tokens=tokens,
            min_new_tokens=tokens,
            pad_token_id=(eos[0] if isinstance(eos, list) else eos) or 0,
        )
    return out[0, len(ids) :].tolist()


def simulate(fabric: cnn_fabric.FabricModel, model, prompts: list[list[int]]) -> dict:
    """Prefill `prompts` with every projection on the simulator; mismatching tokens per projection
    and each stream's statistics (per token)."""
    import torch

    entries = {e["layer"]: e for e in fabric.placement["steps"]}
    ref = reference(fabric.model)
    mismatched: dict[str, int] = {}
    stats: dict[int, dict] = {}
    bar = progress.bar(total=len(entries) * len(prompts), desc="VTA simulator: projections")

    def on_fabric(step: dict, x_q: np.ndarray) -> np.ndarray:
        y, s = fabric.run_fabric(entries[step["layer"]], x_q)
        stats[step["layer"]] = s.to_json()
        bad = int(np.any(y != ref(step, x_q), axis=1).sum())
        if bad:
            mismatched[step["name"]] = mismatched.get(step["name"], 0) + bad
        bar.update()
        return y

    with Offload(model, fabric.model, on_fabric), torch.inference_mode():
        for ids in prompts:
            model(torch.tensor([ids]))
    bar.close()
    return {"mismatched": mismatched, "stats": stats, "tokens": sum(len(p) for p in prompts)}


def prove(directory: Path, recipe, manifest: dict) -> tuple[dict, bool]:
    from accelc.compiler.evaluation import perplexity
    from accelc.data import load_text
    from accelc.families.causal_lm import encode_prompt, load_model, load_tokenizer
    from accelc.runtime.artifact import HF_DIRS
    from accelc.runtime.torch_backend import TorchStepModel

    target = next(t for t in manifest["targets"] if t["kind"] == "fpga")
    params = target["params"]
    fabric = cnn_fabric.FabricModel(directory / target["dir"])
    model = load_model(directory / HF_DIRS["target"])
    tokenizer = load_tokenizer(directory / HF_DIRS["target"])
    prompts = [encode_prompt(tokenizer, p, chat_template=False) for p in params["prompts"]]

    sim = simulate(fabric, model, prompts[: params["simulate_prompts"]])
    bit_exact = not sim["mismatched"]
    ref = reference(fabric.model)
    tokens = {"fp32": [], "int8": []}
    for ids in progress.bar(prompts, desc="greedy tokens: fp32 and int8 fabric (reference)", unit="prompt"):
        tokens["fp32"].append(greedy(model, ids, params["greedy_tokens"]))
        with Offload(model, fabric.model, ref):
            tokens["int8"].append(greedy(model, ids, params["greedy_tokens"]))
    same = [np.asarray(a) == np.asarray(b) for a, b in zip(tokens["fp32"], tokens["int8"])]
    first_difference = [int(np.argmin(s)) if not s.all() else len(s) for s in same]

    text = load_text(recipe.data.evaluation)

    def score() -> dict:  # the model as it is now: fp32, or offloaded
        return perplexity(TorchStepModel(model), tokenizer, text, text_name=recipe.data.evaluation, window=512,
                          stride=512, max_windows=params["perplexity_windows"])  # fmt: skip

    ppl = {"fp32": score()}
    with Offload(model, fabric.model, ref):
        ppl["int8_fabric"] = score()
    cycles = sum(s["cycles"] for s in sim["stats"].values())
    clock = fabric.config.clock_mhz
    rows = []
    for entry in fabric.placement["steps"]:
        s = sim["stats"][entry["layer"]]
        rows.append(
            {"name": entry["name"], "in": entry["in_shape"][0], "out": entry["out_shape"][0], "macs": entry["macs"],
             "tiling": entry["tiling"], "instructions": s["instructions"], "cycles": s["cycles"], "busy": s["busy"],
             "weight_bytes": entry["weight_bytes"],
             "gemm_utilisation": round(entry["macs"] / max(s["cycles"], 1) / fabric.config.block**2, 4)}
        )  # fmt: skip
    report = {
        "config_tag": fabric.placement["config_tag"],
        "clock_mhz": clock,
        "bit_exact": bit_exact,
        "bit_exact_protocol": f"every projection on the simulator for the prefill of {params['simulate_prompts']} "
        f"prompt(s), {sim['tokens']} tokens, each output against the int32 reference; the greedy tokens and the "
        "perplexity use that int32 reference",
        "simulated_tokens": sim["tokens"],
        "mismatched_tokens_by_projection": sim["mismatched"],
        "greedy": {
            "prompts": params["prompts"],
            "tokens_per_prompt": params["greedy_tokens"],
            "agreement": float(np.mean(np.concatenate(same))),
            "first_difference": first_difference,
            "fp32": [tokenizer.decode(t) for t in tokens["fp32"]],
            "int8_fabric": [tokenizer.decode(t) for t in tokens["int8"]],
        },
        "perplexity": {**ppl, "ratio": ppl["int8_fabric"]["ppl"] / ppl["fp32"]["ppl"]},
        "fabric_mac_fraction": fabric.placement["macs"]["fabric_fraction"],
        "macs_per_token": fabric.placement["macs"],
        "weight_bytes_streamed_per_token": fabric.placement["weight_bytes_streamed_per_token"],
        "cycles_per_token": cycles,
        "latency_ms_per_token": cycles / (clock * 1e3),
        "host": fabric.placement["host"],
        "projections": rows,
    }
    reports = directory / "reports"
    reports.mkdir(exist_ok=True)
    (reports / "fpga.json").write_text(json.dumps(report, indent=1))
    metrics = {
        "bit_exact": bit_exact,
        "greedy_agreement": report["greedy"]["agreement"],
        "ppl_ratio": report["perplexity"]["ratio"],
        "fabric_mac_fraction": report["fabric_mac_fraction"],
        "cycles_per_token": cycles,
    }
    progress.status(
        f"fpga proof: bit-exact {bit_exact} on {sim['tokens']} simulated tokens; greedy agreement "
        f"{metrics['greedy_agreement']:.3f}; perplexity {ppl['int8_fabric']['ppl']:.3f} vs fp32 {ppl['fp32']['ppl']:.3f} "
        f"(x{metrics['ppl_ratio']:.3f}); {cycles:,} cycles per token = {report['latency_ms_per_token']:.1f} ms at {clock} MHz"
    )
    if not bit_exact:
        metrics["failure"] = (
            f"the VTA simulator differs from the int32 reference at {sorted(sim['mismatched'])[:3]} (reports/fpga.json)"
        )
    return metrics, bit_exact
