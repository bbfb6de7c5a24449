"""The pruning passes in real compiles of the seeded tiny Llama: search -> reform -> materialize ->
export -> ORT and TVM, the baselines as passes, the latency budget, and bad recipes (exit 2)."""

from __future__ import annotations

import json
import textwrap

import pytest
from conftest import write_recipe

PRUNE_RECIPE = """
version: 1
model: {{builtin: tiny-llama}}
data: {{calibration: "{calibration}", evaluation: "austen:persuasion"}}
passes:
{passes}
targets:
  - kind: cpu
    backends: {backends}
eval:
  parity: {{greedy_tokens: 8, decode_steps: 3}}
  perplexity: {{window: 64, stride: 64, max_windows: 4}}
  bench: {{enabled: false}}
cache: {{dir: {cache}}}
"""

STATS = """
  - type: importance
    windows: 4
    window: 64
"""
SEARCH = """
  - type: arch_search
    budget: {budget}
    generations: 3
    population: 8
    parents: 3
    mutations: 4
    crossovers: 2
    fitness_windows: 2
    fitness_window: 64
"""
TAIL = """
  - type: reform
    windows: 4
    window: 64
  - type: materialize
  - type: export_onnx
"""


@pytest.fixture
def prune_recipe(tmp_path):
    def make(passes: str, backends: str = "[ort]", calibration: str = "austen:emma", name: str = "recipe.yaml"):
        body = PRUNE_RECIPE.format(
            passes=textwrap.indent(textwrap.dedent(passes).strip("\n"), ""),
            backends=backends,
            calibration=calibration,
            cache=tmp_path / "cache",
        )
        return write_recipe(tmp_path, body, name)

    return make


def _search(budget: str = "{remove_ratio: 0.3}") -> str:
    return STATS + SEARCH.format(budget=budget) + TAIL


def test_search_reform_materialize_compiles_for_ort_and_tvm(cli, prune_recipe, tmp_path):
    out = tmp_path / "out"
    code, _, err = cli("compile", prune_recipe(_search(), backends="[ort, tvm]"), "-o", out)
    assert code == 0, err
    manifest = json.loads((out / "manifest.json").read_text())
    assert [p["name"] for p in manifest["passes"]] == [
        "importance",
        "arch_search",
        "reform",
        "materialize",
        "export_onnx",
    ]
    pruning = manifest["pruning"]
    assert pruning["params_total"] < pruning["dense_params_total"]
    assert pruning["params"]["removed_ratio"] >= 0.3 - 1e-9 and pruning["reformed"]
    # the checkpoint really is smaller, and every backend agrees with it token for token
    report = json.loads((out / "reports" / "validation.json").read_text())
    assert report["verdict"] == "pass"
    assert set(report["backends"]) >= {"ort", "tvm"}
    # the search log and plot are in the artifact; every candidate met the budget; the best
    # fitness never worsened across generations
    log = json.loads((out / "reports" / "search_log.json").read_text())
    budget = log["budget"]
    assert log["log"] and all(budget["floor"] <= r["cost"] <= budget["limit"] for r in log["log"])
    bests = [h["best_fitness"] for h in log["history"]]
    assert all(b2 <= b1 for b1, b2 in zip(bests, bests[1:]))
    assert log["fitness"]["aggregate"] == "pooled" and log["fitness"]["dense_by_source"] is None
    assert log["holdout"]["text"] == "austen:persuasion" and all(h["best_holdout"] > 1 for h in log["history"])
    assert (out / "reports" / "search.png").stat().st_size > 1000
    # quality is measured against the source model on the same protocol
    ev = json.loads((out / "reports" / "eval.json").read_text())
    assert ev["source"]["ppl"] > 0 and ev["backends"]["torch"]["ratio_vs_source"] > 0
    code, stdout, _ = cli(
        "run", out, "--prompt", "Hello", "--max-new-tokens", 6, "--backend", "tvm", "--raw", "--show-tokens"
    )
    assert code == 0 and len(json.loads(stdout.strip().splitlines()[-1])) == 6


