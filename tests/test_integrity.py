"""A damaged artifact is named by `verify`, `run` and `inspect` (exit 2, no internal error), and a
warm start re-hashes nothing (runtime/integrity.py)."""

from __future__ import annotations

import json
import os
import shutil
import time

import pytest

from accelc.assets import CACHE_ENV
from accelc.runtime import integrity
from tests.conftest import TINY_RECIPE, write_recipe

GRAPH = "model/onnx/decoder.onnx"


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """One tiny artifact (ORT and TVM) for the module; each test damages its own copy."""
    from accelc.cli import main

    root = tmp_path_factory.mktemp("integrity")
    recipe = write_recipe(root, TINY_RECIPE.format(model="tiny-llama", backends="[ort, tvm]", cache=root / "cache"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(CACHE_ENV, str(root / "assets"))
        assert main(["-q", "compile", str(recipe), "-o", str(root / "art")]) == 0
    return root / "art"


@pytest.fixture
def artifact(compiled, tmp_path, monkeypatch):
    """A real copy (not hard links: the damage must not reach the module's artifact or its pass
    cache) and a hash cache of this test's own."""
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "assets"))
    return shutil.copytree(compiled, tmp_path / "art")


def _overwrite(path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def _hashes_of(path) -> int:
    return integrity.hashed[os.path.realpath(path)]


def test_overwritten_bytes_are_named_by_verify_run_and_inspect(cli, artifact):
    _overwrite(artifact / GRAPH, 1000, b"\xffDAMAGE")  # 7 bytes inside the protobuf

    code, out, err = cli("verify", artifact)
    assert code == 2 and "Traceback" not in err
    assert f"changed                  {GRAPH}" in out and GRAPH in err

    code, out, err = cli("run", artifact, "--prompt", "hello", "--max-new-tokens", "2")
    assert code == 2 and "internal error" not in err and "Traceback" not in err
    assert f"{artifact / GRAPH} fails its manifest checksum" in err and "accelc verify" in err

    code, out, err = cli("inspect", artifact)
    assert code == 0 and f"integrity DAMAGED: {GRAPH} (changed)" in out

    # TVM reads its weights from the same graph, so it is refused too; torch does not read it
    code, out, err = cli("run", artifact, "--prompt", "hello", "--max-new-tokens", "2", "--backend", "tvm")
    assert code == 2 and f"{artifact / GRAPH} fails its manifest checksum" in err
    code, out, err = cli("run", artifact, "--prompt", "hello", "--max-new-tokens", "2", "--backend", "torch")
    assert code == 0, err


def test_tvm_reads_its_weights_from_the_graph_ort_ships(cli, compiled):
    """One copy of the weights for both backends, and TVM decodes the same tokens from it."""
    meta = json.loads((compiled / "targets/cpu/tvm/target/tvm_meta.json").read_text())
    assert meta["params_in_graph"] and not (compiled / "targets/cpu/tvm/target/params.safetensors").exists()
    outputs = {}
    for backend in ("ort", "tvm"):
        code, out, err = cli(
            "run", compiled, "--prompt", "hello", "--raw", "--max-new-tokens", "6", "--backend", backend
        )
        assert code == 0, err
        outputs[backend] = out
    assert outputs["ort"] == outputs["tvm"]


def test_a_damaged_tvm_library_is_refused_before_it_is_loaded(cli, artifact):
    library = artifact / "targets/cpu/tvm/target/model.so"
    _overwrite(library, 4096, b"\x00" * 7)
    code, _, err = cli("run", artifact, "--prompt", "hello", "--max-new-tokens", "2", "--backend", "tvm")
    assert code == 2 and f"{library} fails its manifest checksum" in err


def test_a_truncated_file_fails_on_its_size_without_hashing(cli, artifact):
    graph = artifact / GRAPH
    size = graph.stat().st_size
    os.truncate(graph, size // 2)
    code, _, err = cli("run", artifact, "--prompt", "hello", "--max-new-tokens", "2")
    assert code == 2 and f"{graph} is {size // 2} bytes where the manifest says {size}" in err
    assert _hashes_of(graph) == 0
    code, out, _ = cli("verify", artifact)
    assert code == 2 and f"truncated                {GRAPH}" in out


def test_a_deleted_file_is_named(cli, artifact):
    (artifact / "model/hf/tokenizer.json").unlink()
    code, _, err = cli("run", artifact, "--prompt", "hello", "--max-new-tokens", "2")
    assert code == 2 and f"{artifact / 'model/hf/tokenizer.json'} is missing" in err
    code, out, _ = cli("verify", artifact)
    assert code == 2 and "missing                  model/hf/tokenizer.json" in out


def test_reports_rewritten_by_bench_are_not_corruption(cli, artifact):
    (artifact / "reports/validation.json").write_text("{}")  # in the manifest, now different
    (artifact / "reports/bench.json").write_text("{}")  # what `accelc bench` adds after compile
    code, out, err = cli("verify", artifact)
    assert code == 0, err
    assert "rewritten since compile  reports/validation.json" in out
    assert "added since compile      reports/bench.json" in out
    code, out, _ = cli("inspect", artifact)
    assert code == 0 and "integrity ok" in out


def test_a_second_run_of_an_intact_artifact_hashes_nothing(cli, artifact):
    # files modified within integrity.RACY_SECONDS are hashed but not remembered (their mtime
    # could survive a second write); this artifact is as one compiled a minute ago
    an_earlier_minute = time.time() - 60
    for path in artifact.rglob("*"):
        os.utime(path, (an_earlier_minute, an_earlier_minute))
    code, _, err = cli("run", artifact, "--prompt", "hello", "--max-new-tokens", "2")
    assert code == 0, err
    cached = json.loads((integrity.HashCache().path).read_text())["files"]
    opened = [GRAPH, "decode/plan.json", "model/hf/tokenizer.json"]
    assert [rel for rel in opened if os.path.realpath(artifact / rel) not in cached] == []
    before = sum(integrity.hashed.values())
    code, _, err = cli("run", artifact, "--prompt", "hello", "--max-new-tokens", "2")
    assert code == 0, err
    assert sum(integrity.hashed.values()) == before
    # ... and ORT never read, so never hashed, the torch weights
    assert _hashes_of(artifact / "model/hf/model.safetensors") == 0


def test_an_artifact_without_checksums_opens_as_before(cli, artifact):
    manifest = artifact / "manifest.json"
    data = json.loads(manifest.read_text())
    del data["files"]
    manifest.write_text(json.dumps(data))
    code, _, err = cli("run", artifact, "--prompt", "hello", "--max-new-tokens", "2")
    assert code == 0, err
    code, out, _ = cli("inspect", artifact)
    assert code == 0 and "integrity unknown" in out
    code, _, err = cli("verify", artifact)
    assert code == 2 and "no file checksums" in err


def test_a_file_written_just_now_is_hashed_again(cli, artifact):
    """Within integrity.RACY_SECONDS of its mtime a second write could keep the same mtime, so a
    fresh file is never remembered: both runs hash it."""
    plan = artifact / "decode/plan.json"
    plan.write_bytes(plan.read_bytes())  # same content, new mtime ...
    in_a_minute = time.time() + 60  # ... that stays "just now" however slow the runs below are
    os.utime(plan, (in_a_minute, in_a_minute))
    for _ in range(2):
        code, _, err = cli("run", artifact, "--prompt", "hello", "--max-new-tokens", "2")
        assert code == 0, err
    assert _hashes_of(plan) == 2


def test_an_artifact_named_by_a_relative_path_is_checked_too(cli, artifact, monkeypatch):
    with open(artifact / GRAPH, "ab") as f:
        f.write(b"x")
    monkeypatch.chdir(artifact.parent)
    code, _, err = cli("run", artifact.name, "--prompt", "hello", "--max-new-tokens", "2")
    assert code == 2 and "internal error" not in err
    assert "where the manifest says" in err and GRAPH in err
