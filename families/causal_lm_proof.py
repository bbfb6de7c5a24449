"""How a causal-LM artifact is proved: parity, perplexity and a benchmark, each a report.

Parity first (every lowered backend, and the draft where there is one, against the torch model
of record, then the decode plan's tokens), since a quality or speed figure of a wrong model
means nothing; then perplexity on held-out text against torch (and the dense source model for
pruned ones); then the benchmark, after the validation models are freed.
"""

from __future__ import annotations

import json
from pathlib import Path

from accelc import progress
from accelc.runtime.artifact import HF_DIRS


def prove(directory: Path, recipe, manifest: dict) -> tuple[dict, bool]:
    """Validation, evaluation and benchmark of a (provisional) artifact; writes reports/."""
    from accelc.runtime.artifact import Artifact

    art = Artifact(directory)
    reports = directory / "reports"
    reports.mkdir(exist_ok=True)
    metrics: dict = {}
    torch_model = art.torch_model()
    tokenizer = art.tokenizer
    # a GPU backend compiled on a machine without one is proved by its CPU twin (tvm-twin) here
    skipped = {b: art.backend(b).unavailable() for b in art.backends() if b != "torch"}
    skipped = {b: why for b, why in skipped.items() if why}
    lowered = [b for b in art.backends() if b != "torch" and b not in skipped]
    if skipped:
        metrics["not_validated"] = skipped
    step_models = {b: art.step_model(b) for b in lowered}

    from accelc.compiler.validation import validate, validate_plan

    report = validate(torch_model, tokenizer, step_models, recipe.eval.parity)
    # the draft's graphs are lowered too: hold them to the same parity against the torch draft,
    # except a compressed draft graph (8/4-bit weights, truncated head), which differs by design;
    # output never depends on draft numerics, and the decode plan is checked below
    compressed = manifest["graph_meta"].get("draft", {}).get("compression")
    # the backends that run the ONNX graphs (ORT, OpenVINO) hold the compressed draft graph itself
    on_graphs = [b for b in lowered if "graphs" in art.backends()[b]["runtime"]]
    if "draft" not in art.roles() and compressed:  # made from the target's own weights: no torch draft
        why = f"compressed draft graph of the target's weights: {compressed}"
        report["draft"] = {"not_compared": dict.fromkeys(on_graphs, why)}
    elif "draft" in art.roles():
        drafts = {b: art.step_model(b, "draft") for b in lowered if not (compressed and b in on_graphs)}
        report["draft"] = validate(art.torch_model("draft"), tokenizer, drafts, recipe.eval.parity)
        if compressed:
            report["draft"]["not_compared"] = dict.fromkeys(on_graphs, f"compressed draft graph: {compressed}")
        report["verdict"] = "pass" if report["verdict"] == report["draft"]["verdict"] == "pass" else "fail"
    # any loop but autoregressive decoding itself (draft-free ones too: jacobi, lookahead) must
    # reproduce the greedy tokens on every backend
    if art.plan.strategy not in ("greedy", "sample") and recipe.eval.parity.greedy_tokens:
        report["decode_plan"] = validate_plan(art, report["cases"], eos=art.eos_ids)
        if report["decode_plan"]["verdict"] != "pass":
            report["verdict"] = "fail"
    (reports / "validation.json").write_text(json.dumps(report, indent=2))
    metrics["validation"] = {name: v["verdict"] for name, v in report["backends"].items()}
    metrics["max_abs_diff"] = {name: v["max_abs_diff"] for name, v in report["backends"].items()}
    if "decode_plan" in report:
        metrics["validation"]["decode_plan"] = report["decode_plan"]["verdict"]
    if report["verdict"] != "pass":
        failed = [n for n, v in report["backends"].items() if v["verdict"] != "pass"]
        metrics["failure"] = f"parity/greedy mismatch on backend(s) {', '.join(failed)} (reports/validation.json)"
        return metrics, False

    if any(t["kind"] == "fpga" for t in manifest["targets"]):  # projections on the fabric
        from accelc.families.causal_lm_fpga import prove as prove_fabric

        metrics["fpga"], fabric_ok = prove_fabric(directory, recipe, manifest)
        if not fabric_ok:
            metrics["failure"] = metrics["fpga"].pop("failure")
            return metrics, False

    ppl_spec = recipe.eval.perplexity
    if ppl_spec.enabled:
        result = evaluate(art, recipe.data.evaluation, ppl_spec, {"torch": torch_model, **step_models})
        (reports / "eval.json").write_text(json.dumps(result, indent=2))
        metrics["perplexity"] = {b: r["ppl"] for b, r in result["backends"].items()}
        if "source" in result:
            metrics["perplexity"]["source"] = result["source"]["ppl"]
        if not result["ok"]:
            metrics["failure"] = result["failure"]
            return metrics, False
    del step_models, torch_model  # free memory before the bench workers load their own copies

    bench_spec = recipe.eval.bench
    if bench_spec.enabled:
        from accelc.compiler.benchmark import bench, plot

        result = bench(directory, bench_spec)
        (reports / "bench.json").write_text(json.dumps(result, indent=2))
        plot(result, reports / "bench.png")
        keys = (
            "prefill_ms_median",
            "decode_tok_s_median",
            "peak_rss_mb_median",
            "decode_speedup_vs_torch",
            "plan_decode_tok_s_median",
            "plan_speedup_vs_autoregressive",
            "plan_acceptance_rate",
        )
        metrics["bench"] = {b: {k: r[k] for k in keys if k in r} for b, r in result["backends"].items()}
    return metrics, True