@pytest.mark.parametrize("baseline", ["magnitude_prune", "wanda_sp", "flap"])
def test_baselines_are_passes_under_the_same_budget(cli, prune_recipe, tmp_path, baseline):
    passes = (
        STATS
        + f"""
  - type: {baseline}
    budget: {{remove_ratio: 0.3}}
  - type: materialize
  - type: export_onnx
"""
    )
    out = tmp_path / "out"
    code, _, err = cli("compile", prune_recipe(passes), "-o", out)
    assert code == 0, err
    pruning = json.loads((out / "manifest.json").read_text())["pruning"]
    assert pruning["method"] == baseline
    assert pruning["budget_cost"] <= pruning["budget"]["limit"]
    assert pruning["reformed"] == (baseline == "flap")  # FLAP's bias compensation replaces consumer weights


def test_latency_budget_search_meets_the_measured_table(cli, prune_recipe, tmp_path):
    from accelc.compiler.pruning import latency, masks
    from accelc.families.causal_lm import _builtin_dir, load_model

    # the tiny model's decode time is mostly fixed overhead: pick a ratio its table can meet
    model = load_model(_builtin_dir("tiny-llama"))
    space = masks.SearchSpace(masks.Geometry.from_model(model))
    table = latency.measure(space.geometry, space, model.config.vocab_size, latency.Protocol())
    ratio = (1 + table.cost(space.smallest_shape()) / table.cost(space.dense_shape())) / 2
    out = tmp_path / "out"
    code, _, err = cli("compile", prune_recipe(_search(f"{{latency_ratio: {ratio:.4f}}}")), "-o", out)
    assert code == 0, err
    log = json.loads((out / "reports" / "search_log.json").read_text())
    assert log["budget"]["kind"] == "LatencyBudget"
    assert all(r["cost"] <= log["budget"]["limit"] for r in log["log"])


def test_latency_table_is_measured_once_and_monotone_in_width(tmp_path, monkeypatch):
    from accelc.compiler.pruning import latency, masks

    # large enough that the widest MLP (4 layers x 3 x 256 x 1024 floats) clearly outweighs timing noise
    geo = masks.Geometry(
        num_layers=4,
        hidden=256,
        num_heads=8,
        num_kv_heads=2,
        head_dim=32,
        intermediate=1024,
        biased=frozenset(),
        total_params=2_000_000,
    )
    space = masks.SearchSpace(geo)
    protocol = latency.Protocol(repeats=3)
    table = latency.measure(geo, space, 256, protocol, cache_dir=tmp_path)
    assert all(b >= a for a, b in zip(table.mlp_ms, table.mlp_ms[1:]))
    heads = [table.attention[k] for k in sorted(table.attention, key=lambda k: tuple(map(int, k.split(","))))]
    assert all(b >= a for a, b in zip(heads, heads[1:]))
    assert len(table.attention) == len(space.head_options)

    def no_measuring(*args, **kwargs):
        raise AssertionError("the cached table should have been used")

    monkeypatch.setattr(latency, "time_stack", no_measuring)
    again = latency.measure(geo, space, 256, protocol, cache_dir=tmp_path)
    assert again.to_json() == table.to_json()
    dense, smallest = again.cost(space.dense_shape()), again.cost(space.smallest_shape())
    assert dense > smallest > again.fixed_ms
    budget = latency.LatencyBudget.from_ratio(space, again, (1 + smallest / dense) / 2)
    assert dense > budget.limit >= smallest


# --------------------------------------------------------------------------- bad input: exit 2


@pytest.mark.parametrize("ratio", [0, 1, 1.5, -0.2])
def test_ratio_outside_the_open_unit_interval(cli, prune_recipe, ratio):
    code, _, err = cli("compile", prune_recipe(_search(f"{{remove_ratio: {ratio}}}")))
    assert code == 2
    assert "recipe.yaml:" in err and "remove_ratio" in err


