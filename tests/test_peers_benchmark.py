"""benchmarks/peers.py's own logic, without building the peers' environment: row selection and
settings, row shaping (medians, perplexity, `exact`, same tokens), skip reasons, argument errors,
and the runner's accelc path on a tiny seeded artifact against accelc's own perplexity."""

from __future__ import annotations

import json
import math
import sys

import numpy as np
import pytest

from benchmarks import peers, peers_runner


def test_only_selects_rows_by_runtime_or_precision_and_keeps_the_source_first():
    rows = peers.select(["llama.cpp", "accelc-ort:int4"])
    assert rows[0] is peers.SOURCE
    assert [r.name for r in rows[1:]] == ["accelc-ort:int4", "llama.cpp:q4_1", "llama.cpp:int8", "llama.cpp:fp32"]
    assert peers.select([]) == list(peers.ROWS)


def test_the_spinning_row_compiles_the_same_recipe_with_bounded_spin_into_its_own_artifact():
    from accelc.compiler.recipe import load_recipe

    spinning = [r for r in peers.ACCELC if r.spin]
    assert {r.spin_us for r in spinning} == {None, 20}  # ORT's default spin (ORT GenAI's) and the bound
    for spin in spinning:
        (plain,) = [
            r
            for r in peers.ACCELC
            if r.source == spin.source and not r.spin and (r.backend, r.plan) == (spin.backend, spin.plan)
        ]
        assert spin.artifact != plain.artifact and plain.recipe_sets == []
        ort = load_recipe(peers.common.REPO / spin.source, spin.recipe_sets).targets[0].ort
        assert ort.allow_spinning and ort.spin_duration_us == spin.spin_us
    assert len({r.artifact for r in spinning}) == len(spinning)


def test_only_refuses_an_unknown_row_naming_the_known_ones():
    from accelc.errors import UsageError

    with pytest.raises(UsageError, match=r"--only vllm: no such row; known: .*llama.cpp:q4_1"):
        peers.select(["vllm"])


def test_quick_and_full_settings_and_their_overrides():
    from accelc.errors import UsageError

    assert peers.settings(True, None, None, None) == peers.QUICK
    assert peers.settings(False, 2, None, 0) == {**peers.FULL, "repeats": 2, "windows": 0}
    with pytest.raises(UsageError, match="--repeats must be at least 1, got 0"):
        peers.settings(False, 0, None, None)


def test_argument_errors_exit_2_before_any_work(capsys):
    from benchmarks import common

    assert common.run(lambda: peers.main(["--prompts", "0", "--json", "x.json"])) == 2
    assert "--prompts must be at least 1, got 0" in capsys.readouterr().err
    assert common.run(lambda: peers.main(["--only", "vllm", "--json", "x.json"])) == 2


def _run(rates, ttft, rss, tokens, nll=None, scored=None):
    out = {"decode_tok_s": rates, "ttft_ms": ttft, "rss_mb": rss, "load_s": 1.0, "tokens": tokens}
    if nll is not None:
        out.update(nll=nll, scored=scored)
    return out


def test_a_row_is_the_median_over_prompts_and_rounds_judged_against_the_source():
    source = _run([10.0], [50.0], 900.0, [[1, 2], [3, 4]], nll=100 * math.log(20.0), scored=100)
    runs = [
        _run([30.0, 50.0], [20.0, 30.0], 200.0, [[1, 2], [3, 5]], nll=100 * math.log(20.1), scored=100),
        _run([40.0, 60.0], [10.0, 40.0], 220.0, [[1, 2], [3, 5]]),
    ]
    row = peers.shape_row(peers.PEERS[0], runs, source, threads=2)
    assert (row["runtime"], row["precision"], row["threads"]) == ("llama.cpp", "q4_1", 2)
    assert row["decode_tok_s"] == 45.0 and row["ttft_ms"] == 25.0 and row["rss_mb"] == 210.0
    assert row["samples"] == 4
    assert row["ppl"] == pytest.approx(20.1) and row["ppl_ratio"] == pytest.approx(1.005)
    assert row["exact"] is True  # within 1% of the source's perplexity
    assert row["same_tokens"] == 0.5  # the second prompt's tokens differ

    worse = [_run([90.0], [5.0], 100.0, [[1, 2], [3, 4]], nll=100 * math.log(21.0), scored=100)]
    assert peers.shape_row(peers.PEERS[0], worse, source, threads=2)["exact"] is False  # 5% worse


def test_a_row_without_perplexity_is_not_called_exact():
    runs = [_run([30.0], [20.0], 200.0, [[1]])]
    row = peers.shape_row(peers.ACCELC[0], runs, None, threads=2)
    assert row["ppl"] is None and row["ppl_ratio"] is None and row["exact"] is False
    assert row["backend"] == "ort" and "same_tokens" not in row


def test_skipped_rows_carry_their_reason_into_json_and_table(capsys):
    row = peers.skipped_row(peers.PEERS[3], "the worker failed (exit 1): boom")
    assert row == {
        "runtime": "ort-genai",
        "precision": "fp32",
        "source": "builder:fp32",
        "skipped": "the worker failed (exit 1): boom",
    }
    peers.print_table([row])
    assert "ort-genai                fp32      skipped: the worker failed (exit 1): boom" in capsys.readouterr().out


