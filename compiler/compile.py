"""`accelc compile`: recipe -> passes -> targets -> artifact, proved by the model's family.

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
from accelc.fileutil import sha256_file
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
        data = graph.with_name(graph.name + ".data")
        if data.exists():  # weights in an external-data file beside the graph: renamed with it, and
            # copied, never hard-linked: onnx (1.23) refuses to read a data file with more than one
            # link ("potential hardlink attack"), so neither the artifact's graph nor the cached one
            # a later pass reads would open in onnx
            # onnx writes data files owner-only (0600): the artifact's copy gets the graph's mode, so
            # a service reading the artifact as another user can open its weights
            writer.place(data, rel + ".data", link=False).chmod(graph.stat().st_mode & 0o777)
            _relocate_external_data(graph, writer.tmp / rel, Path(rel).name + ".data")
        else:
            writer.place(graph, rel, link=cache_owned(graph))
        graphs[role] = rel
    for name, report in bundle.reports.items():  # the passes' own reports (search log, plots)
        writer.place(report, f"reports/{name}", link=cache_owned(report))
    targets = []
    for item in lowered:
        rel = f"targets/{item.kind}"
        for child in item.directory.iterdir():
            if child.name not in ("DONE",):
                writer.place(child, f"{rel}/{child.name}", link=True)
        targets.append(
            {
                "kind": item.kind,
                "dir": rel,
                "params": dict(item.params),
                "runtime": item.runtime,
                "status": item.status,
                "seconds": item.seconds,
            }
        )
    return {"graphs": graphs, "targets": targets}


def _relocate_external_data(graph: Path, dst: Path, location: str) -> None:
    """Write `graph`'s proto to `dst` with its external initializers read from `location` (the
    data file's name in the artifact): a graph names its data file by its own file name, and the
    artifact renames both to the graph's role."""
    import onnx

    model = onnx.load(str(graph), load_external_data=False)
    for tensor in model.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            for entry in tensor.external_data:
                if entry.key == "location":
                    entry.value = location
    dst.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(dst))


def _drop_torch_weights(tree: Path) -> dict:
    """Remove the torch checkpoints' weight files from a proven artifact tree (the deploy
    profile); return what the manifest keeps of them: each file's size and sha256, so the model
    of record stays identified (and its cache entry findable) without shipping it. Configs and
    the tokenizer stay: every backend reads them."""
    from accelc.runtime.artifact import HF_DIRS, WEIGHT_SUFFIXES

    kept = {}
    for rel in HF_DIRS.values():
        for path in sorted((tree / rel).glob("*")):
            if path.is_file() and path.name.endswith(WEIGHT_SUFFIXES):
                kept[f"{rel}/{path.name}"] = {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
                path.unlink()
    return {"files": kept, "note": "torch weights the proof ran against, not shipped (output.profile: deploy)"}


def _pruning_summary(bundle) -> dict:
    """The pruned model's budget, parameter counts and widths (from the materialize pass)."""
    report = bundle.reports.get("pruned_model.json")
    return {"pruning": json.loads(Path(report).read_text())} if report else {}


def check(recipe):
    """The recipe's model family, after refusing (exit 2) what a compile would only find out late:
    a step that does not apply to the family, one that needs what no earlier step makes, or a
    model file the family cannot read."""
    from accelc.compiler.dataflow import check_order
    from accelc.families.applicability import check_recipe

    family = check_recipe(recipe)
    check_order(recipe, family)
    family.check_input(recipe.model, recipe)
    return family


def compile_recipe(recipe, out: Path, *, no_cache: bool = False) -> dict:
    from accelc import assets

    family = check(recipe)
    check_writable(out)
    started = time.perf_counter()
    cache = cache_for(recipe, no_cache)
    try:
        bundle = family.ingest(recipe.model, recipe)
        manager = PassManager(recipe, cache)
        bundle = manager.run_passes(bundle)
        lowered = manager.lower(bundle)
        writer = ArtifactWriter(out)
        try:
            owned_roots = {assets.cache_root().resolve(), cache.root.resolve()}

            def cache_owned(p: Path) -> bool:
                return any(root in p.resolve().parents for root in owned_roots)

            layout = _assemble(writer, bundle, lowered, cache_owned)
            plan = family.decode_plan(recipe, bundle)  # the recipe's decode section refined by the passes
            if plan is not None:
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
            manifest["warnings"] += family.plan_warnings(writer.tmp)
            metrics, reports_ok = family.prove(writer.tmp, recipe, manifest)
            manifest["metrics"] = metrics
            manifest["profile"] = recipe.output.profile
            if recipe.output.profile == "deploy":  # proven against the torch weights; now ship without them
                manifest["model_of_record"] = _drop_torch_weights(writer.tmp)
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
    from accelc.runtime.integrity import remember

    remember(out, manifest["files"])  # a run right after the compile need not hash what it just did
    cache_line = cache_summary(manifest)
    progress.status(
        f"steps: {cache_line['cached']} from the cache, {cache_line['ran']} ran"
        + (" (all cache hits: nothing was recompiled; the proof ran again)" if cache_line["all_hits"] else "")
    )
    progress.status(f"artifact written to {out} in {time.perf_counter() - started:.0f}s")
    return manifest


def step_records(manifest: dict) -> list[dict]:
    """Every pass and target of a compile, in order: its name, "ran" or "cached", seconds."""
    steps = [{"step": f"pass {p['name']}", "status": p["status"], "seconds": p["seconds"]} for p in manifest["passes"]]
    steps += [
        {"step": f"target {t['kind']}", "status": t.get("status", "ran"), "seconds": t.get("seconds", 0.0)}
        for t in manifest["targets"]
    ]
    return steps


def cache_summary(manifest: dict) -> dict:
    steps = step_records(manifest)
    cached = sum(s["status"] == "cached" for s in steps)
    return {"cached": cached, "ran": len(steps) - cached, "all_hits": bool(steps) and cached == len(steps)}


def compile_summary(manifest: dict, out: Path) -> dict:
    """`accelc compile --json`: one machine-readable record of a finished compile, for a CI step."""
    return {
        "ok": True,
        "artifact": str(out),
        "bundle_id": manifest["bundle_id"],
        "seconds": manifest.get("seconds"),
        "steps": step_records(manifest),
        "cache": cache_summary(manifest),
        "metrics": manifest["metrics"],
        "warnings": manifest["warnings"],
    }
