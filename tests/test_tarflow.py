"""The TarFlow family end to end on the tiny seeded flow: compile (export_flow, jacobi, cpu/ort),
prove, `accelc run` (a PNG grid), `accelc bench`, and its inputs refused by name."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import write_recipe
from PIL import Image

from accelc.families import tarflow_model
from accelc.families.tarflow import TINY_CONFIG, tiny_model

RECIPE = """
version: 1
model:
  {model}
passes:
  - type: export_flow
  - type: jacobi
    backend: ort
    batch: 4
    threads: 1
targets:
  - kind: cpu
    backends: [ort]
    ort:
      intra_op_threads: 1
eval:
  bench:
    repeats: 1
    backends: [torch, ort]
cache:
  dir: {cache}
"""


def recipe(tmp_path, model: str = "builtin: tarflow-tiny", name: str = "recipe.yaml"):
    return write_recipe(tmp_path, RECIPE.format(model=model, cache=tmp_path / "cache"), name)


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    from accelc.cli import main

    tmp_path = tmp_path_factory.mktemp("tarflow")
    out = tmp_path / "art"
    assert main(["compile", str(recipe(tmp_path)), "-o", str(out)]) == 0
    return out


def test_compile_proves_parity_and_plans_a_schedule(artifact):
    manifest = json.loads((artifact / "manifest.json").read_text())
    metrics = manifest["metrics"]
    assert manifest["model"]["family"] == "tarflow"
    assert metrics["validation"] == {"ort": "pass"} and metrics["max_abs_diff"]["ort"] < 1e-4
    plan = json.loads((artifact / "decode" / "plan.json").read_text())
    jacobi = plan["jacobi"]
    assert plan["schedule"] == jacobi["schedule"] and len(plan["schedule"]["blocks"]) == TINY_CONFIG.blocks
    steps = TINY_CONFIG.tokens - 1
    assert set(jacobi["calls_per_block"]) == {"1", "8", str(steps)}
    assert plan["threads"] == jacobi["threads"] == 1 and set(jacobi["call_cost_s_by_threads"]) == {"1"}  # pinned
    assert jacobi["calls_per_block"]["1"] == [steps] * TINY_CONFIG.blocks  # sequential: one call a token
    chosen = [b["chunk"] for b in plan["schedule"]["blocks"]]
    predicted = [min(jacobi["calls_per_block"][str(c)][b] * jacobi["call_cost_s"][str(c)] for c in (1, 8, steps))
                 for b in range(TINY_CONFIG.blocks)]  # fmt: skip
    if plan["schedule"]["name"] != "sequential":  # each block got its cheapest predicted chunk length
        for b, c in enumerate(chosen):
            assert jacobi["calls_per_block"][str(c)][b] * jacobi["call_cost_s"][str(c)] == predicted[b]
    tried = {t["tol"]: t for t in jacobi["tolerances"]}
    assert set(tried) == {1e-3, 3e-3, 1e-2}
    within = [t for t in tried.values() if t["mean_pixel_diff"] <= jacobi["max_pixel_diff"]]
    if plan["schedule"]["name"] != "sequential":  # the fastest tolerance whose samples stay within the bound
        assert tried[jacobi["tol"]] in within
        assert tried[jacobi["tol"]]["predicted_speedup"] == max(t["predicted_speedup"] for t in within)
    quality = metrics["quality"]
    assert quality["schedule_max_abs_diff_from_sequential"] < 0.05
    assert abs(quality["samples_bits_per_dim"] - quality["sequential_samples_bits_per_dim"]) < 0.01
    assert (artifact / "model" / "onnx" / "flow.onnx" / "flow.json").exists()


def test_unpinned_threads_are_timed_at_each_count_and_the_plan_keeps_the_fastest(tmp_path):
    from accelc.cli import main
    from accelc.passes.jacobi import thread_counts

    path = recipe(tmp_path)
    path.write_text(path.read_text().replace("    threads: 1\n", ""))
    out = tmp_path / "art"
    assert main(["compile", str(path), "-o", str(out)]) == 0
    plan = json.loads((out / "decode" / "plan.json").read_text())
    jacobi = plan["jacobi"]
    by_threads = {
        int(t): {int(c): s for c, s in costs.items()} for t, costs in jacobi["call_cost_s_by_threads"].items()
    }
    assert sorted(by_threads) == thread_counts(0, "ort") and plan["threads"] == jacobi["threads"] in by_threads
    assert jacobi["call_cost_s"] == jacobi["call_cost_s_by_threads"][str(plan["threads"])]
    chosen = [b["chunk"] for b in plan["schedule"]["blocks"]]

    def predicted(threads, chunks):
        return sum(jacobi["calls_per_block"][str(c)][b] * by_threads[threads][c] for b, c in enumerate(chunks))

    if plan["schedule"]["name"] != "sequential":  # no count's best chunks are predicted faster
        best = predicted(plan["threads"], chosen)
        for costs in by_threads.values():
            blocks = range(len(chosen))
            assert best <= sum(min(jacobi["calls_per_block"][str(c)][b] * costs[c] for c in costs) for b in blocks)
    else:  # sequential runs at its own fastest count
        assert by_threads[plan["threads"]][1] == min(costs[1] for costs in by_threads.values())


def test_run_writes_a_grid_of_the_samples_on_each_backend(cli, artifact, tmp_path):
    grids = {}
    for backend in ("ort", "torch"):
        out = tmp_path / f"{backend}.png"
        code, stdout, err = cli("run", artifact, "--samples", "5", "--seed", "3", "--backend", backend, "--out", out)
        assert code == 0, err
        summary = json.loads(stdout)
        assert summary["samples"] == 5 and summary["backend"] == backend and summary["calls"] > 0
        grids[backend] = np.asarray(Image.open(out))
    size = TINY_CONFIG.image_size
    assert grids["ort"].shape == (2 + 2 * (size + 2), 2 + 3 * (size + 2))  # 5 samples: 3 columns, 2 rows
    assert np.abs(grids["ort"].astype(int) - grids["torch"]).max() <= 1  # same noise, same schedule
    assert grids["ort"].std() > 0


def test_bench_times_every_schedule_against_sequential(cli, artifact, tmp_path):
    code, stdout, err = cli("bench", artifact, "--repeats", "1", "--json", tmp_path / "bench.json")
    assert code == 0, err
    result = json.loads((tmp_path / "bench.json").read_text())
    assert set(result["backends"]) == {"torch", "ort"}
    for rows in result["backends"].values():
        assert {"sequential", "jacobi", "gs_jacobi"} <= set(rows)
        assert rows["sequential"]["speedup_vs_sequential"] == 1.0
    assert (tmp_path / "bench.png").exists() and "gs_jacobi" in stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["--samples", "4"], "give --out FILE.png"),
        (["--samples", "0", "--out", "x.png"], "--samples 0 is below its minimum 1"),
        (["--samples", "5000", "--out", "x.png"], "at most 4096"),
        (["--seed", "-1", "--out", "x.png"], "--seed -1"),
    ],
)
def test_run_refuses_bad_options_by_name(cli, artifact, args, message):
    code, _, err = cli("run", artifact, *args)
    assert code == 2 and message in err and "Traceback" not in err


def test_a_tarflow_folder_is_recognised_and_a_broken_one_refused_by_name(cli, tmp_path):
    folder = tmp_path / "flow"
    tarflow_model.save(tiny_model(), folder)
    code, _, err = cli("validate", recipe(tmp_path, f"path: {folder}"))
    assert code == 0, err
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "patch": 3}))
    code, _, err = cli("validate", recipe(tmp_path, f"path: {folder}"))
    assert code == 2 and "patch 3 does not divide image_size 8" in err and "config.json" in err
    (folder / "config.json").write_text(json.dumps({**config, "width": 64}))
    code, _, err = cli("compile", recipe(tmp_path, f"path: {folder}"), "-o", tmp_path / "out")
    assert code == 2 and "weights do not belong to" in err and not (tmp_path / "out").exists()


def test_passes_and_backends_of_other_families_are_refused(cli, tmp_path):
    body = RECIPE.format(model="builtin: tarflow-tiny", cache=tmp_path / "cache").replace(
        "backends: [ort]\n", "backends: [ort, tvm]\n", 1
    )
    code, _, err = cli("validate", write_recipe(tmp_path, body))
    assert code == 2 and "backend 'tvm' does not apply to the tarflow family" in err
    body = RECIPE.format(model="builtin: tarflow-tiny", cache=tmp_path / "cache").replace(
        "type: export_flow", "type: export_onnx"
    )
    code, _, err = cli("validate", write_recipe(tmp_path, body))
    assert code == 2 and "'export_onnx' does not apply to the tarflow family" in err and "export_flow" in err


def test_training_resumes_from_its_checkpoint_to_the_same_weights(tmp_path):
    from accelc.families.tarflow_model import TarFlowConfig
    from accelc.families.tarflow_train import TrainSpec, train

    config = TarFlowConfig(width=16, blocks=2, layers=1, heads=2)
    spec = TrainSpec(config=config, steps=4, batch=8, warmup=2, checkpoint_every=2, test_images=50)
    train(TrainSpec(**{**spec.__dict__, "steps": 2}), tmp_path / "resumed")  # stops after step 2
    resumed = train(spec, tmp_path / "resumed")
    fresh = train(spec, tmp_path / "fresh")
    a, b = tarflow_model.load(resumed), tarflow_model.load(fresh)
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(x, y, msg=name)
    training = json.loads((fresh / "config.json").read_text())["accelc_training"]
    assert training["steps"] == 4 and training["test_images"] == 50 and 0 < training["test_bits_per_dim"] < 16
