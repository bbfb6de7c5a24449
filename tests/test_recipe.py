"""Recipe loading: every bad recipe gets one clear message with file:line, key path, what is allowed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import write_recipe

from accelc.compiler.recipe import json_schema, load_recipe
from accelc.errors import RecipeError


def error_of(path, overrides=()):
    with pytest.raises(RecipeError) as info:
        load_recipe(path, list(overrides))
    return str(info.value)


def test_minimal_recipe_gets_defaults(tmp_path):
    r = load_recipe(write_recipe(tmp_path, "model:\n  builtin: tiny-llama\n"))
    assert r.version == 1 and r.passes == [] and r.targets == []
    assert r.eval.parity.atol > 0 and r.decode.strategy == "greedy"


def test_malformed_yaml_names_line_and_column(tmp_path):
    path = write_recipe(tmp_path, "model:\n  builtin: tiny-llama\n passes: [\n")
    msg = error_of(path)
    assert f"{path}:3:" in msg and "malformed YAML" in msg


def test_unknown_pass_lists_the_registered_ones(tmp_path):
    path = write_recipe(tmp_path, "model:\n  builtin: tiny-llama\npasses:\n  - type: prune_everything\n")
    msg = error_of(path)
    assert f"{path}:4: passes[0]" in msg
    assert "prune_everything" in msg and "export_onnx" in msg and "quantize_dynamic_int8" in msg


def test_unknown_target_kind_lists_the_registered_ones(tmp_path):
    path = write_recipe(tmp_path, "model:\n  builtin: tiny-llama\ntargets:\n  - kind: quantum\n")
    msg = error_of(path)
    assert f"{path}:4: targets[0]" in msg and "'cpu'" in msg


def test_wrong_parameter_type_points_at_the_parameter_line(tmp_path):
    path = write_recipe(
        tmp_path, "model:\n  builtin: tiny-llama\npasses:\n  - type: export_onnx\n    opset: seventeen\n"
    )
    msg = error_of(path)
    assert f"{path}:5: passes[0].opset:" in msg and "integer" in msg and "seventeen" in msg


def test_unknown_key_lists_allowed_keys(tmp_path):
    path = write_recipe(
        tmp_path, "model:\n  builtin: tiny-llama\ntargets:\n  - kind: cpu\n    ort:\n      threads: 2\n"
    )
    msg = error_of(path)
    assert f"{path}:6: targets[0].ort.threads: unknown key 'threads'" in msg
    assert "intra_op_threads" in msg


def test_a_spin_duration_without_spinning_is_refused_at_its_line(tmp_path):
    path = write_recipe(
        tmp_path,
        "model:\n  builtin: tiny-llama\ntargets:\n  - kind: cpu\n    ort:\n      spin_duration_us: 20\n",
    )
    msg = error_of(path)
    assert f"{path}:5: targets[0].ort" in msg and "allow_spinning: true" in msg


def test_a_lookup_on_the_head_without_a_quantised_head_is_refused_at_its_line(tmp_path):
    path = write_recipe(
        tmp_path,
        "model:\n  builtin: tiny-llama\npasses:\n  - type: export_onnx\n"
        "  - type: quantize_weights_int4\n    lookup: head\n",
    )
    msg = error_of(path)
    assert f"{path}:" in msg and "passes[1]" in msg and "head: true" in msg


def test_unknown_top_level_section(tmp_path):
    msg = error_of(write_recipe(tmp_path, "model:\n  builtin: tiny-llama\noptimise: yes\n"))
    assert "unknown key 'optimise'" in msg and "passes" in msg


def test_model_needs_exactly_one_source(tmp_path):
    msg = error_of(write_recipe(tmp_path, "model:\n  builtin: tiny-llama\n  path: ./x\n"))
    assert "exactly one of 'path' or 'builtin'" in msg


def test_literal_values_are_listed(tmp_path):
    path = write_recipe(tmp_path, "model:\n  builtin: tiny-llama\ntargets:\n  - kind: cpu\n    backends: [ort, cuda]\n")
    msg = error_of(path)
    assert "targets[0].backends[1]" in msg and "'ort', 'openvino' or 'tvm'" in msg


def test_set_overrides_are_validated_like_recipe_content(tmp_path):
    path = write_recipe(tmp_path, "model:\n  builtin: tiny-llama\npasses:\n  - type: export_onnx\n")
    r = load_recipe(path, ["passes.0.opset=17", "eval.parity.atol=0.01"])
    assert r.passes[0].opset == 17 and r.eval.parity.atol == 0.01
    msg = error_of(path, ["passes.0.opset=abc"])
    assert "--set passes.0.opset=abc" in msg and "integer" in msg
    assert "unknown key 'nope'" in error_of(path, ["eval.nope=1"])
    assert "out of range" in error_of(path, ["passes.3.opset=17"])
    assert "key.path=value" in error_of(path, ["justakey"])


def test_recipe_is_not_a_mapping(tmp_path):
    assert "is a mapping of sections" in error_of(write_recipe(tmp_path, "- a\n- b\n"))
    assert "empty" in error_of(write_recipe(tmp_path, "\n"))


def test_yaml_tags_cannot_run_code(tmp_path):
    path = write_recipe(tmp_path, "model: !!python/object/apply:os.system ['echo pwned']\n")
    assert "malformed YAML" in error_of(path)


def test_json_schema_covers_registered_passes_and_targets():
    schema = json.dumps(json_schema())
    for name in ("export_onnx", "quantize_dynamic_int8", "intra_op_threads", "graph_optimization_level"):
        assert name in schema


def test_the_schema_editors_read_is_the_current_one():
    """recipes/*.yaml point yaml-language-server at docs/recipe.schema.json: it must be what
    `accelc schema` prints now (regenerate: accelc schema > docs/recipe.schema.json)."""
    from pathlib import Path

    committed = Path(__file__).resolve().parents[1] / "docs" / "recipe.schema.json"
    assert committed.exists() and json.loads(committed.read_text()) == json.loads(json.dumps(json_schema())), (
        "docs/recipe.schema.json is stale: run `accelc schema > docs/recipe.schema.json`"
    )


def test_cli_validate_and_schema(cli, tmp_path):
    good = write_recipe(tmp_path, "model:\n  builtin: tiny-llama\n", "good.yaml")
    code, out, _ = cli("validate", good)
    assert code == 0 and json.loads(out)["valid"]
    bad = write_recipe(tmp_path, "model:\n  builtin: tiny-llama\npasses:\n  - type: nope\n", "bad.yaml")
    code, _, err = cli("validate", bad)
    assert code == 2 and "bad.yaml:4" in err and "Traceback" not in err
    code, out, _ = cli("schema")
    assert code == 0 and json.loads(out)["title"] == "accelc recipe"
    code, out, _ = cli("passes", "show", "quantize_dynamic_int8")
    assert code == 0 and "per_channel" in out
    code, _, err = cli("passes", "show", "nope")
    assert code == 2 and "export_onnx" in err


@pytest.mark.parametrize(
    "path", sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml")), ids=lambda p: p.name
)
def test_every_shipped_recipe_validates(cli, path):
    code, out, err = cli("validate", path)
    assert code == 0, err
    assert json.loads(out)["valid"] is True


# --------------------------------------------------------------------------- defaults that follow others
def test_a_smaller_perplexity_window_brings_its_stride_along(tmp_path):
    r = load_recipe(write_recipe(tmp_path, "model:\n  builtin: tiny-llama\neval:\n  perplexity: {window: 64}\n"))
    assert r.eval.perplexity.window == 64 and r.eval.perplexity.stride == 64
    assert load_recipe(write_recipe(tmp_path, "model:\n  builtin: tiny-llama\n")).eval.perplexity.stride == 512


def test_a_stride_beyond_the_window_fails_at_validate_time(tmp_path):
    path = write_recipe(tmp_path, "model:\n  builtin: tiny-llama\neval:\n  perplexity: {window: 64, stride: 128}\n")
    msg = error_of(path)
    assert f"{path}:4" in msg and "stride 128 exceeds the window 64" in msg


def test_bench_tvm_tokens_never_exceed_the_new_tokens(tmp_path):
    r = load_recipe(write_recipe(tmp_path, "model:\n  builtin: tiny-llama\neval:\n  bench: {new_tokens: 4}\n"))
    assert r.eval.bench.tvm_new_tokens == 4
    assert load_recipe(write_recipe(tmp_path, "model:\n  builtin: tiny-llama\n")).eval.bench.tvm_new_tokens == 8


def test_arch_search_offspring_follow_a_smaller_population(tmp_path):
    body = "model:\n  builtin: tiny-llama\npasses:\n  - type: arch_search\n    budget: {remove_ratio: 0.3}\n"
    step = load_recipe(write_recipe(tmp_path, body + "    population: 12\n")).passes[0]
    assert (step.parents, step.mutations, step.crossovers) == (4, 6, 3)
    default = load_recipe(write_recipe(tmp_path, body)).passes[0]
    assert (default.population, default.parents, default.mutations, default.crossovers) == (24, 8, 12, 6)
    msg = error_of(write_recipe(tmp_path, body + "    population: 12\n    mutations: 12\n"))
    assert "exceed the population (12)" in msg


def test_calibration_mixture_validates_keys_its_cache_by_every_source_and_refuses_bad_weights(tmp_path):
    from accelc.compiler.inputs import fingerprint

    body = (
        "model:\n  builtin: tiny-llama\ndata:\n  calibration:\n"
        "    - text: austen:emma\n      weight: 2\n    - text: pydoc:topics\n"
    )
    recipe = load_recipe(write_recipe(tmp_path, body))
    key = fingerprint(recipe, ("data.calibration",))["data.calibration"]
    assert key.startswith("austen:emma x2 + pydoc:topics sha256:") and key.endswith(" x1")
    single = load_recipe(write_recipe(tmp_path, "model:\n  builtin: tiny-llama\ndata:\n  calibration: austen:emma\n"))
    assert fingerprint(single, ("data.calibration",)) == {"data.calibration": "austen:emma"}  # keys made before hold
    bad = write_recipe(tmp_path, body.replace("weight: 2", "weight: 0"))
    msg = error_of(bad)
    assert f"{bad}:6: data.calibration" in msg and "greater than 0" in msg