def test_a_budget_no_subnet_can_meet(cli, prune_recipe):
    code, _, err = cli("compile", prune_recipe(_search("{remove_ratio: 0.99}")))
    assert code == 2 and "no subnet can meet the budget" in err
    code, _, err = cli("compile", prune_recipe(_search("{max_params: 1000}"), name="r2.yaml"))
    assert code == 2 and "never pruned" in err


def test_two_budgets_at_once(cli, prune_recipe):
    code, _, err = cli("compile", prune_recipe(_search("{remove_ratio: 0.2, max_params: 90000}")))
    assert code == 2 and "exactly one of" in err


def test_calibration_text_shorter_than_one_window(cli, prune_recipe, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("Only a few words of calibration text.")
    code, _, err = cli("compile", prune_recipe(_search(), calibration=str(short)))
    assert code == 2 and "calibration text" in err and "window" in err


def test_search_without_statistics_names_the_missing_pass(cli, prune_recipe):
    code, _, err = cli("compile", prune_recipe(SEARCH.format(budget="{remove_ratio: 0.3}") + TAIL))
    assert code == 2 and "put the importance pass before it" in err


def test_pruning_after_export_is_refused(cli, prune_recipe):
    passes = "\n  - type: export_onnx\n" + STATS
    code, _, err = cli("compile", prune_recipe(passes))
    assert code == 2 and "before export_onnx" in err


def test_group_gqa_subnet_cannot_be_exported_yet(cli, prune_recipe):
    passes = (
        STATS
        + """
  - type: magnitude_prune
    budget: {remove_ratio: 0.6}
    gqa: group
  - type: materialize
  - type: export_onnx
"""
    )
    code, _, err = cli("compile", prune_recipe(passes))
    assert code == 2 and "gqa: query" in err


# a small search scoring one 64-token window of each of two sources, no held-out curve
TWO_WINDOW_SEARCH = {"budget": {"remove_ratio": 0.3}, "fitness_windows": 2, "fitness_window": 64, "holdout_windows": 0}


def search_two_sources(tmp_path, search: dict):
    """importance + arch_search (`search`) on the tiny model, calibrated on Emma and Macbeth."""
    from accelc.compiler.pipeline import PassManager, StepCache
    from accelc.compiler.recipe import load_recipe
    from accelc.families.causal_lm import ingest

    body = PRUNE_RECIPE.format(passes=STATS.strip("\n"), backends="[ort]", calibration="x", cache=tmp_path / "cache")
    body = body.replace('calibration: "x"', "calibration: [{text: austen:emma}, {text: shakespeare:macbeth}]")
    recipe = load_recipe(write_recipe(tmp_path, body))
    steps = [("importance", {"windows": 4, "window": 64}), ("arch_search", search)]
    return PassManager(recipe, StepCache(tmp_path / "cache")).run_steps(ingest(recipe.model, recipe), steps)


def test_worst_source_fitness_scores_every_calibration_source(tmp_path):
    """fitness: worst_source labels each fitness window with its source and records every
    source's dense perplexity; the search's best fitness is a ratio to dense."""
    search = {**TWO_WINDOW_SEARCH, "generations": 1, "population": 4, "fitness": "worst_source"}
    bundle = search_two_sources(tmp_path, search)
    log = json.loads(bundle.reports["search_log.json"].read_text())
    assert log["fitness"]["aggregate"] == "worst_source"
    dense = log["fitness"]["dense_by_source"]
    assert set(dense) == {"austen:emma", "shakespeare:macbeth"} and all(v > 1 for v in dense.values())
    assert [s["windows"] for s in log["fitness"]["sources"]] == [1, 1]
    assert log["best_fitness"] == min(r["fitness"] for r in log["log"]) and log["best_fitness"] > 0


def test_fitness_scores_one_window_of_every_source_by_default(tmp_path):
    """Without fitness_windows the search scores one window per calibration source (at least 4),
    so a fifth source is not left out of the fitness."""
    from accelc.compiler.pipeline import PassManager, StepCache
    from accelc.compiler.recipe import load_recipe
    from accelc.families.causal_lm import ingest

    plays = ["macbeth", "lear", "tempest", "othello", "julius_caesar"]
    body = PRUNE_RECIPE.format(passes=STATS.strip("\n"), backends="[ort]", calibration="x", cache=tmp_path / "cache")
    mixture = ", ".join(f"{{text: shakespeare:{play}}}" for play in plays)
    recipe = load_recipe(write_recipe(tmp_path, body.replace('calibration: "x"', f"calibration: [{mixture}]")))
    search = {"budget": {"remove_ratio": 0.3}, "generations": 1, "population": 2, "fitness_window": 64}
    cheap = {"holdout_windows": 0, "reform_in_fitness": False, "seed_with_flap": False}
    steps = [("importance", {"windows": 5, "window": 64}), ("arch_search", {**search, **cheap})]
    bundle = PassManager(recipe, StepCache(tmp_path / "cache")).run_steps(ingest(recipe.model, recipe), steps)
    fitness = json.loads(bundle.reports["search_log.json"].read_text())["fitness"]
    assert fitness["windows"] == 5 and [s["windows"] for s in fitness["sources"]] == [1] * 5
    assert [s["text"] for s in fitness["sources"]] == [f"shakespeare:{play}" for play in plays]


def test_restarts_pool_their_final_archives_and_the_held_out_calibration_windows_choose(tmp_path):
    """restarts: 2 runs the search with seeds 0 and 1; select_windows rescores every distinct
    finalist on calibration windows the fitness did not score, and the chosen subnet is the one
    with the lowest selection score (not necessarily the best fitness)."""
    from accelc.passes.pruning import load_subnet

    search = {**TWO_WINDOW_SEARCH, "generations": 2, "population": 4, "parents": 2, "mutations": 2, "crossovers": 1}
    search |= {"restarts": 2, "select_windows": 4, "select_skip": 8}
    bundle = search_two_sources(tmp_path, search)
    log = json.loads(bundle.reports["search_log.json"].read_text())
    assert [r["seed"] for r in log["restarts"]] == [0, 1]
    assert log["selection"]["windows"] == 4 and log["selection"]["by_source"] == {
        "austen:emma": 2,
        "shakespeare:macbeth": 2,
    }
    finalists = log["finalists"]
    assert len({f["key"] for f in finalists}) == len(finalists) >= 2
    assert {f["seed"] for f in finalists} <= {0, 1}
    assert [f["selection"] for f in finalists] == sorted(f["selection"] for f in finalists)
    chosen, info = load_subnet(bundle.intermediates["subnet"])
    assert chosen.key == finalists[0]["key"] and info["selection_score"] == finalists[0]["selection"]
    assert {r["seed"] for r in log["log"]} == {0, 1}


def test_importance_per_source_scores_the_statistics_windows_of_each_source(tmp_path):
    """importance_sources: max collects the importance pass's windows again, grouped by source
    (2 + 2 of its 4), and records them; the default's search log has no such entry."""
    search = {**TWO_WINDOW_SEARCH, "generations": 1, "population": 4, "reform_in_fitness": False}
    log = json.loads(
        search_two_sources(tmp_path, {**search, "importance_sources": "max"}).reports["search_log.json"].read_text()
    )
    assert log["importance"] == {
        "sources": "max",
        "windows_by_source": {"austen:emma": 2, "shakespeare:macbeth": 2},
    }
    default = json.loads(search_two_sources(tmp_path, search).reports["search_log.json"].read_text())
    assert "importance" not in default


def test_importance_per_source_refuses_the_weights_only_metric():
    """metric magnitude has no calibration statistics to score per source: the recipe is refused
    at validation, before any work, instead of being searched with pooled scores."""
    from accelc.passes.pruning import ArchSearch

    budget = {"remove_ratio": 0.2}
    with pytest.raises(ValueError, match="reads the weights only"):
        ArchSearch.Params(budget=budget, metric="magnitude", importance_sources="max")
    assert ArchSearch.Params(budget=budget, metric="magnitude").importance_sources == "pooled"
