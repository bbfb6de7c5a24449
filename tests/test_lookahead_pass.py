"""The `lookahead` pass and its pricing (loops/jacobi_pricing.py): runs of the loops priced with a
call-cost curve, greedy kept where nothing pays, and the plan compiled, reported and validated."""

from __future__ import annotations

import json

import pytest
from test_lookup import looping_pair

from accelc.loops.jacobi import jacobi_generate
from accelc.loops.jacobi_pricing import Priced, WindowRun, call_cost, choose, predicted_speedup
from accelc.loops.lookahead import lookahead_generate

FLAT = {1: 1.0, 8: 1.05}  # a GPU-like curve: eight tokens cost about one
STEEP = {1: 1.0, 2: 1.9, 4: 3.7, 8: 7.4}  # a CPU whose calls cost nearly linear in the tokens


def test_the_speedup_is_tokens_committed_over_the_calls_cost():
    runs = [WindowRun((3, 3), (2, 1)), WindowRun((1,), (1,))]
    assert predicted_speedup(runs, {1: 1.0, 3: 1.5}) == pytest.approx(4 / 4.0)
    assert predicted_speedup([WindowRun((1,) * 5, (1,) * 5)], STEEP) == 1.0  # greedy decoding is 1x
    assert call_cost({1: 1.0, 2: 1.5, 3: 1.2}, 3) == 1.5  # never cheaper for more tokens
    assert call_cost({1: 1.0, 4: 2.0}, 8) == 4.0  # past the curve: linear from its last point


def priced_from_real_runs(curve) -> list[Priced]:
    cases = [(looping_pair(case)[0], [case % 10, (7 * case + 3) % 10]) for case in range(4)]
    jacobi = [WindowRun.of(jacobi_generate(m, p, 48)) for m, p in cases]
    lookahead = [WindowRun.of(lookahead_generate(m, p, 48)) for m, p in cases]
    return [
        Priced.of("jacobi", "jacobi", {"window": 7}, jacobi, curve, True),
        Priced.of("lookahead", "lookahead", {"window": 7, "ngram": 5, "guess_set": 7}, lookahead, curve, True),
    ]


def test_greedy_is_kept_when_calls_cost_what_their_tokens_do_and_lookahead_wins_when_they_are_flat():
    steep = choose(priced_from_real_runs(STEEP), STEEP)
    assert steep.strategy == "greedy" and steep.settings == {} and steep.predicted_speedup == 1.0
    assert "no window pays" in steep.reason and "greedy decoding is kept" in steep.reason
    flat = choose(priced_from_real_runs(FLAT), FLAT)
    assert flat.strategy == "lookahead" and flat.settings["ngram"] == 5 and flat.predicted_speedup > 1.3
    forced = choose(priced_from_real_runs(STEEP), STEEP, fallback=False)
    assert (
        forced.strategy == "lookahead" and forced.predicted_speedup < 1.0 and "disabled the fallback" in forced.reason
    )


def test_a_configuration_that_missed_the_greedy_tokens_is_never_planned():
    priced = priced_from_real_runs(FLAT)
    broken = [Priced.of("lookahead", "lookahead", {}, [WindowRun((8,), (8,))], FLAT, False), *priced[:1]]
    assert choose(broken, FLAT, fallback=False).strategy == "greedy"


PASS = """
  - type: lookahead
    windows: [1, 7]
    lookup: 4
    calibration_prompts: 2
    prompt_tokens: 16
    fallback: false
"""


def test_the_plan_report_and_validation_of_a_compiled_artifact(cli, tiny_recipe, tmp_path):
    recipe = tiny_recipe()
    recipe.write_text(recipe.read_text().replace("  - type: export_onnx\n", "  - type: export_onnx" + PASS))
    out = tmp_path / "out"
    code, _, err = cli("compile", recipe, "-o", out)
    assert code == 0, err
    plan = json.loads((out / "decode" / "plan.json").read_text())
    report = json.loads((out / "reports" / "lookahead.json").read_text())
    assert plan["strategy"] == "lookahead" and plan["cost_backend"] == report["backend"] == "ort"
    assert {p["name"] for p in report["priced"]} == {
        "jacobi W=7",
        "lookahead W=1 N=5",
        "lookahead+lookup W=1 N=5",
        "lookahead W=7 N=5",
        "lookahead+lookup W=7 N=5",
    }
    longest = max(int(k) for k in report["call_cost_curve"])
    assert longest >= 7 and report["call_cost_curve"]["1"] == 1.0
    best = max(report["priced"], key=lambda p: p["predicted_speedup"])
    assert plan["predicted_speedup"] == best["predicted_speedup"] and plan["window"] == best["settings"]["window"]
    assert all(p["identical_to_greedy"] and p["tokens_per_call"] >= 1.0 for p in report["priced"])
    validation = json.loads((out / "reports" / "validation.json").read_text())
    assert validation["decode_plan"]["verdict"] == "pass"
    assert set(validation["decode_plan"]["backends"]) == {"torch", "ort"}
    code, _, err = cli("run", out, "--prompt", "Hello", "--raw", "--max-new-tokens", 10)
    assert code == 0 and "[lookahead]" in err and "tokens a call" in err


def test_nothing_to_price_is_a_usage_error_at_validate_time(cli, tiny_recipe):
    recipe = tiny_recipe()
    step = "  - type: lookahead\n    strategies: [jacobi]\n    windows: [1]\n"
    recipe.write_text(recipe.read_text().replace("  - type: export_onnx\n", "  - type: export_onnx\n" + step))
    code, _, err = cli("validate", recipe)
    assert code == 2 and "window 1 is greedy decoding" in err


def test_a_sampling_decode_section_is_a_usage_error(cli, tiny_recipe):
    recipe = tiny_recipe()
    text = recipe.read_text().replace("  - type: export_onnx\n", "  - type: export_onnx\n  - type: lookahead\n")
    recipe.write_text(text + "decode:\n  strategy: sample\n")
    code, _, err = cli("compile", recipe, "-o", recipe.parent / "out")
    assert code == 2 and "greedy only" in err
