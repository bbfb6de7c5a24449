"""Where pruning's held-out loss comes from: the mask, or reformation fitting its calibration.

    python -m benchmarks.prune_generalisation [--quick] [--ratio 0.2] --json OUT.json

At one removal ratio it builds two masks with accelc's own passes (PassManager, one step cache,
recipes/bench/*.yaml with the calibration mixture): the architecture search's (importance ->
arch_search, `--generations` x `--population`) and FLAP's (importance -> flap, no bias
compensation). For each mask it scores the subnet sliced only, and reformed
(compiler/pruning/reform.py, as the reform pass runs it) at the default settings (closed form,
`--damp`, `--windows` windows) and, for the search's mask, one setting changed at a time:
`--damps`, `--window-counts`, `--targets` (the dense model's outputs as the target),
`--layer-damps` (each consumer's ridge chosen on held-out calibration windows), `--intercept` (each
consumer also fits a bias) and ADMM; the
search's own parameters (its fitness windows, say) with `--search-set`. Every row has

    ppl_by_text / ratio_by_text / worst_ratio   perplexity on each held-out text (`--eval-texts`,
                                                none calibrated on) and its ratio to the dense model's
    fit_ratio                                   the same ratio on the first `--fit-windows`
                                                calibration windows, which every reformation fitted

    ratio_se_by_text                            the standard error of each ratio (of its log: a
                                                relative error), from the windows' paired differences
                                                to the dense model
    vs_default                                  per text, this row's log ratio minus the default
                                                reformation's (same mask) and its paired standard error
    vs_versus                                   with `--versus RUN.json` (an earlier run on the same
                                                held-out windows, another search setting): the same
                                                against that run's row of the same mask and setting

so fit_ratio vs worst_ratio separates what the mask costs everywhere from what reformation wins
on its calibration windows only, and vs_default says whether a setting's difference is larger
than the held-out windows' own sampling (every row scores the same windows, so the comparison
is paired window by window). The search's own held-out curve (each generation's best
fitness and its perplexity on data.evaluation, from search_log.json) lands in the protocol file
and the plot.
"""

from __future__ import annotations

import json
import math
import sys
import tempfile
import time
from pathlib import Path

from accelc.errors import UsageError
from benchmarks import common
from benchmarks.search_vs_baselines import EVAL_TEXTS, QUICK_SEARCH, check_held_out


def mask_bundle(name: str, overrides: list[str], cache: Path):
    """The bundle after the recipe's first two passes (importance and the mask's pass), cached."""
    from accelc.compiler.pipeline import PassManager, StepCache
    from accelc.families.causal_lm import ingest

    recipe = common.load_bench_recipe(name, [*overrides, common.override("cache.dir", str(cache))])
    steps = [(step.type, step.model_dump(mode="json", exclude={"type"})) for step in recipe.passes[:2]]
    return recipe, PassManager(recipe, StepCache(cache)).run_steps(ingest(recipe.model, recipe), steps)


def window_nlls(model, windows) -> list[float]:
    """Mean negative log-likelihood (nats per scored token) of a torch model on each whole window
    (each scores window - 1 tokens)."""
    import numpy as np
    import torch

    out = []
    with torch.inference_mode():
        for win in windows:
            ids = torch.as_tensor(np.asarray(win, dtype=np.int64)).unsqueeze(0)
            logits = model(input_ids=ids, use_cache=False).logits[0, :-1].float()
            out.append(float(torch.nn.functional.cross_entropy(logits, ids[0, 1:])))
    return out


def window_ppl(model, windows) -> float:
    """Perplexity over whole windows of one length (so the mean of their means is the token mean)."""
    nlls = window_nlls(model, windows)
    return math.exp(sum(nlls) / len(nlls))


def paired(nlls: list[float], reference: list[float]) -> tuple[float, float]:
    """log(ppl / reference ppl) over the same equal-length windows, and its standard error from
    the spread of the per-window differences (0 with one window)."""
    diffs = [a - b for a, b in zip(nlls, reference, strict=True)]
    mean = sum(diffs) / len(diffs)
    if len(diffs) < 2:
        return mean, 0.0
    var = sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1)
    return mean, math.sqrt(var / len(diffs))


