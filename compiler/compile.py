"""`accelc compile`: recipe -> passes -> targets -> artifact, validated, evaluated and benchmarked.

Order matters for what a failure leaves behind: the pass cache is committed step by step (so a
rerun resumes), and the artifact is assembled in a temporary directory that only replaces the
previous artifact once parity, quality and benchmarks have been written.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import yaml

from accelc import progress
from accelc.compiler.artifacts import ArtifactWriter, base_manifest, check_writable
from accelc.compiler.pipeline import PassManager, StepCache
from accelc.compiler.recipe import recipe_dict, recipe_hash, resolve_path
from accelc.errors import ValidationFailed
from accelc.runtime.artifact import HF_DIRS


def output_dir(recipe, out: str | None) -> Path:
    return Path(out) if out else resolve_path(recipe, recipe.output.dir)


def cache_for(recipe, no_cache: bool) -> StepCache:
    from accelc import assets

    if no_cache or not recipe.cache.enabled:
        return StepCache(None)
    root = resolve_path(recipe, recipe.cache.dir) if recipe.cache.dir else assets.cache_root()
    return StepCache(root)


def plan_summary(recipe, out: Path) -> dict:
    """What a compile would do, without doing it (`--dry-run`)."""
    model = (recipe.model.builtin and f"builtin:{recipe.model.builtin}") or recipe.model.path
    return {
        "model": model,
        "passes": [s.model_dump(mode="json") for s in recipe.passes],
        "targets": [s.model_dump(mode="json") for s in recipe.targets],
        "output": str(out),
        "cache": recipe.cache.enabled,
    }


def _assemble(writer: ArtifactWriter, bundle, lowered, cache_owned) -> dict:
    """Lay the bundle and target outputs out as the artifact tree; return the manifest's file map."""
    graphs = {}
    # the torch models of record and their tokenizer travel with the artifact: `run --backend
    # torch`, validation and `eval` need them. Copy user folders (a later save_pretrained
    # rewrites their files in place), hard-link cache-owned ones.
    for role, checkpoint in bundle.checkpoints().items():
        rel = HF_DIRS["target" if role == "decoder" else role]
        for src in sorted(checkpoint.iterdir()):
            if src.is_file():
                writer.place(src, f"{rel}/{src.name}", link=cache_owned(src))
    for role, graph in bundle.graphs.items():
        rel = f"model/onnx/{role}.onnx"
        writer.place(graph, rel, link=cache_owned(graph))
        data = graph.with_name(graph.name + ".data")
        if data.exists():  # graphs over 2 GB keep weights in an external-data file beside them
            writer.place(data, rel + ".data", link=cache_owned(data))
        graphs[role] = rel
    for name, report in bundle.reports.items():  # the passes' own reports (search log, plots)
        writer.place(report, f"reports/{name}", link=cache_owned(report))
    targets = []
    for item in lowered:
        rel = f"targets/{item.kind}"
        for child in item.directory.iterdir():
            if child.name not in ("DONE",):
                writer.place(child, f"{rel}/{child.name}", link=True)
        targets.append({"kind": item.kind, "dir": rel, "params": dict(item.params), "runtime": item.runtime})
    return {"graphs": graphs, "targets": targets}


def _pruning_summary(bundle) -> dict:
    """The pruned model's budget, parameter counts and widths (from the materialize pass)."""
    report = bundle.reports.get("pruned_model.json")
    return {"pruning": json.loads(Path(report).read_text())} if report else {}


def compile_recipe(recipe, out: Path, *, no_cache: bool = False) -> dict:
    from accelc import assets
    from accelc.families.causal_lm import ingest

    check_writable(out)
    started = time.perf_counter()
    cache = cache_for(recipe, no_cache)
    try:
        bundle = ingest(recipe.model, recipe)
        manager = PassManager(recipe, cache)
        bundle = manager.run_passes(bundle)
        lowered = manager.lower(bundle)
        writer = ArtifactWriter(out)
        try:
            owned_roots = {assets.cache_root().resolve(), cache.root.resolve()}

            def cache_owned(p: Path) -> bool:
                return any(root in p.resolve().parents for root in owned_roots)

            layout = _assemble(writer, bundle, lowered, cache_owned)
            plan = {"strategy": recipe.decode.strategy, **recipe.decode.model_dump(mode="json"), **bundle.plan}
            writer.write_json("decode/plan.json", plan)
            (writer.tmp / "recipe.resolved.yaml").write_text(yaml.safe_dump(recipe_dict(recipe), sort_keys=False))
            manifest = {
                **base_manifest(),
                "recipe_sha256": recipe_hash(recipe),
                "model": {
                    "family": bundle.family,
                    **bundle.source,
                    "trust_remote_code": recipe.model.trust_remote_code,
                },
                "bundle_id": bundle.id,
                "passes": [dict(vars(p)) for p in bundle.provenance],
                "graph_meta": dict(bundle.graph_meta),
                **layout,
                "decode_plan": plan,
                **_pruning_summary(bundle),
                "metrics": {},
                "warnings": [],
            }
            writer.write_json("manifest.json", manifest)  # provisional: the runtime opens the tree
            manifest["warnings"] += _plan_coverage(writer.tmp)
            metrics, reports_ok = prove(writer.tmp, recipe, manifest)
            manifest["metrics"] = metrics
            manifest["seconds"] = round(time.perf_counter() - started, 1)
            manifest["files"] = writer.file_table()
            writer.write_json("manifest.json", manifest)
            if not reports_ok:
                rejected = writer.reject()
                raise ValidationFailed(
                    f"validation failed: {metrics.get('failure')}; reports kept in {rejected} "
                    f"(the previous artifact at {out}, if any, is untouched)"
                )
            writer.commit()
        except BaseException:
            if writer.tmp.exists():
                writer.abort()
            raise
    finally:
        cache.close()
    progress.status(f"artifact written to {out} in {time.perf_counter() - started:.0f}s")
    return manifest


