"""Benchmarks are code that ships: every module imports, every bench recipe validates, the shared
helper writes rows and a protocol, and the cheapest benchmark runs end to end on a tiny model."""

from __future__ import annotations

import importlib
import json
import pkgutil
import sys

import pytest
from conftest import REPO

import benchmarks
from benchmarks import common

MODULES = sorted(info.name for info in pkgutil.iter_modules(benchmarks.__path__))
BENCH_RECIPES = sorted((REPO / "recipes" / "bench").glob("*.yaml"))


def test_the_package_holds_the_benchmarks():
    assert {"common", "cpu_backends", "draft_sweep", "kv_cache", "search_vs_baselines", "speculative"} <= set(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_every_benchmark_imports_without_path_tricks(name):
    module = importlib.import_module(f"benchmarks.{name}")
    source = (REPO / "benchmarks" / f"{name}.py").read_text()
    assert "sys.path" not in source and "from speculative import" not in source
    if name != "common":
        assert callable(module.main)
        assert f"python -m benchmarks.{name}" in module.__doc__


@pytest.mark.parametrize("path", BENCH_RECIPES, ids=lambda p: p.name)
def test_every_bench_recipe_validates(cli, path):
    code, out, err = cli("validate", path)
    assert code == 0, err
    assert json.loads(out)["valid"] is True


def test_speculative_draft_flags_override_the_recipe_draft():
    from benchmarks.speculative import compile_overrides, draft_spec

    def args(**given):
        flags = dict(
            draft_ratio=None,
            draft_layers=None,
            draft_weights=None,
            draft_block=None,
            draft_symmetric=None,
            draft_vocab=None,
            lookup=0,
        )
        return type("Args", (), {**flags, **given})()

    default = draft_spec(args())
    assert default == {"from_target": True, "weights": "int8", "block_size": 128, "symmetric": True, "vocab": 8192}
    layers = draft_spec(args(draft_layers=[0, 2], draft_weights="fp32", draft_vocab=0, lookup=4))
    assert layers == {"keep_layers": [0, 2], "weights": "fp32", "lookup": 4}
    recipe = common.load_bench_recipe("speculative", compile_overrides(layers, 5))
    step = recipe.passes[1]
    assert step.draft.keep_layers == [0, 2] and not step.draft.from_target and step.gamma_max == 5


def test_search_vs_baselines_builds_each_method_from_its_recipe(tmp_path):
    from benchmarks.search_vs_baselines import METHODS, method_recipe

    chains = {
        method: [step.type for step in method_recipe(method, 0.3, {"generations": 2}, tmp_path).passes]
        for method in METHODS
    }
    assert chains == {
        "magnitude": ["importance", "magnitude_prune", "materialize"],
        "wanda_sp": ["importance", "wanda_sp", "materialize"],
        "flap": ["importance", "flap", "materialize"],
        "search": ["importance", "arch_search", "materialize"],
        "search_reform": ["importance", "arch_search", "reform", "materialize"],
    }
    search = method_recipe("search", 0.3, {"generations": 2}, tmp_path)
    assert search.passes[1].budget.remove_ratio == 0.3 and search.passes[1].generations == 2
    assert search.cache.dir == str(tmp_path)


def test_protocol_and_rows_are_written_side_by_side(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "orig_argv", ["python", "-m", "benchmarks.x", "--json", "out.json"], raising=False)
    record = common.protocol(recipe="recipes/bench/x.yaml")
    rows = [{"method": "a", "tok_s": 2.0}, {"method": "b", "tok_s": 3.0}]
    rows_path, protocol_path = common.write_results(tmp_path / "sub" / "out.json", rows, record)
    assert json.loads(rows_path.read_text()) == rows
    written = json.loads(protocol_path.read_text())
    assert protocol_path.name == "out.protocol.json"
    assert written["command"] == ["python", "-m", "benchmarks.x", "--json", "out.json"]
    assert written["recipe"] == "recipes/bench/x.yaml"
    assert written["machine"]["logical_cores"] >= 1
    assert written["versions"]["torch"] and written["versions"]["onnxruntime"]
    assert written["git"]["commit"] is None or len(written["git"]["commit"]) == 40
    assert written["threads"]["OMP_WAIT_POLICY"] == "PASSIVE"


def test_paired_ratios_pair_measurements_taken_together():
    assert common.paired_ratios([2.0, 9.0, 4.0], [1.0, 3.0, 4.0]) == [2.0, 3.0, 1.0]
    assert common.median_ratio([2.0, 9.0, 4.0], [1.0, 3.0, 4.0]) == 2.0
    with pytest.raises(ValueError, match="as many measurements"):
        common.paired_ratios([1.0], [1.0, 2.0])


def test_cpu_backends_runs_end_to_end_on_a_tiny_model(tmp_path):
    from benchmarks.cpu_backends import main

    out = tmp_path / "cpu.json"
    code = main(
        [
            "--artifact",
            str(tmp_path / "artifact"),
            "--set",
            "model.builtin=tiny-llama",
            "--set",
            "targets.0.backends=[ort]",
            "--set",
            f"cache.dir={tmp_path / 'cache'}",
            "--repeats",
            "1",
            "--new-tokens",
            "4",
            "--prompt-tokens",
            "16",
            "--backends",
            "torch",
            "ort",
            "--json",
            str(out),
        ]
    )
    assert code == 0
    rows = json.loads(out.read_text())
    assert [row["backend"] for row in rows] == ["torch", "ort"]
    assert all(row["decode_tok_s_median"] > 0 and row["peak_rss_mb_median"] > 0 for row in rows)
    assert rows[0]["decode_speedup_vs_torch"] == 1.0
    record = json.loads(out.with_suffix(".protocol.json").read_text())
    assert record["overrides"][0] == "model.builtin=tiny-llama" and record["bench"]["repeats"] == 1
    assert out.with_suffix(".png").stat().st_size > 0


def test_search_benchmark_refuses_evaluating_on_calibration_text():
    from accelc.errors import UsageError
    from benchmarks.search_vs_baselines import EVAL_TEXTS, check_held_out

    mixture = [{"text": "austen:emma", "weight": 2}, {"text": "pydoc:topics"}]
    check_held_out(mixture, list(EVAL_TEXTS))  # the defaults are held out from this mixture
    with pytest.raises(UsageError, match=r"--eval-texts pydoc:topics: also in data\.calibration"):
        check_held_out(mixture, ["austen:persuasion", "pydoc:topics"])


def test_every_gguf_weights_configuration_is_a_valid_recipe():
    from benchmarks import gguf_weights

    for name, overrides in gguf_weights.CONFIGS.items():
        recipe = common.load_bench_recipe("gguf_weights", overrides)
        quantize = [p for p in recipe.passes if p.type == "quantize_weights_int4"]
        if "-h" in name:  # int4[-bB]-hH: the head quantised at H bits in blocks of B
            (q,) = quantize
            assert q.head and f"-h{q.head_bits}" in name and (q.block_size == 32 or f"-b{q.block_size}" in name)


def test_frechet_distance_of_known_gaussians():
    import numpy as np

    from benchmarks.jacobi_flow import frechet

    rng = np.random.default_rng(0)
    a = rng.normal(size=(4, 4))
    cov = a @ a.T + np.eye(4)
    assert abs(frechet(np.zeros(4), cov, np.zeros(4), cov)) < 1e-9
    # diagonal: |mu|^2 + sum (sigma_a - sigma_b)^2
    mu = np.array([1.0, 0.0, 2.0])
    got = frechet(mu, np.diag([1.0, 4.0, 9.0]), np.zeros(3), np.diag([4.0, 4.0, 1.0]))
    assert abs(got - (5.0 + 1.0 + 0.0 + 4.0)) < 1e-9


def test_flow_benchmark_refuses_a_thread_count_below_one(capsys):
    from benchmarks import jacobi_flow

    for bad in ("0", "-1", "two"):
        with pytest.raises(SystemExit) as exit_info:
            jacobi_flow.main(["--json", "unused.json", "--reference-threads", bad])
        assert exit_info.value.code == 2
        assert "is not a thread count" in capsys.readouterr().err
    assert jacobi_flow.positive_count("2") == 2