def settings(args) -> list[dict]:
    """The reformation settings: the default, then one axis changed at a time."""
    base = {
        "method": "closed_form",
        "damp": args.damp,
        "windows": args.windows,
        "target": args.target,
        "damps": [],
        "intercept": False,
    }
    out = [base]
    out += [{**base, "damp": d} for d in args.damps if d != args.damp]
    out += [{**base, "windows": w} for w in args.window_counts if w != args.windows]
    out += [{**base, "target": t} for t in args.targets if t != args.target]
    if args.layer_damps:
        out.append({**base, "damps": list(args.layer_damps)})
    if args.intercept:
        out.append({**base, "intercept": True})
    if args.admm:
        out.append({**base, "method": "admm"})
    return out


def plot(rows: list[dict], history: list[dict], path: Path) -> None:
    fig, (ax1, ax2) = common.pyplot().subplots(1, 2, figsize=(11, 4.2))
    swept = [r for r in rows if r["mask"] == "search" and r["reform"] != "none" and r["method"] == "closed_form"]
    by_damp = sorted((r["damp"], r["worst_ratio"], r["fit_ratio"]) for r in swept if r["windows"] == rows[0]["windows"])
    if by_damp:
        d, worst, fit = zip(*by_damp)
        ax1.plot(d, worst, "o-", label="held-out (worst text)")
        ax1.plot(d, fit, "s--", label="calibration windows")
    for r in rows:
        if r["reform"] == "none":
            ax1.axhline(
                r["worst_ratio"], ls=":", color="C3" if r["mask"] == "search" else "C4", label=f"{r['mask']} mask only"
            )
    ax1.set_xscale("log")
    ax1.set_xlabel("reformation ridge (damp, x mean diag H)")
    ax1.set_ylabel("perplexity / dense")
    ax1.legend(fontsize=8)
    gens = [h["generation"] for h in history]
    ax2.plot(gens, [h["best_fitness"] for h in history], "k-o", label="best fitness (calibration windows)")
    held = [(h["generation"], h["best_holdout"]) for h in history if h.get("best_holdout") is not None]
    if held:
        ax2.plot(*zip(*held), "r--o", label="its perplexity on the held-out text")
    ax2.set_xlabel("search generation")
    ax2.set_ylabel("perplexity")
    ax2.legend(fontsize=8)
    fig.suptitle(f"{rows[0]['model']}: mask vs reformation, {rows[0]['ratio']:.0%} removed")
    common.save_figure(fig, path)


