"""The pruning benchmarks' own logic: the generalisation sweep's settings, the MLP block timed per
width, and the speed benchmark's in-process rounds over uniform, searched and rounded shapes of the
seeded tiny Llama."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile

from accelc.compiler.pruning import masks


def test_the_sweep_changes_one_setting_at_a_time():
    from benchmarks.prune_generalisation import settings

    args = argparse.Namespace(
        damp=0.2,
        windows=32,
        damps=[0.05, 0.2, 1.0],
        window_counts=[16, 32],
        admm=True,
        target="pruned",
        targets=["pruned", "dense"],
        layer_damps=[0.1, 1.0],
        intercept=True,
    )
    base = {"method": "closed_form", "damp": 0.2, "windows": 32, "target": "pruned", "damps": [], "intercept": False}
    assert settings(args) == [
        base,
        {**base, "damp": 0.05},
        {**base, "damp": 1.0},
        {**base, "windows": 16},
        {**base, "target": "dense"},
        {**base, "damps": [0.1, 1.0]},
        {**base, "intercept": True},
        {**base, "method": "admm"},
    ]


def test_paired_log_ratio_and_its_standard_error_come_from_the_window_differences():
    import math

    from benchmarks.prune_generalisation import paired

    # differences 0.1, 0.3: mean 0.2, sample sd sqrt(0.02), standard error sqrt(0.02 / 2) = 0.1
    mean, se = paired([2.1, 3.3], [2.0, 3.0])
    assert math.isclose(mean, 0.2) and math.isclose(se, 0.1)
    # the same shift in every window is known exactly, however different the windows are
    assert paired([1.5, 4.5, 2.5], [1.0, 4.0, 2.0]) == (0.5, 0.0)
    assert paired([2.0], [1.5]) == (0.5, 0.0)


def test_kernel_widths_time_the_mlp_block_at_each_width(tmp_path, monkeypatch):
    from benchmarks import prune_speed

    out = tmp_path / "kernels.json"
    argv = ["prune_speed", "--kernel-widths", "64", "48", "--calls", "3", "--json", str(out)]
    monkeypatch.setattr(sys, "argv", argv)
    assert prune_speed.main() == 0
    rows = json.loads(out.read_text())
    assert [r["width"] for r in rows] == [64, 48]
    assert all(r["us_per_layer"] > 0 and r["us_per_channel"] == r["us_per_layer"] / r["width"] for r in rows)


def test_speed_rounds_time_uniform_searched_and_rounded_shapes(tmp_path, monkeypatch):
    from accelc.families import tiny
    from accelc.families.causal_lm import load_model
    from benchmarks import prune_speed

    model = load_model(tiny.build("tiny-llama", tmp_path / "tiny"))
    space = masks.SearchSpace(masks.Geometry.from_model(model), multiple=8)
    dense = space.dense()
    subnet = masks.Subnet(tuple(masks.LayerMask(m.heads, m.channels[:120]) for m in dense.layers))
    (tmp_path / "subnet.json").write_text(json.dumps({"subnet": subnet.to_json(), "info": {}}))
    out = tmp_path / "speed.json"
    argv = ["prune_speed", "--set", "model.builtin=tiny-llama", "--mlp-widths", "128", "--heads", "2"]
    argv += ["--subnet", str(tmp_path / "subnet.json"), "--round-to", "64", "--rounds", "2", "--json", str(out)]
    monkeypatch.setattr(sys, "argv", argv)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    assert prune_speed.main() == 0
    assert not list(scratch.iterdir())  # the exported graphs are gone once timed
    rows = {r["shape"]: r for r in json.loads(out.read_text())}
    assert list(rows) == ["dense", "mlp128", "heads2", "subnet0", "subnet0/64"]
    assert rows["subnet0"]["mlp_widths"] == [120, 120] and rows["subnet0/64"]["mlp_widths"] == [64, 64]
    assert rows["heads2"]["heads"] == [2, 2] and rows["dense"]["paired_vs_first"] == 1.0
    assert all(len(r["rounds"]) == 2 and r["decode_tok_s"] > 0 for r in rows.values())
    assert rows["subnet0/64"]["params"] < rows["subnet0"]["params"] < rows["dense"]["params"]
