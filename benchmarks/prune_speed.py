"""Where a pruned decoder's decode time goes: shapes of one model timed side by side on ORT.

    python -m benchmarks.prune_speed [--mlp-widths 1280 1272 1264 1024] [--heads 6]
        [--subnet search_log_or_subnet.json ...] --json OUT.json

Every shape is the recipe model (recipes/bench/prune_search.yaml's) sliced to uniform widths
(which channels are kept does not change the time): `--mlp-widths` keeps every head and gives
every layer that MLP width; `--heads` keeps that many query heads per layer (the same count in
every KV group) and the full MLP; `--subnet` adds searched subnets (an arch_search subnet.json),
named subnet0, subnet1, ..., and `--round-to 16 64` each of them with its MLP widths rounded down
to those multiples (subnet0/16, ...), which asks directly whether kernel-friendly widths buy
more speed than their parameters.
Each shape is materialised, exported as the deployed graph (export_onnx's fused decoder) and
timed with search_vs_baselines' workers, interleaved round by round, medians: decode tokens/s
over 32 greedy tokens after a 64-token prompt.

`--kernel-widths W ...` times instead the MLP block alone at each width (latency.py's stack, as
deep as the model, one ORT session per width), interleaved call by call in one process, to see
whether the kernels favour widths in multiples of 16/32/64 (`--seed` changes the weights, and so
where they sit in memory; a width effect survives it, a memory-placement effect does not).

A least-squares fit over the shapes, ms per token = fixed + a x attention params + m x MLP params,
says what no width change removes (the tied LM head, embeddings, norms, per-operator dispatch,
the Python loop) and so which speedup a parameter cut can buy: with the fixed part f of the dense
step, removing a fraction r of the prunable time gives 1 / (1 - r (1 - f)). Rows also report
each MLP shape's per-channel time, which shows whether widths off the kernels' blocks
(multiples of 16/32/64) cost more than their channels.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks import common
from benchmarks.search_vs_baselines import NEW_TOKENS, PROMPT_TOKENS, time_graphs


def uniform(space, n_heads: int, width: int):
    """Every layer keeps its first `n_heads` query heads (the same count per KV group) and first `width` channels."""
    g = space.geometry
    per_group = n_heads // g.num_kv_heads
    option = space.head_options.index((g.num_kv_heads, per_group))
    order = -np.arange(g.num_heads, dtype=float)
    return space.from_scores(
        [option] * g.num_layers,
        [width] * g.num_layers,
        np.tile(order, (g.num_layers, 1)),
        np.tile(-np.arange(g.intermediate, dtype=float), (g.num_layers, 1)),
    )


def kernel_widths(widths: list[int], hidden: int, layers: int, calls: int, seed: int) -> list[dict]:
    """Microseconds per layer of the MLP block at each width, interleaved call by call."""
    import onnxruntime as ort

    from accelc.compiler.pruning import latency
    from accelc.runtime.ort_backend import session_options

    rng = np.random.default_rng(seed)
    runs = {}
    for w in widths:
        stack = latency.mlp_stack(hidden, w, 1, layers, rng)
        sess = ort.InferenceSession(
            stack.model(), sess_options=session_options(common.ORT_SESSION), providers=["CPUExecutionProvider"]
        )
        for _ in range(5):
            sess.run(None, stack.feed)
        runs[w] = (sess, stack.feed, [])
    for _ in range(calls):
        for sess, feed, times in runs.values():
            t0 = time.perf_counter()
            sess.run(None, feed)
            times.append((time.perf_counter() - t0) * 1e6 / layers)
    out = []
    for w, (_, _, times) in runs.items():
        us = common.median(times)
        out.append(
            {"width": w, "us_per_layer": us, "us_per_channel": us / w, "p25_us": float(np.percentile(times, 25))}
        )
    return out


def interleaved(graphs: dict[str, Path], prompt: list[int], rounds: int) -> dict[str, dict]:
    """Every graph loaded in this process and decoded in turn (the order rotating), round by round: tokens/s per round,
    and each shape's ratio to the first graph's paired within the round (a busy machine's load
    drifts between rounds; pairing cancels it)."""
    from accelc import progress
    from accelc.loops.autoregressive import generate
    from accelc.runtime.ort_backend import OrtStepModel

    models = {name: OrtStepModel(path, common.ORT_SESSION) for name, path in graphs.items()}
    for model in models.values():
        generate(model, prompt[:8], 4)
    runs = {name: [] for name in models}
    names = list(models)
    for r in progress.bar(range(rounds), desc="decode rounds", unit="round"):
        # each round starts one graph later: the graph decoded right after another runs measurably
        # slower or faster (measured: 4-10%), so no shape may hold one position
        for name in names[r % len(names) :] + names[: r % len(names)]:
            runs[name].append(generate(models[name], prompt, NEW_TOKENS).decode_tokens_per_second)
    first = next(iter(runs.values()))
    return {
        name: {"decode_tok_s": common.median(r), "paired_vs_first": common.median_ratio(r, first), "rounds": r}
        for name, r in runs.items()
    }


def main() -> int:
    p = common.parser(__doc__)
    p.add_argument("--mlp-widths", type=int, nargs="*", default=[1280, 1272, 1264, 1256, 1024])
    p.add_argument("--heads", type=int, nargs="*", default=[6], help="query heads kept per layer (full MLP)")
    p.add_argument("--subnet", nargs="*", default=[], help="subnet.json files of arch_search (or a baseline)")
    p.add_argument(
        "--round-to",
        type=int,
        nargs="*",
        default=[],
        help="also time each --subnet with its MLP widths rounded down to these multiples (e.g. 16 64)",
    )
    p.add_argument("--repeats", type=int, default=5, help="worker processes per shape (medians)")
    p.add_argument(
        "--rounds",
        type=int,
        help="time instead in this one process: every graph decodes in turn, this many rounds "
        "(paired ratios per round; for a busy machine)",
    )
    p.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE", help="override the recipe")
    p.add_argument("--kernel-widths", type=int, nargs="*", help="time the MLP block alone at these widths")
    p.add_argument("--calls", type=int, default=150, help="--kernel-widths: interleaved calls per width")
    p.add_argument("--seed", type=int, default=0, help="--kernel-widths: seed of the random weights")
    p.add_argument("--plot", help="PNG path (default: next to the JSON)")
    args = p.parse_args()
    environment = common.quiet_threads(args.threads)
    if args.kernel_widths:
        rows = kernel_widths(args.kernel_widths, 576, 30, args.calls, args.seed)
        record = common.protocol(
            what="MLP block (gate, up, SiLU, down; hidden 576, SmolLM2's) per width, 30-deep stack, ORT CPU",
            calls=args.calls,
            seed=args.seed,
            environment=environment,
        )
        common.write_results(args.json, rows, record)
        for r in rows:
            print(
                f"{r['width']:>5} {r['us_per_layer']:8.1f} us/layer (p25 {r['p25_us']:.1f}) {r['us_per_channel']:.4f} us/ch"
            )
        return 0

    from accelc import progress
    from accelc.compiler.benchmark import prompt_ids
    from accelc.compiler.pruning import masks, materialize
    from accelc.families.causal_lm import ingest, load_model, load_tokenizer
    from accelc.passes.export_onnx import export_checkpoint
    from accelc.passes.pruning import load_subnet

    started = time.perf_counter()
    recipe = common.load_bench_recipe("prune_search", args.set)
    dense_dir = ingest(recipe.model, recipe).model_dir
    model, tokenizer = load_model(dense_dir), load_tokenizer(dense_dir)
    geo = masks.Geometry.from_model(model)
    space = masks.SearchSpace(geo, multiple=1)
    shapes = {"dense": space.dense()}
    for w in args.mlp_widths:
        shapes[f"mlp{w}"] = uniform(space, geo.num_heads, w)
    for h in args.heads:
        shapes[f"heads{h}"] = uniform(space, h, geo.intermediate)
    for i, path in enumerate(args.subnet):
        subnet = load_subnet(Path(path))[0]
        shapes[f"subnet{i}"] = subnet
        for m in args.round_to:  # the same subnet, each MLP width rounded down to a multiple of m
            shapes[f"subnet{i}/{m}"] = masks.Subnet(
                tuple(
                    masks.LayerMask(layer.heads, layer.channels[: len(layer.channels) // m * m])
                    for layer in subnet.layers
                )
            )
    # the graphs (hundreds of MB each) live until they are timed, then go: left behind, a few runs
    # filled the disk
    with tempfile.TemporaryDirectory(prefix="accelc-prune-speed-") as tmp:
        work = Path(tmp)
        graphs, rows = {}, []
        for name, subnet in shapes.items():
            with progress.step(f"materialise and export {name}"):
                small = materialize.shrink(model, subnet)
                directory = materialize.save(small, work / name / "model", source_dir=dense_dir, subnet=subnet)
                graphs[name], meta = export_checkpoint(
                    load_model(directory), directory, work / name / "onnx", None, "fused"
                )
            shape = space.shape(subnet)
            attn = sum(geo.layer_params(q, kv, 0) for q, kv, _ in shape)
            rows.append(
                {
                    "shape": name,
                    "heads": [q for q, _, _ in shape],
                    "mlp_widths": [w for _, _, w in shape],
                    "params": space.count(shape).total,
                    "attention_params": attn,
                    "mlp_params": space.count(shape).prunable - attn,
                    "graph": meta["graph"],
                }
            )
        prompt = prompt_ids(tokenizer, PROMPT_TOKENS)
        timing = interleaved(graphs, prompt, args.rounds) if args.rounds else time_graphs(graphs, prompt, args.repeats)
    for row in rows:
        row.update(timing[row["shape"]])
        row["ms_per_token"] = 1e3 / row["decode_tok_s"]
    dense = rows[0]
    X = np.array([[1.0, r["attention_params"] / 1e6, r["mlp_params"] / 1e6] for r in rows])
    y = np.array([r["ms_per_token"] for r in rows])
    (fixed, per_attn, per_mlp), *_ = np.linalg.lstsq(X, y, rcond=None)
    for row, x, t in zip(rows, X, y, strict=True):
        row["fit_ms"] = float(x @ [fixed, per_attn, per_mlp])
        row["decode_speedup_vs_dense"] = row["decode_tok_s"] / dense["decode_tok_s"]
        row["params_vs_dense"] = row["params"] / dense["params"]
        if row["shape"].startswith("mlp"):  # uniform MLP shapes: time per removed channel
            removed = dense["mlp_widths"][0] - row["mlp_widths"][0]
            row["us_per_removed_channel_layer"] = (dense["ms_per_token"] - t) * 1e3 / (removed * geo.num_layers)
    fit = {
        "fixed_ms": float(fixed),
        "ms_per_mparam_attention": float(per_attn),
        "ms_per_mparam_mlp": float(per_mlp),
        "fixed_share_of_dense": float(fixed / dense["ms_per_token"]),
        "residual_ms_max": float(np.abs(y - X @ [fixed, per_attn, per_mlp]).max()),
    }
    record = common.protocol(
        model=recipe.model.builtin,
        overrides=args.set,
        fit=fit,
        timing=f"ORT CPU, fused graph, {PROMPT_TOKENS}-token prompt, {NEW_TOKENS} greedy tokens, "
        + (
            f"one process, {args.rounds} rounds, medians and paired ratios"
            if args.rounds
            else f"median of {args.repeats} worker processes, interleaved"
        ),
        environment=environment,
        seconds=round(time.perf_counter() - started, 1),
    )
    rows_path, _ = common.write_results(args.json, rows, record)
    fig, ax = common.pyplot().subplots(figsize=(6, 4.2))
    ax.scatter([r["params"] / 1e6 for r in rows], [r["ms_per_token"] for r in rows])
    for r in rows:
        ax.annotate(r["shape"], (r["params"] / 1e6, r["ms_per_token"]), fontsize=7)
    ax.set_xlabel("total parameters (M)")
    ax.set_ylabel("ORT decode ms per token")
    ax.set_title(f"fixed {fixed:.1f} ms of the dense {dense['ms_per_token']:.1f} ms")
    common.save_figure(fig, Path(args.plot) if args.plot else rows_path.with_suffix(".png"))
    print(f"{'shape':<14} {'params':>8} {'tok/s':>7} {'x dense':>7} {'ms':>6} {'fit ms':>6} {'us/ch/layer':>11}")
    for r in rows:
        per = r.get("us_per_removed_channel_layer")
        print(
            f"{r['shape']:<14} {r['params'] / 1e6:>7.1f}M {r['decode_tok_s']:>7.1f} {r['decode_speedup_vs_dense']:>7.3f} "
            f"{r['ms_per_token']:>6.2f} {r['fit_ms']:>6.2f} {'' if per is None else f'{per:.3f}':>11}"
        )
    if args.rounds:
        print("paired per round, x dense: " + ", ".join(f"{r['shape']} {r['paired_vs_first']:.3f}" for r in rows))
    print(json.dumps(fit))
    return 0


if __name__ == "__main__":
    sys.exit(common.run(main))