def test_an_unbuilt_environment_is_a_skip_reason_with_no_build(tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELC_CACHE_DIR", str(tmp_path))
    with pytest.raises(peers.Skip, match=r"peers' environment .*env-[0-9a-f]{16} is not built \(--no-build\)"):
        peers.peers_python(build=False)


def test_a_worker_that_fails_is_a_skip_with_its_last_words():
    # this environment has no llama_cpp: the runner fails to import it, as a broken peer install would
    spec = {"runtime": "llama.cpp", "model": "none.gguf", "threads": 1, "context": 64, "prompts": [[1]]}
    with pytest.raises(peers.Skip, match=r"the worker failed \(exit 1\): .*No module named 'llama_cpp'"):
        peers.run_worker(sys.executable, spec)


def test_the_runner_scores_windows_as_accelc_does():
    from accelc.compiler.evaluation import _scored_nll

    rng = np.random.default_rng(0)
    logits = rng.normal(size=(16, 50)).astype(np.float32)
    window = rng.integers(0, 50, size=16).tolist()
    expected = _scored_nll(logits[16 - 9 - 1 : 15], np.asarray(window[16 - 9 :]))
    assert peers_runner.window_nll(logits, window, 9) == pytest.approx(expected, rel=1e-12)


def test_the_runner_decodes_an_accelc_artifact_and_matches_accelc_perplexity(tmp_path, tiny_recipe, cli):
    from accelc.compiler.evaluation import perplexity
    from accelc.data import token_windows
    from accelc.loops.autoregressive import generate
    from accelc.runtime.artifact import Artifact

    artifact = tmp_path / "artifact"
    code, _, err = cli("compile", tiny_recipe(), "-o", artifact)
    assert code == 0, err
    art = Artifact(artifact)
    text = "It was a bright cold day in April, and the clocks were striking thirteen. " * 4
    ids = art.tokenizer.encode(text, add_special_tokens=False)
    windows = [(w.tolist(), int(n)) for w, n in token_windows(ids, 16, 16, 2)]
    prompts = [ids[:8], ids[8:16]]
    spec = {"runtime": "accelc", "model": str(artifact), "backend": "ort", "threads": 1}
    spec.update(prompts=prompts, new_tokens=5, windows=windows)
    result = peers.run_worker(sys.executable, spec)

    assert len(result["ttft_ms"]) == len(result["decode_tok_s"]) == 2 and result["rss_mb"] > 0
    model = art.step_model("ort")
    assert result["tokens"] == [generate(model, p, 5).tokens for p in prompts]
    reference = perplexity(model, art.tokenizer, text, text_name="t", window=16, stride=16, max_windows=2)
    assert math.exp(result["nll"] / result["scored"]) == pytest.approx(reference["ppl"], rel=1e-6)
    json.dumps(result)  # what the benchmark reads back


def test_a_recipe_that_fails_to_compile_is_a_skipped_row_not_a_crash(tmp_path, monkeypatch, capsys):
    from benchmarks import common

    def compile_fails(recipe, out, overrides):
        raise SystemExit(5)  # what compile_bench_recipe does on a rejected artifact

    monkeypatch.setattr(common, "compile_bench_recipe", compile_fails)
    monkeypatch.setattr(common, "REPO", tmp_path)  # no artifacts compiled yet under it
    monkeypatch.setattr(peers, "ROWS", (peers.SOURCE,))
    from accelc import assets
    from accelc.families import causal_lm

    # no model is needed before the compile: nothing is fetched or loaded
    monkeypatch.setattr(assets, "smollm2_gguf", lambda: tmp_path / "model.gguf")
    monkeypatch.setattr(assets, "smollm2_dir", lambda: tmp_path / "hf")
    monkeypatch.setattr(causal_lm, "load_tokenizer", lambda directory: None)
    monkeypatch.setattr(peers, "inputs", lambda tokenizer, n, w: ([[1, 2]], []))
    out = tmp_path / "rows.json"
    assert peers.main(["--prompts", "1", "--windows", "0", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert rows == [
        {
            "runtime": "torch",
            "precision": "fp32",
            "source": "recipes/bench/peers.yaml",
            "skipped": "accelc compile recipes/bench/peers.yaml failed (exit 5)",
        }
    ]
    assert "torch                    fp32      skipped: accelc compile" in capsys.readouterr().out


def test_each_llama_cpp_build_is_a_venv_of_its_own_and_the_models_are_shared(tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELC_CACHE_DIR", str(tmp_path))
    assert peers.venv_dir("no-amx") != peers.venv_dir("native") == peers.venv_dir()
    assert "-DGGML_NATIVE=OFF" in peers.LLAMA_CPP_BUILDS["no-amx"] and not peers.LLAMA_CPP_BUILDS["native"]
    assert peers.models_dir(tmp_path / "hf") == tmp_path / "peers" / f"models-{peers.env_key()}-hf"
    with pytest.raises(peers.Skip, match=r"env-[0-9a-f]{16} is not built"):
        peers.peers_python(build=False, flavour="no-amx")
