"""Fuzz the TarFlow family's inputs (issue 22's contract): a damaged model folder at ingest and a
damaged artifact at run time end with exit 2, 3 or 5, no traceback, the damaged file named, and
neither the artifact nor the pass cache modified."""

from __future__ import annotations

import shutil

import pytest
from conftest import write_recipe
from fuzzkit import assert_refused, copy_artifact, damage, examples, unchanged
from hypothesis import given
from hypothesis import strategies as st

from accelc.families import tarflow_model
from accelc.families.tarflow import tiny_model

damages = st.one_of(
    st.tuples(st.just("truncate"), st.floats(0, 0.999)),
    st.tuples(st.just("flip"), st.lists(st.floats(0, 0.999), min_size=1, max_size=4), st.integers(0, 7)),
    st.tuples(st.just("junk"), st.floats(0, 1), st.binary(min_size=1, max_size=16)),
)
RECIPE = """
model:
  path: {path}
passes:
  - type: export_flow
targets:
  - kind: cpu
    backends: [ort]
eval:
  bench: {{enabled: false}}
cache:
  dir: {cache}
"""


def flow_folder(tmp_path):
    folder = tmp_path / "flow"
    shutil.rmtree(folder, ignore_errors=True)
    tarflow_model.save(tiny_model(), folder)
    return folder


def compile_refused(cli, tmp_path, folder, *, also_ok: bool = False):
    shutil.rmtree(tmp_path / "cache", ignore_errors=True)
    recipe = write_recipe(tmp_path, RECIPE.format(path=folder, cache=tmp_path / "cache"))
    return assert_refused(cli("-q", "compile", recipe, "-o", tmp_path / "out"), also_ok=also_ok)


@examples(6)
@given(how=damages)
def test_damaged_weights_at_ingest(cli, tmp_path, how):
    folder = flow_folder(tmp_path)
    weights = folder / tarflow_model.WEIGHTS_FILE
    header = 8 + int.from_bytes(weights.read_bytes()[:8], "little")
    if how[0] != "truncate":  # inside the header: damaged values are another model, not a bad file
        scale = header / weights.stat().st_size
        how = (how[0], [p * scale for p in how[1]], how[2]) if how[0] == "flip" else (how[0], how[1] * scale, how[2])
    damage(weights, how)
    compile_refused(cli, tmp_path, folder, also_ok=how[0] != "truncate")


@examples(6)
@given(how=damages)
def test_damaged_config_at_ingest(cli, tmp_path, how):
    folder = flow_folder(tmp_path)
    damage(folder / tarflow_model.CONFIG_FILE, how)
    compile_refused(cli, tmp_path, folder, also_ok=True)


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    from accelc.cli import main

    tmp_path = tmp_path_factory.mktemp("tarflow-fuzz")
    folder = flow_folder(tmp_path)
    recipe = write_recipe(tmp_path, RECIPE.format(path=folder, cache=tmp_path / "cache"))
    assert main(["-q", "compile", str(recipe), "-o", str(tmp_path / "art")]) == 0
    return tmp_path / "art"


FILES = {
    "plan": ("decode/plan.json", "ort"),
    "layout": ("model/onnx/flow.onnx/flow.json", "ort"),
    "step graph": ("model/onnx/flow.onnx/block1.step.onnx", "ort"),
    "weights": ("model/hf/model.safetensors", "torch"),
}


@pytest.mark.parametrize("name", sorted(FILES))
@pytest.mark.parametrize("how", [("truncate", 0.5), ("junk", 0.3, b"\x00garbage\xff")], ids=["truncate", "junk"])
def test_damaged_artifact_is_refused_naming_the_file(cli, tmp_path, artifact, name, how):
    rel, backend = FILES[name]
    broken = copy_artifact(artifact, tmp_path / "broken")
    damage(broken / rel, how)
    with unchanged(artifact, broken, artifact.parent / "cache"):  # the pass cache it was compiled with
        args = ("-q", "run", broken, "--backend", backend, "--samples", "2", "--out", tmp_path / "grid.png")
        _, out, err = assert_refused(cli(*args))
    assert rel.rsplit("/", 1)[-1] in out + err
    assert not (tmp_path / "grid.png").exists()