def _plan_coverage(directory: Path) -> list[str]:
    """Warn about the backends on which a rewritten loop cannot run (no draft there): they decode
    autoregressively (Artifact.plan_for), which a deployment on them should know."""
    from accelc.runtime.artifact import Artifact

    art = Artifact(directory)
    plain = {b: art.plan_for(b) for b in art.backends()}
    plain = {b: p["reason"] for b, p in plain.items() if "planned_strategy" in p}
    for reason in plain.values():
        progress.status(reason)
    return list(plain.values())


def prove(directory: Path, recipe, manifest: dict) -> tuple[dict, bool]:
    """Validation, evaluation and benchmark of a (provisional) artifact; writes reports/."""
    from accelc.runtime.artifact import Artifact

    art = Artifact(directory)
    reports = directory / "reports"
    reports.mkdir(exist_ok=True)
    metrics: dict = {}
    if manifest["model"]["family"] == "onnx":
        return _prove_onnx(art, recipe, reports)
    torch_model = art.torch_model()
    tokenizer = art.tokenizer
    lowered = [b for b in art.backends() if b != "torch"]
    step_models = {b: art.step_model(b) for b in lowered}

    from accelc.compiler.validation import validate, validate_plan

    report = validate(torch_model, tokenizer, step_models, recipe.eval.parity)
    # the draft's graphs are lowered too: hold them to the same parity against the torch draft,
    # except a compressed draft graph (8/4-bit weights, truncated head), which differs by design;
    # output never depends on draft numerics, and the decode plan is checked below
    compressed = manifest["graph_meta"].get("draft", {}).get("compression")
    if "draft" not in art.roles() and compressed:  # made from the target's own weights: no torch draft
        report["draft"] = {"not_compared": {"ort": f"compressed draft graph of the target's weights: {compressed}"}}
    elif "draft" in art.roles():
        drafts = {b: art.step_model(b, "draft") for b in lowered if not (compressed and b == "ort")}
        report["draft"] = validate(art.torch_model("draft"), tokenizer, drafts, recipe.eval.parity)
        if compressed:
            report["draft"]["not_compared"] = {"ort": f"compressed draft graph: {compressed}"}
        report["verdict"] = "pass" if report["verdict"] == report["draft"]["verdict"] == "pass" else "fail"
    if art.plan.get("strategy") not in ("greedy", "sample") and recipe.eval.parity.greedy_tokens:
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
    from accelc.runtime.torch_backend import TorchStepModel

    text = load_text(text_spec)
    tokenizer_name = artifact_relative(art.tokenizer.name_or_path, art.dir)
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
            results[backend] = perplexity(
                model,
                art.tokenizer,
                text,
                text_name=text_spec,
                window=spec.window,
                stride=spec.stride,
                max_windows=spec.max_windows,
                tokenizer_name=tokenizer_name,
            )
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
            ref = perplexity(
                TorchStepModel(load_model(source, art.trust_remote_code)),
                art.tokenizer,
                text,
                text_name=text_spec,
                window=spec.window,
                stride=spec.stride,
                max_windows=spec.max_windows,
                tokenizer_name=tokenizer_name,
            )
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


def _prove_onnx(art, recipe, reports: Path) -> tuple[dict, bool]:
    """An ONNX input can only be checked against itself: see validation.validate_onnx."""
    from accelc.compiler.validation import validate_onnx

    backends = art.backends()
    if "ort" not in backends:
        return {}, True
    cfg = backends["ort"]["runtime"]
    report = validate_onnx(
        art.dir / art.manifest["graphs"][cfg["graphs"]["target"]], cfg["session"], recipe.eval.parity
    )
    (reports / "validation.json").write_text(json.dumps(report, indent=2))
    metrics = {
        "validation": {"ort": report["verdict"]},
        "max_abs_diff": {"ort": report["backends"]["ort"]["max_abs_diff"]},
    }
    if report["verdict"] != "pass":
        metrics["failure"] = "the lowered ONNX Runtime session disagrees with the input graph (reports/validation.json)"
    return metrics, report["verdict"] == "pass"