def evaluate(art, text_spec: str, spec, models: dict | None = None) -> dict:
    """Perplexity of each requested backend on held-out text, with the protocol and a goal check."""
    from accelc.compiler.artifacts import artifact_relative
    from accelc.compiler.evaluation import perplexity
    from accelc.data import load_text
    from accelc.runtime.limits import check_context
    from accelc.runtime.torch_backend import TorchStepModel

    check_context(
        art.context_length,
        spec.window,
        f"a perplexity window of {spec.window} tokens",
        f"give --window {art.context_length} or less (eval.perplexity.window in a recipe)",
    )
    text = load_text(text_spec)
    tokenizer_name = artifact_relative(art.tokenizer.name_or_path, art.dir)

    def score(model) -> dict:  # every model on the same text, windows and tokenizer
        return perplexity(
            model,
            art.tokenizer,
            text,
            text_name=text_spec,
            window=spec.window,
            stride=spec.stride,
            max_windows=spec.max_windows,
            tokenizer_name=tokenizer_name,
        )

    models = dict(models or {})
    results = {}
    for backend in spec.backends:
        if backend not in art.backends():
            continue
        model = models.get(backend)
        if model is None:
            model = art.step_model(backend)
        elif backend == "torch" and not hasattr(model, "prefill"):
            model = TorchStepModel(model)
        with progress.step(f"eval: perplexity on {text_spec} with {backend}"):
            results[backend] = score(model)
    failure = None
    if "torch" in results:
        base = results["torch"]["ppl"]
        for backend, r in results.items():
            r["ratio_vs_torch"] = r["ppl"] / base
            if r["ratio_vs_torch"] > spec.max_ratio:
                failure = f"perplexity of {backend} is {r['ratio_vs_torch']:.3f}x torch's (max_ratio {spec.max_ratio})"
    out = {"text": text_spec, "max_ratio": spec.max_ratio, "backends": results}
    source = _source_checkpoint(art)
    if source is not None:  # a pass changed the weights (pruning): the quality cost, on the same protocol
        from accelc.families.causal_lm import load_model

        with progress.step(f"eval: perplexity of the source model on {text_spec}"):
            ref = score(TorchStepModel(load_model(source, art.trust_remote_code)))
        out["source"] = {"model_dir": str(source), **ref}
        for r in results.values():
            r["ratio_vs_source"] = r["ppl"] / ref["ppl"]
        ratio = results.get("torch", {}).get("ratio_vs_source")
        if failure is None and spec.max_ratio_vs_source and ratio and ratio > spec.max_ratio_vs_source:
            failure = (
                f"perplexity of the pruned model is {ratio:.3f}x the source model's "
                f"(max_ratio_vs_source {spec.max_ratio_vs_source})"
            )
    return {**out, "ok": failure is None, "failure": failure}


def _source_checkpoint(art) -> Path | None:
    """The dense checkpoint a pruned artifact came from, when it is still on this machine."""
    from accelc.compiler.pruning.materialize import is_pruned

    source = art.manifest["model"].get("model_dir")
    if not source or not is_pruned(art.dir / HF_DIRS["target"]) or not Path(source, "config.json").exists():
        return None
    return Path(source)
