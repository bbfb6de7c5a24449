"""The `accelc` command line. The only place that turns accelc's exceptions into exit codes.

Exit codes: 0 success, 1 internal error, 2 usage or recipe error (and a damaged artifact: a file
that fails its manifest checksum is bad input the user fixes by recompiling, so it shares the
code; `accelc verify` lists the files), 3 missing optional dependency or unsupported target, 4 a
pass failed, 5 validation failed, 130 interrupted, 141 the reader of stdout went away.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from pathlib import Path

from accelc import __version__, progress
from accelc.errors import AccelcError, InternalError, UsageError

EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_BROKEN_PIPE = 1, 130, 141  # 141: 128 + SIGPIPE, as shells report it


def _load(args):
    from accelc.compiler.recipe import load_recipe

    return load_recipe(args.recipe, args.set or [])


def cmd_compile(args) -> int:
    from accelc.compiler.compile import check, compile_recipe, compile_summary, output_dir, plan_summary

    recipe = _load(args)
    out = output_dir(recipe, args.output)
    if args.dry_run:
        check(recipe)
        from accelc.compiler.artifacts import check_writable

        check_writable(out)
        print(json.dumps(plan_summary(recipe, out), indent=2))
        return 0
    try:
        manifest = compile_recipe(recipe, out, no_cache=args.no_cache)
    except AccelcError as exc:
        if args.json:  # a CI step reads stdout whatever happened; stderr and the exit code say it too
            print(json.dumps({"ok": False, "artifact": str(out), "exit_code": exc.exit_code, "error": str(exc)}))
        raise
    summary = compile_summary(manifest, out)
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(f"artifact  {out}")
    for step in summary["steps"]:
        print(f"{step['step']:<30} {step['status']:<7} {step['seconds']:8.1f} s")
    print(f"metrics   {json.dumps(summary['metrics'])}")
    return 0


def cmd_validate(args) -> int:
    from accelc.compiler.compile import check, output_dir, plan_summary
    from accelc.runtime.backends import check_dependencies

    recipe = _load(args)
    if recipe.model.path is not None:
        from accelc.compiler.recipe import resolve_path

        path = resolve_path(recipe, recipe.model.path)
        if not path.exists():
            raise UsageError(f"{args.recipe}: model.path {path} does not exist")
    check(recipe)
    check_dependencies(b for target in recipe.targets for b in getattr(target, "backends", []))
    print(
        json.dumps(
            {"recipe": str(args.recipe), "valid": True, **plan_summary(recipe, output_dir(recipe, None))}, indent=2
        )
    )
    return 0


def cmd_run(args) -> int:
    from accelc.runtime.artifact import Artifact

    art = Artifact(args.artifact)
    return art.family.run(art, args)


def cmd_train(args) -> int:
    from accelc.families.base import family_of_builtin
    from accelc.runtime import limits

    limits.at_least("--steps", args.steps)
    directory = family_of_builtin(args.name).train(args.name, steps=args.steps, fresh=args.fresh)
    print(directory)
    return 0


def cmd_serve(args) -> int:
    from accelc.serve.server import ServeOptions, serve

    options = ServeOptions(
        workers=args.workers,
        threads=args.threads,
        max_batch=args.max_batch,
        max_queue=args.max_queue,
        timeout_s=args.timeout,
        backend=args.backend,
        model_name=args.model_name,
        ray=args.ray,
        ray_address=args.ray_address,
    )
    serve(args.artifact, args.host, args.port, options)
    return 0


def cmd_inspect(args) -> int:
    from accelc.runtime.artifact import Artifact

    art = Artifact(args.artifact)
    m = art.manifest
    if args.json:
        print(json.dumps(m, indent=2))
        return 0
    print(f"artifact  {art.dir}  (accelc {m['accelc_version']}, created {m['created_at']})")
    print(f"model     {m['model'].get('description')}  family={m['model']['family']}")
    for p in m.get("passes", []):
        print(f"pass      {p['name']:<24} {p['status']:<7} {p['seconds']:>7.1f}s  {p['key'][:12]}  {p['params']}")
    for t in m.get("targets", []):
        print(f"target    {t['kind']:<24} backends: {', '.join(t['runtime'])}")
    rss = {b: r.get("peak_rss_mb_median") for b, r in m.get("metrics", {}).get("bench", {}).items()}
    for backend in art.backends():
        size = art.footprint(backend)
        memory = f", peak RSS {rss[backend]:.0f} MiB (bench)" if rss.get(backend) else ""
        print(
            f"backend   {backend:<24} model {size['model_bytes'] / 2**20:.1f} MiB + shared "
            f"{size['shared_bytes'] / 2**20:.1f} MiB{memory}"
        )
    if m.get("profile") == "deploy":
        dropped = m.get("model_of_record", {}).get("files", {})
        print(
            f"profile   deploy: torch weights not shipped ({sum(f['bytes'] for f in dropped.values()) / 2**20:.1f} MiB)"
        )
    for k, v in m.get("metrics", {}).items():
        print(f"metric    {k}: {json.dumps(v)}")
    total = sum(f["bytes"] for f in m.get("files", {}).values())
    print(f"files     {len(m.get('files', {}))} files, {total / 2**20:.1f} MiB")
    print(f"integrity {_integrity_line(art)}")
    return 0


def _integrity_line(art) -> str:
    """The artifact's integrity state, from the hash cache where the files are unchanged."""
    if not art.integrity.recorded:
        return "unknown: the manifest has no file checksums (written by an older accelc)"
    damaged = [f for f in art.integrity.scan(trust_cache=True) if not f.informational]
    if not damaged:
        return "ok"
    listed = ", ".join(f"{f.rel} ({f.problem})" for f in damaged)
    return f"DAMAGED: {listed}; run `accelc verify {art.dir}` for details"