def main() -> int:
    p = common.parser(__doc__)
    p.add_argument(
        "--quick",
        action="store_true",
        help="the search of search_vs_baselines --quick (3 x 10; its step cache serves both)",
    )
    p.add_argument("--ratio", type=float, default=0.2)
    p.add_argument("--generations", type=int, default=8)
    p.add_argument("--population", type=int, default=24)
    p.add_argument(
        "--search-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an arch_search parameter for the search's mask only (e.g. fitness_windows=16)",
    )
    p.add_argument("--no-flap", dest="flap", action="store_false", help="skip FLAP's mask (the search's only)")
    p.add_argument("--damp", type=float, default=0.2, help="the default ridge (reform pass's damp)")
    p.add_argument("--windows", type=int, default=128, help="the default calibration windows of reformation")
    p.add_argument("--damps", type=float, nargs="*", default=[0.05, 1.0, 5.0])
    p.add_argument("--window-counts", type=int, nargs="*", default=[64, 256])
    p.add_argument("--no-admm", dest="admm", action="store_false", help="skip the ADMM row")
    p.add_argument(
        "--intercept", action="store_true", help="a row whose consumers also fit a bias (reform's intercept)"
    )
    p.add_argument("--target", choices=("pruned", "dense"), default="pruned", help="the default reformation target")
    p.add_argument("--targets", nargs="*", default=["dense"], choices=("pruned", "dense"), help="targets swept")
    p.add_argument(
        "--layer-damps",
        type=float,
        nargs="*",
        default=[0.05, 0.2, 1.0, 5.0],
        help="a row whose consumers each choose their ridge among these on held-out calibration windows",
    )
    p.add_argument("--fit-windows", type=int, default=4, help="calibration windows scored in-sample")
    p.add_argument("--eval-texts", nargs="+", default=list(EVAL_TEXTS))
    # 16: with 8, one text's ratio moved by 5% between the first 8 windows and the first 16
    # (docs/pruning.md, session 16); each ratio's standard error is in the rows
    p.add_argument("--eval-windows", type=int, default=16, help="windows per held-out text (a text may have fewer)")
    p.add_argument("--window", type=int, default=512, help="tokens per window: reformation, calibration and held-out")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY.PATH=VALUE",
        help="override a value of both recipes (e.g. model.builtin=tiny-llama, passes.0.window=64)",
    )
    p.add_argument(
        "--versus",
        help="an earlier run's JSON (same model, texts and windows; another --search-set, say): each row "
        "gains vs_versus, its paired log difference per text to that run's row of the same mask and setting",
    )
    p.add_argument("--cache", help="step cache shared with other runs (default: a fresh temporary one)")
    p.add_argument("--plot", help="PNG path (default: next to the JSON)")
    args = p.parse_args()
    # read before the minutes of search and scoring, so a bad path fails first
    try:
        versus = json.loads(Path(args.versus).read_text()) if args.versus else []
    except (OSError, ValueError) as exc:
        raise UsageError(f"--versus {args.versus}: not a readable run JSON ({exc})") from None
    environment = common.quiet_threads(args.threads)
    search = {"generations": args.generations, "population": args.population}
    if args.quick:
        search = QUICK_SEARCH

    from accelc import progress
    from accelc.compiler.pruning import materialize, reform
    from accelc.data import calibration_record, calibration_windows, load_text, token_windows
    from accelc.families.causal_lm import load_model, load_tokenizer
    from accelc.passes.pruning import load_subnet

    started = time.perf_counter()
    cache = Path(args.cache) if args.cache else Path(tempfile.mkdtemp(prefix="accelc-generalise-")) / "cache"
    ratio = common.override("passes.1.budget.remove_ratio", args.ratio)
    search_overrides = [*(common.override(f"passes.1.{k}", v) for k, v in search.items())]
    search_overrides += [f"passes.1.{assignment}" for assignment in args.search_set]
    masks = {"search": mask_bundle("prune_search", [ratio, *search_overrides, *args.set], cache)}
    if args.flap:
        flap = [ratio, "passes.1.type=flap", common.override("passes.1.bias_compensation", False), *args.set]
        masks["flap"] = mask_bundle("prune_baseline", flap, cache)
    recipe, first = masks["search"]
    calibration, texts = recipe.data.calibration, args.eval_texts
    check_held_out(calibration, texts)
    model = load_model(first.model_dir)
    tokenizer = load_tokenizer(first.model_dir)
    fit = calibration_windows(tokenizer, calibration, window=args.window, max_windows=args.fit_windows)
    # the perplexity protocol's windows (accelc eval's, disjoint): the first --eval-windows of each text
    held = {
        text: [
            w
            for w, _ in token_windows(
                tokenizer.encode(load_text(text), add_special_tokens=False),
                args.window,
                args.window,
                args.eval_windows,
                what=f"text '{text}'",
            )
        ]
        for text in texts
    }

    def score(small) -> dict:
        nlls = {text: window_nlls(small, wins) for text, wins in held.items()}
        return {
            "ppl_by_text": {text: math.exp(sum(v) / len(v)) for text, v in nlls.items()},
            "nll_by_window": nlls,
            "fit_ppl": window_ppl(small, fit),
        }

    dense = score(model)
    progress.status(f"dense: {dense['ppl_by_text']}, calibration windows {dense['fit_ppl']:.2f}")
    rows = []

    def add(mask: str, subnet, how: dict | None, overrides=None, seconds=0.0):
        t0 = time.perf_counter()
        small = materialize.shrink(model, subnet, overrides)
        row = {
            "model": recipe.model.builtin,
            "ratio": args.ratio,
            "mask": mask,
            "reform": "none" if how is None else "reformed",
            **(how or {"method": None, "damp": None, "windows": None, "target": None, "damps": [], "intercept": None}),
            **score(small),
        }
        row["ratio_by_text"] = {t: row["ppl_by_text"][t] / dense["ppl_by_text"][t] for t in texts}
        row["ratio_se_by_text"] = {t: paired(row["nll_by_window"][t], dense["nll_by_window"][t])[1] for t in texts}
        default = next((r for r in rows if r["mask"] == mask and r["reform"] != "none"), None)
        if default is not None:
            row["vs_default"] = {
                t: dict(zip(("log_diff", "se"), paired(row["nll_by_window"][t], default["nll_by_window"][t])))
                for t in texts
            }
        setting = ("mask", "reform", "method", "damp", "windows", "target", "damps", "intercept")
        other = next((r for r in versus if all(r.get(k) == row[k] for k in setting)), None)
        if other is not None:
            if other["nll_by_window"].keys() != row["nll_by_window"].keys():
                raise UsageError("--versus: that run scored other held-out texts")
            row["vs_versus"] = {
                t: dict(zip(("log_diff", "se"), paired(row["nll_by_window"][t], other["nll_by_window"][t])))
                for t in texts
            }
        row["worst_ratio"] = max(row["ratio_by_text"].values())
        row["fit_ratio"] = row["fit_ppl"] / dense["fit_ppl"]
        row["seconds"] = round(seconds + time.perf_counter() - t0, 1)
        rows.append(row)
        progress.status(
            f"{mask} {how or 'mask only'}: worst held-out {row['worst_ratio']:.3f}x dense, "
            f"calibration windows {row['fit_ratio']:.3f}x"
        )

    subnets = {mask: load_subnet(bundle.intermediates["subnet"])[0] for mask, (_, bundle) in masks.items()}
    base, *varied = settings(args)
    # both masks alone and at the default setting first, then the sweep: a run cut short keeps the
    # comparison; rows are written as they come (progress.jsonl beside the JSON)
    plan = [(m, how) for m in subnets for how in (None, base)] + [("search", how) for how in varied]
    partial = Path(args.json).with_suffix(".progress.jsonl")
    partial.parent.mkdir(parents=True, exist_ok=True)
    partial.write_text("")
    for mask, how in plan:
        t0, overrides = time.perf_counter(), None
        if how is not None:
            wins = calibration_windows(tokenizer, calibration, window=args.window, max_windows=how["windows"])
            overrides = reform.reform(
                model,
                subnets[mask],
                wins,
                method=how["method"],
                damp=how["damp"],
                target=how["target"],
                damps=how["damps"],
                intercept=how["intercept"],
                show_progress=False,
            ).overrides
        add(mask, subnets[mask], how, overrides, time.perf_counter() - t0)
        with partial.open("a") as out:
            out.write(json.dumps(rows[-1]) + "\n")
    log = json.loads(masks["search"][1].reports["search_log.json"].read_text())
    record = common.protocol(
        model=recipe.model.builtin,
        overrides=args.set,
        ratio=args.ratio,
        search=search,
        search_set=args.search_set,
        versus=args.versus,
        calibration=calibration_record(tokenizer, calibration, args.windows),
        held_out=texts,
        eval_windows=args.eval_windows,
        eval_window=args.window,
        fit_windows=args.fit_windows,
        dense=dense,
        search_curve=[
            {k: h.get(k) for k in ("generation", "best_fitness", "best_holdout", "evaluations")} for h in log["history"]
        ],
        search_holdout=log.get("holdout"),
        environment=environment,
        seconds=round(time.perf_counter() - started, 1),
    )
    rows_path, _ = common.write_results(args.json, rows, record)
    plot(rows, log["history"], Path(args.plot) if args.plot else rows_path.with_suffix(".png"))
    print(f"{'mask':<7} {'reform':<12} {'damp':>9} {'win':>4} {'target':>6} {'worst x':>8} {'fit x':>7}  per text")
    for r in rows:
        per = " ".join(f"{r['ratio_by_text'][t]:.3f}+-{r['ratio_se_by_text'][t]:.3f}" for t in texts)
        for key, name in (("vs_default", "vs default"), ("vs_versus", "vs --versus")):
            if key in r:
                per += f"  {name}: " + " ".join(f"{v['log_diff']:+.4f}+-{v['se']:.4f}" for v in r[key].values())
        print(
            f"{r['mask']:<7} {r['method'] or 'none':<12} {'per layer' if r['damps'] else r['damp'] or '':>9} "
            f"{r['windows'] or '':>4} {r['target'] or '':>6} "
            f"{r['worst_ratio']:>8.3f} {r['fit_ratio']:>7.3f}  {per}"
        )
    print("search curve (generation: best fitness, held-out):")
    for h in record["search_curve"]:
        print(f"  {h['generation']}: {h['best_fitness']:.3f} {h['best_holdout'] or float('nan'):.3f}")
    print(f"total {record['seconds']:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(common.run(main))
