"""HALP end to end on a local Ray instance (started once for this module): the partition pass on the
tiny CNN, its proof and plan in the artifact, Ray actors bit-exact against the unpartitioned run,
`accelc run`, and bad plans refused."""

from __future__ import annotations

import json

import pytest
import torch

from accelc.errors import UsageError
from accelc.families import cnn, cnn_model
from accelc.passes import partition
from accelc.runtime import halp

ray = pytest.importorskip("ray")

RECIPE = """
version: 1
model:
  builtin: tiny-cnn
passes:
  - type: partition
    workers: 2
    measure_images: 2
cache:
  dir: {cache}
"""


@pytest.fixture(scope="module")
def local_ray():
    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
                 _node_ip_address="127.0.0.1", configure_logging=False)  # fmt: skip
    yield ray
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def halp_artifact(local_ray, tmp_path_factory):
    from accelc.compiler.compile import compile_recipe
    from accelc.compiler.recipe import load_recipe

    root = tmp_path_factory.mktemp("halp")
    recipe = root / "recipe.yaml"
    recipe.write_text(RECIPE.format(cache=root / "cache"))
    manifest = compile_recipe(load_recipe(recipe), root / "art")
    return root / "art", manifest


def test_the_pass_writes_a_proved_plan_and_its_report(halp_artifact):
    art, manifest = halp_artifact
    plan = halp.Plan.from_json(manifest["decode_plan"]["halp"], "manifest")
    assert plan.workers == 2 and plan.groups
    assert json.loads((art / "decode/plan.json").read_text())["halp"] == manifest["decode_plan"]["halp"]
    assert manifest["metrics"]["halp"]["bit_exact"] is True
    config = cnn_model.read_config(art / "model/hf")
    assert plan.head == partition.feature_layers(config)
    for group in plan.groups:  # the pieces tile each group's output rows in order
        assert group.pieces[0].out_first == 0
        assert all(a.out_last + 1 == b.out_first for a, b in zip(group.pieces, group.pieces[1:]))
        assert sorted(p.worker for p in group.pieces if p.worker is not None) == [0, 1]
    report = json.loads((art / "reports/partition.json").read_text())
    assert report["link"]["bytes_per_s"] > 0
    measured = report["measured"]
    assert len(measured["groups"]) == len(plan.groups) and measured["seconds"] > 0
    for group in measured["groups"]:  # predicted and measured, side by side per worker
        assert set(group["predicted_workers_s"]) == set(group["measured_worker_compute_s"]) == {"0", "1"}


def test_ray_workers_are_bit_exact_against_the_unpartitioned_model(local_ray):
    from accelc.runtime.halp_ray import HalpCluster

    config, model = cnn_model.load(cnn.builtin_dir("tiny-cnn"))
    modules = list(model.layers)
    costs = halp.layer_costs(modules, torch.rand(1, *config.input), 1)
    link = (1e-3, 1e9)
    # every stage a group of its own, the overlap on the host (HALP's zones) or on the workers (the
    # halo): workers keep their rows from group to group and receive only what they lack
    points = partition.cut_points(config)
    stages = list(zip(points, points[1:]))
    plans = {
        name: halp.Plan(2, 1, tuple(splitter(config, costs, link, a, b, 2, 1) for a, b in stages), points[-1])
        for name, splitter in (("host", partition.split), ("workers", partition.split_halo))
    }
    assert any(p.worker is None for g in plans["host"].groups for p in g.pieces)
    assert len(points) > 2 and all(p.worker is not None for g in plans["workers"].groups for p in g.pieces)
    x, _ = cnn_model.fashion_mnist_inputs(config.input, "test", 3)
    with HalpCluster(cnn.builtin_dir("tiny-cnn"), plans) as cluster:
        assert len({tuple(i["cores"]) for i in cluster.info}) == 2  # each actor pinned to its own core
        got = {name: cluster.infer(x, plan=name) for name in plans}
        timings: list = []
        cluster.infer(x, timings, plan="workers")
        again = cluster.infer(x, plan="host")
    torch.set_num_threads(cluster.head_threads)
    for name, plan in plans.items():
        assert (got[name] == halp.reference(modules, plan, torch.from_numpy(x)).numpy()).all(), name
    assert (again == got["host"]).all()
    assert len(timings) == len(plans["workers"].groups)
    assert all(set(t["worker_seconds"]) == {0, 1} for t in timings)


def test_a_worker_sends_back_only_the_rows_other_pieces_read():
    from accelc.runtime.receptive_field import Segment

    def group(*pieces):
        return halp.Group(0, 1, 8, tuple(Segment(*p) for p in pieces))

    plan = halp.Plan(
        2,
        1,
        (
            group((0, 0, 4, 0, 3), (1, 3, 7, 4, 7)),  # halo: slabs overlap, output rows split at 4
            group((0, 0, 4, 0, 3), (None, 2, 5, 3, 4), (1, 4, 7, 5, 7)),  # HALP: a host zone in the middle
        ),
        2,
    )
    first, second = plan.groups
    assert halp.rows_wanted_elsewhere(plan, 0, first.pieces[0]) == [(2, 3)]  # the host's zone reads rows 2-5
    assert halp.rows_wanted_elsewhere(plan, 0, first.pieces[1]) == [(4, 5)]  # worker 0 reads 4, the host 4-5
    assert halp.kept_rows(plan, 1, second.pieces[0]) == (0, 3)  # rows 0-3 stay on worker 0, row 4 travels
    assert halp.kept_rows(plan, 1, second.pieces[1]) is None  # the host keeps nothing
    assert halp.rows_wanted_elsewhere(plan, 1, second.pieces[2]) == [(5, 7)]  # the last group: everything


def test_accelc_run_classifies_through_the_plan(halp_artifact, tmp_path, cli):
    art, _ = halp_artifact
    code, out, _ = cli("run", art, "--samples", "6", "--seed", "2", "--out", tmp_path / "preds.json")
    assert code == 0 and "accuracy" in out and "2 Ray worker(s)" in out
    assert len(json.loads((tmp_path / "preds.json").read_text())["predictions"]) == 6


def test_accelc_bench_times_the_plan_against_one_worker(halp_artifact, tmp_path, cli):
    art, _ = halp_artifact
    code, _, _ = cli("bench", art, "--repeats", "2", "--json", tmp_path / "bench.json")
    result = json.loads((tmp_path / "bench.json").read_text())
    assert code == 0 and result["workers"] == 2 and result["bit_exact"] is True
    assert set(result["latency_ms"]) == {"1", "2"} and result["speedup"] > 0


def test_malformed_plans_are_refused():
    with pytest.raises(UsageError, match="not a HALP plan"):
        halp.Plan.from_json({"kind": "speculative"}, "decode/plan.json")
    with pytest.raises(UsageError, match="malformed HALP plan"):
        halp.Plan.from_json({"kind": "halp", "workers": 2}, "decode/plan.json")


def test_more_workers_than_cores_on_local_ray_is_a_usage_error(local_ray):
    from accelc.runtime.halp_ray import HalpCluster

    config = cnn_model.BUILTINS["tiny-cnn"]
    with pytest.raises(UsageError, match="cores"):
        HalpCluster(cnn.builtin_dir("tiny-cnn"), partition.single_plan(config, 1), workers=64)


def test_ray_address_is_refused_off_the_partitioned_path(halp_artifact, cli):
    art, _ = halp_artifact
    code, _, err = cli("run", art, "--backend", "vta_sim", "--ray-address", "127.0.0.1:1")
    assert code == 2 and "--ray-address applies to partitioned artifacts" in err
