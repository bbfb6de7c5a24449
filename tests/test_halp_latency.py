"""The partition pass's latency model on synthetic costs: balanced workers, the host's share, K."""

from __future__ import annotations

from accelc.families import cnn_model
from accelc.passes import partition

VGG16 = cnn_model.BUILTINS["vgg16"]


def synthetic_costs(config, per_mac: float = 1e-10, fixed: float = 2e-5) -> list[dict]:
    """Seconds proportional to each layer's MACs per output row, a small fixed cost per call."""
    shapes, macs = config.shapes(), config.macs()
    costs = []
    for i in range(len(config.layers)):
        rows = shapes[i + 1][1] if len(shapes[i + 1]) == 3 else 1
        per_row = per_mac * max(macs[i], 1) / rows
        costs.append({"fixed": fixed, "per_row": per_row, "in": list(shapes[i]), "out": list(shapes[i + 1])})
    return costs


def test_two_workers_are_balanced_and_the_host_keeps_only_overlap_zones():
    costs = synthetic_costs(VGG16)
    plan = partition.plan_for(VGG16, costs, (1e-4, 1e9), 2, 1, 1, host_shares=True)
    assert plan.head == partition.feature_layers(VGG16) == 31
    for group, detail in zip(plan.groups, plan.predicted["groups"]):
        times = detail["workers_s"]
        assert abs(times["0"] - times["1"]) <= 0.1 * max(times.values())  # balanced within a row's cost
        host_rows = sum(p.out_rows for p in group.pieces if p.worker is None)
        out_rows = group.pieces[-1].out_last + 1
        assert host_rows <= max(4, out_rows // 3)  # only the overlap zone stays on the host
    whole = partition.plan_for(VGG16, costs, (1e-4, 1e9), 1, 1, 1, host_shares=True)
    assert plan.predicted["seconds"] < 0.65 * whole.predicted["seconds"]


def test_a_slow_link_keeps_one_worker():
    costs = synthetic_costs(VGG16)
    slow = (0.5, 1e6)  # half a second a call, 1 MB/s: nothing pays for its transfers
    two = partition.plan_for(VGG16, costs, slow, 2, 1, 1, host_shares=True, overlap="host")
    one = partition.plan_for(VGG16, costs, slow, 1, 1, 1, host_shares=True)
    assert one.predicted["seconds"] < two.predicted["seconds"]


def test_overlap_goes_to_the_workers_where_the_host_would_take_their_cores():
    # thin slabs cost as much per row as whole ones plus a call's fixed cost: the host's zones add
    # to every group's time when it shares the cores, and overlap with the workers when it does not
    costs = synthetic_costs(VGG16, fixed=2e-3)
    link = (1e-4, 1e9)
    shared = {o: partition.plan_for(VGG16, costs, link, 2, 1, 1, True, o) for o in ("auto", "host", "workers")}
    assert all(p.worker is not None for g in shared["workers"].groups for p in g.pieces)
    assert any(p.worker is None for g in shared["host"].groups for p in g.pieces)
    assert shared["auto"].predicted["seconds"] <= min(shared[o].predicted["seconds"] for o in ("host", "workers"))
    assert shared["auto"].predicted["seconds"] < shared["host"].predicted["seconds"]
    spare = {o: partition.plan_for(VGG16, costs, link, 2, 1, 1, False, o) for o in ("auto", "host")}
    assert spare["auto"].predicted["seconds"] <= spare["host"].predicted["seconds"]
    assert any(p.worker is None for g in spare["auto"].groups for p in g.pieces)  # a core of its own: HALP's zones


def test_halo_plans_cut_the_output_rows_and_balance_three_workers():
    costs = synthetic_costs(VGG16)
    three = partition.plan_for(VGG16, costs, (1e-4, 1e9), 3, 1, 1, host_shares=True, overlap="workers")
    for group in three.groups:
        assert [p.worker for p in group.pieces] == [0, 1, 2]
        assert group.pieces[0].out_first == 0
        assert all(a.out_last + 1 == b.out_first for a, b in zip(group.pieces, group.pieces[1:]))
    times = three.predicted["groups"][0]["workers_s"]
    assert max(times.values()) <= 1.15 * min(times.values())


def test_more_workers_split_the_rows_further():
    costs = synthetic_costs(VGG16)
    three = partition.plan_for(VGG16, costs, (1e-4, 1e9), 3, 1, 1, host_shares=False)
    first = three.groups[0]
    assert sorted(p.worker for p in first.pieces if p.worker is not None) == [0, 1, 2]
    times = three.predicted["groups"][0]["workers_s"]
    assert max(times.values()) <= 1.15 * min(times.values())


def test_a_cnn_without_conv_layers_is_exit_2(tmp_path, cli):
    config = cnn_model.CNNConfig((1, 4, 4), 2, ({"op": "flatten"}, {"op": "linear", "in": 16, "out": 2}))
    cnn_model.save(cnn_model.seeded(config), config, tmp_path / "mlp")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"version: 1\nmodel:\n  path: {tmp_path / 'mlp'}\npasses:\n  - type: partition\n"
                      f"cache:\n  dir: {tmp_path / 'cache'}\n")  # fmt: skip
    code, _, err = cli("compile", recipe, "-o", tmp_path / "art")
    assert code == 2 and "no conv2d/max_pool2d layers" in err and "Traceback" not in err
    assert not (tmp_path / "art").exists()