def cmd_verify(args) -> int:
    from accelc.runtime.artifact import Artifact
    from accelc.runtime.integrity import CorruptArtifact

    art = Artifact(args.artifact)
    if not art.integrity.recorded:
        raise UsageError(
            f"{art.dir}: its manifest has no file checksums (written by an older accelc); recompile it to verify it"
        )
    findings = art.integrity.scan(trust_cache=False)  # re-hash everything: verify trusts no cache
    for f in findings:
        print(f"{f.label:<24} {f.rel}" + ("" if f.informational else f"  ({f.detail})"))
    damaged = [f.rel for f in findings if not f.informational]
    total = sum(f["bytes"] for f in art.integrity.table.values())
    if damaged:
        raise CorruptArtifact(
            f"{art.dir}: {len(damaged)} of {len(art.integrity.table)} files damaged ({', '.join(damaged)}); "
            "recompile the artifact or restore it from a copy"
        )
    print(f"ok: {len(art.integrity.table)} files, {total / 2**20:.1f} MiB match the manifest")
    return 0


def cmd_eval(args) -> int:
    from pydantic import ValidationError

    from accelc.compiler.recipe import PerplexitySpec
    from accelc.runtime import limits
    from accelc.runtime.artifact import Artifact

    for option in ("window", "stride", "max_windows"):
        limits.at_least(f"--{option.replace('_', '-')}", getattr(args, option), 2 if option == "window" else 1)
    art = Artifact(args.artifact)
    limits.backends("--backends", args.backends, art.backends())
    resolved = art.dir / "recipe.resolved.yaml"
    import yaml

    recipe = yaml.safe_load(resolved.read_text()) if resolved.exists() else {}
    spec = dict((recipe.get("eval") or {}).get("perplexity") or {})
    for key in ("window", "stride", "max_windows"):
        if getattr(args, key) is not None:
            spec[key] = getattr(args, key)
    if args.window is not None and args.stride is None:
        spec.pop("stride", None)  # a new window gets its own default stride (the window)
    if args.backends:
        spec["backends"] = args.backends
    try:
        spec = PerplexitySpec(**spec)
    except ValidationError as exc:
        raise UsageError(f"accelc eval: {exc.errors()[0]['msg']}") from None
    texts = args.text or [(recipe.get("data") or {}).get("evaluation", "austen:persuasion")]
    if len(texts) == 1:
        result = art.family.evaluate(art, texts[0], spec)
    else:
        from accelc.compiler.evaluation import across_texts

        result = across_texts({text: art.family.evaluate(art, text, spec) for text in dict.fromkeys(texts)})
    print(json.dumps(result, indent=2))
    return 0 if result["ok"] else 5


def cmd_bench(args) -> int:
    from accelc.compiler.recipe import BenchSpec
    from accelc.runtime import limits
    from accelc.runtime.artifact import Artifact

    given = dict(
        prompt_tokens=limits.at_least("--prompt-tokens", args.prompt_tokens),
        new_tokens=limits.at_least("--new-tokens", args.new_tokens),
        repeats=limits.at_least("--repeats", args.repeats),
    )
    art = Artifact(args.artifact)
    if args.serve:
        return _bench_serve(args, art)
    given["backends"] = limits.backends("--backends", args.backends, art.backends())
    spec = BenchSpec(**{k: v for k, v in given.items() if v is not None})  # what is not given: the defaults
    result = art.family.bench(art, spec)
    out = Path(args.json) if args.json else art.dir / "reports" / "bench.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    art.family.report_bench(art, result, out.with_suffix(".png"))
    progress.status(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


def _bench_serve(args, art) -> int:
    """`accelc bench --serve`: workers x threads per worker for `accelc serve`, by a load test."""
    from accelc.runtime import limits
    from accelc.serve.tuning import tune

    concurrency = limits.at_least("--concurrency", args.concurrency) or 8
    max_batch = limits.at_least("--max-batch", args.max_batch) or 8
    new_tokens = args.new_tokens or 32
    result = tune(art.dir, max_batch=max_batch, concurrency=concurrency, new_tokens=new_tokens,
                  requests=(args.repeats or 3) * concurrency)  # fmt: skip
    out = Path(args.json) if args.json else art.dir / "reports" / "serve_bench.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"{'workers':>7} {'threads':>7} {'tok/s':>8} {'p50 ms':>8} {'p95 ms':>8} {'errors':>6} {'identical':>9}")
    for r in result["rows"]:
        print(
            f"{r['workers']:>7} {r['threads']:>7} {r['tok_s']:>8.1f} {r['p50_ms']:>8.0f} {r['p95_ms']:>8.0f} "
            f"{r['errors']:>6} {r['identical']!s:>9}"
        )
    best = result["best"]
    if best is None:
        raise UsageError("every configuration answered with errors; see the server's messages above")
    print(f"\nfastest: accelc serve {art.dir} --workers {best['workers']} --threads {best['threads']} "
          f"--max-batch {max_batch}")  # fmt: skip
    progress.status(f"wrote {out}")
    return 0


def cmd_passes(args) -> int:
    from accelc.compiler import registry

    registry.load_all()
    return _list_or_show(registry.PASSES, args.name, "pass")


def cmd_targets(args) -> int:
    from accelc.compiler import registry

    registry.load_all()
    return _list_or_show(registry.TARGETS, args.name, "target")


def _list_or_show(table, name, what) -> int:
    from accelc.compiler.registry import describe

    if name is None:
        for key, cls in sorted(table.items()):
            print(f"{key:<24} {describe(cls)['summary']}")
        return 0
    if name not in table:
        raise UsageError(f"unknown {what} '{name}'; available: {', '.join(sorted(table))}")
    info = describe(table[name])
    print(f"{info['name']}: {info['doc']}\n")
    for field in ("families", "reads", "consumes", "produces", "drops"):
        if info[field]:
            print(f"{field + ':':<10} {', '.join(info[field])}")
    print("\nparameters:")
    for p in info["params"]:
        default = "required" if p["required"] else f"default {json.dumps(p['default'])}"
        print(f"  {p['name']:<22} {p['type']:<14} {default:<22} {p['description']}")
    return 0


def cmd_schema(args) -> int:
    from accelc.compiler.recipe import json_schema

    print(json.dumps(json_schema(), indent=2))
    return 0


def cmd_cache(args) -> int:
    import shutil

    from accelc import assets

    root = assets.cache_root()
    steps = root / "steps"
    if args.action == "dir":
        print(root)
    elif args.action == "ls":
        for entry in sorted(steps.glob("*")) if steps.exists() else []:
            size = sum(f.stat().st_size for f in entry.rglob("*") if f.is_file())
            print(f"{entry.name[:16]}  {size / 2**20:9.1f} MiB  {'ok' if (entry / 'DONE').exists() else 'partial'}")
    elif args.action == "clear":
        shutil.rmtree(steps, ignore_errors=True)
        print(f"cleared pass cache {steps} (assets kept)")
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse's usage errors as every other input error reads: one line, exit 2 (argparse prints
    the whole usage text first; `--help` still shows it)."""

    def error(self, message: str):
        self.exit(2, f"accelc: error: {self.prog}: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    from accelc.runtime.backends import backend_names

    p = _Parser(prog="accelc", description="inference-acceleration compiler for LMs")
    p.add_argument("--version", action="version", version=f"accelc {__version__}")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    p.add_argument("--debug", action="store_true", help="show tracebacks of internal errors")
    sub = p.add_subparsers(dest="command", required=True)

    def with_recipe(name, help_):
        sp = sub.add_parser(name, help=help_)
        sp.add_argument("recipe")
        sp.add_argument("--set", action="append", metavar="KEY.PATH=VALUE", help="override a recipe value")
        return sp

    sp = with_recipe("compile", "run a recipe's passes and targets; write a validated artifact")
    sp.add_argument("-o", "--output", help="artifact directory (default: the recipe's output.dir)")
    sp.add_argument("--no-cache", action="store_true", help="neither read nor write the pass cache")
    sp.add_argument("--dry-run", action="store_true", help="validate and print the plan; do nothing")
    sp.add_argument("--json", action="store_true", help="print one machine-readable summary (for CI), also on failure")
    sp.set_defaults(func=cmd_compile)
    with_recipe("validate", "check a recipe without compiling").set_defaults(func=cmd_validate)

    sp = sub.add_parser("run", help="generate with an artifact (text from a prompt, samples of a generative model)")
    sp.add_argument("artifact")
    sp.add_argument("--prompt", help="the prompt (language models)")
    sp.add_argument("--max-new-tokens", type=int)
    sp.add_argument("--backend", choices=backend_names())
    sp.add_argument("--temperature", type=float, help="0 = greedy; default: the artifact's decode plan")
    sp.add_argument("--raw", action="store_true", help="do not apply the chat template")
    sp.add_argument("--show-tokens", action="store_true", help="also print the generated token ids")
    sp.add_argument("--samples", type=int, help="how many samples to draw (generative models of images)")
    sp.add_argument("--seed", type=int, help="random seed of the samples (default: the artifact's plan)")
    sp.add_argument("--out", help="where to write what is not text (an image grid, predictions)")
    sp.add_argument(
        "--ray-address", help="partitioned CNNs: run the partitions on this Ray cluster (default: the plan's)"
    )
    sp.set_defaults(func=cmd_run)

    sp = sub.add_parser("train", help="train a built-in model that accelc builds itself, into the asset cache")
    sp.add_argument("name", help="the built-in model (model.builtin in a recipe)")
    sp.add_argument("--steps", type=int, help="training steps (default: the model's own)")
    sp.add_argument("--fresh", action="store_true", help="ignore the checkpoint of an earlier, interrupted run")
    sp.set_defaults(func=cmd_train)

    sp = sub.add_parser("serve", help="an OpenAI-compatible HTTP server over batching, pinned worker processes")
    sp.add_argument("artifact")
    sp.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    sp.add_argument("--port", type=int, default=8000, help="0: any free port (the one chosen is printed)")
    sp.add_argument("--workers", type=int, default=1, help="worker processes, each pinned to its own cores")
    sp.add_argument("--threads", type=int, help="threads (cores) per worker (default: an equal share)")
    sp.add_argument("--max-batch", type=int, default=8, help="sequences a worker decodes per model call")
    sp.add_argument("--max-queue", type=int, default=64, help="requests waiting beyond the batches (then HTTP 429)")
    sp.add_argument("--timeout", type=float, default=300.0, help="seconds a request may take (then HTTP 504)")
    sp.add_argument("--backend", choices=backend_names(), help="default: ort where the artifact has it")
    sp.add_argument("--model-name", help="the model id clients name (default: the artifact folder's name)")
    sp.add_argument("--ray", action="store_true", help="the workers as Ray Serve replicas (1 to --workers, by load)")
    sp.add_argument("--ray-address", help="with --ray: an existing Ray cluster (default: a local instance)")
    sp.set_defaults(func=cmd_serve)

    sp = sub.add_parser("inspect", help="summarise an artifact's manifest")
    sp.add_argument("artifact")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_inspect)

    sp = sub.add_parser("verify", help="check every artifact file against the manifest's sha256")
    sp.add_argument("artifact")
    sp.set_defaults(func=cmd_verify)

    sp = sub.add_parser("eval", help="perplexity on held-out real text")
    sp.add_argument("artifact")
    sp.add_argument(
        "--text",
        action="append",
        help="austen:NAME, shakespeare:NAME, pydoc:topics, debian-doc:PKG, dir:PATH or a file (default: the "
        "recipe's data.evaluation); repeat it to score several texts, the worst one gating",
    )
    sp.add_argument("--backends", nargs="+")
    sp.add_argument("--window", type=int)
    sp.add_argument("--stride", type=int)
    sp.add_argument("--max-windows", type=int)
    sp.set_defaults(func=cmd_eval)

    sp = sub.add_parser("bench", help="prefill latency, decode tok/s, peak memory vs torch eager")
    sp.add_argument("artifact")
    sp.add_argument("--backends", nargs="+")
    sp.add_argument("--repeats", type=int)
    sp.add_argument("--prompt-tokens", type=int)
    sp.add_argument("--new-tokens", type=int)
    sp.add_argument("--json", help="where to write bench.json (default: ARTIFACT/reports/bench.json)")
    sp.add_argument("--serve", action="store_true", help="load-test `accelc serve` to choose --workers and --threads")
    sp.add_argument("--concurrency", type=int, help="with --serve: clients at once (default 8)")
    sp.add_argument("--max-batch", type=int, help="with --serve: the workers' batch cap (default 8)")
    sp.set_defaults(func=cmd_bench)

    for name, func in (("passes", cmd_passes), ("targets", cmd_targets)):
        sp = sub.add_parser(name, help=f"list {name}, or `{name} show NAME`")
        sp.add_argument("show", nargs="?", choices=["show"])
        sp.add_argument("name", nargs="?")
        sp.set_defaults(func=func)
    sub.add_parser("schema", help="JSON Schema of recipes").set_defaults(func=cmd_schema)
    sp = sub.add_parser("cache", help="the pass cache: dir | ls | clear")
    sp.add_argument("action", choices=["dir", "ls", "clear"])
    sp.set_defaults(func=cmd_cache)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    progress.set_quiet(args.quiet)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see benchmark.py: spinning threads on shared cores
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no network at run time: fail fast, never hang on a hub
    try:
        return args.func(args)
    except AccelcError as exc:
        if args.debug and isinstance(exc, InternalError):  # a bug: its traceback is what a report needs
            traceback.print_exc()
        print(f"accelc: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(
            "accelc: interrupted; finished steps stay in the cache and the previous artifact is intact", file=sys.stderr
        )
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # the reader went away (`accelc passes show X | head`): nothing is wrong
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit flush cannot fail
        return EXIT_BROKEN_PIPE
    except Exception as exc:  # a bug: say so in one line, traceback only on request
        if args.debug:
            traceback.print_exc()
        print(
            f"accelc: internal error: {type(exc).__name__}: {exc} (rerun with --debug for the traceback)",
            file=sys.stderr,
        )
        return EXIT_INTERNAL


if __name__ == "__main__":
    raise SystemExit(main())
