"""The pass manager's contract with passes: declared recipe inputs key the cache, declared
consumes/produces order the recipe (`accelc validate`), and a pass's own sub-pipeline is cached."""

from __future__ import annotations

import pytest
from conftest import write_recipe

from accelc.compiler import registry
from accelc.compiler.dataflow import KINDS, providers
from accelc.compiler.inputs import DeclaredView, UndeclaredInput
from accelc.compiler.pipeline import PassManager, StepCache
from accelc.compiler.recipe import load_recipe

RECIPE = """
version: 1
model: {{builtin: tiny-llama}}
data: {{calibration: "{calibration}"}}
passes:
{passes}
targets:
{targets}
"""

IMPORTANCE = "  - {type: importance, windows: 2, window: 16}"
EXPORT = "  - {type: export_onnx}"
SPECULATIVE = (
    "  - type: speculative\n"
    "    draft: {draft}\n"
    "    calibration_prompts: 1\n"
    "    prompt_tokens: 8\n"
    "    gamma_max: 2\n"
    "    fallback: false"
)
CPU_ORT = "  - {kind: cpu, backends: [ort]}"


def recipe_file(tmp_path, passes, targets=(), calibration="austen:emma", name="recipe.yaml"):
    body = RECIPE.format(
        calibration=calibration, passes="\n".join(passes) or "  []", targets="\n".join(targets) or "  []"
    )
    return write_recipe(tmp_path, body.replace(":\n  []", ": []"), name)


def run(path, cache_root, overrides=()):
    """The bundle after the recipe's passes, through the same PassManager `accelc compile` uses."""
    from accelc.families.causal_lm import ingest

    recipe = load_recipe(path, list(overrides))
    cache = StepCache(cache_root)
    return PassManager(recipe, cache).run_passes(ingest(recipe.model, recipe))


def statuses(bundle) -> dict[str, str]:
    return {record.name: record.status for record in bundle.provenance}


# --------------------------------------------------------------------------- declared inputs


def test_a_changed_calibration_file_or_corpus_misses_the_cache(tmp_path):
    text = tmp_path / "calibration.txt"
    words = "the quick brown fox jumps over the lazy dog while the cat sleeps in the warm sun "
    text.write_text(words * 40)
    path = recipe_file(tmp_path, [IMPORTANCE], calibration=str(text))
    cache = tmp_path / "cache"
    assert statuses(run(path, cache)) == {"importance": "ran"}
    assert statuses(run(path, cache)) == {"importance": "cached"}
    text.write_text(words.upper() * 40)  # same path, new content
    assert statuses(run(path, cache)) == {"importance": "ran"}
    assert statuses(run(path, cache, ["data.calibration=austen:emma"])) == {"importance": "ran"}
    assert statuses(run(path, cache, ["data.calibration=austen:persuasion"])) == {"importance": "ran"}
    assert statuses(run(path, cache, ["data.calibration=austen:emma"])) == {"importance": "cached"}


def test_a_changed_decode_section_reruns_speculative_but_not_export_onnx(tmp_path):
    path = recipe_file(tmp_path, [EXPORT, SPECULATIVE.format(draft="{keep_layers: [0]}")])
    cache = tmp_path / "cache"
    greedy = run(path, cache)
    assert statuses(greedy) == {"export_onnx": "ran", "speculative": "ran"}
    assert greedy.plan["sampling"] is False
    sampled = run(path, cache, ["decode.strategy=sample"])
    assert statuses(sampled) == {"export_onnx": "cached", "speculative": "ran"}
    assert sampled.plan["sampling"] is True  # the plan follows the recipe, not the cached greedy one


def test_a_changed_draft_folder_misses_the_cache(tmp_path):
    """The draft a recipe names by path is keyed by its content: new weights in the same folder
    rerun the speculative pass instead of reusing a plan measured with the old ones."""
    import json
    import shutil

    from accelc.families.causal_lm import _builtin_dir

    draft = tmp_path / "draft"
    shutil.copytree(_builtin_dir("tiny-llama"), draft)
    path = recipe_file(tmp_path, [EXPORT, SPECULATIVE.format(draft=f"{{path: {draft}}}")])
    cache = tmp_path / "cache"
    assert statuses(run(path, cache)) == {"export_onnx": "ran", "speculative": "ran"}
    assert statuses(run(path, cache)) == {"export_onnx": "cached", "speculative": "cached"}
    config = json.loads((draft / "config.json").read_text())
    (draft / "config.json").write_text(json.dumps({**config, "rms_norm_eps": config["rms_norm_eps"] * 10}))
    assert statuses(run(path, cache)) == {"export_onnx": "cached", "speculative": "ran"}


def test_a_pass_sees_only_the_recipe_inputs_it_declares(tmp_path):
    recipe = load_recipe(recipe_file(tmp_path, [IMPORTANCE]))
    view = DeclaredView(recipe, registry.PASSES["importance"].reads, "pass importance")
    assert view.data.calibration == "austen:emma"
    with pytest.raises(UndeclaredInput, match="pass importance read the recipe's 'decode'"):
        _ = view.decode
    with pytest.raises(UndeclaredInput, match=r"'data\.evaluation'"):
        _ = view.data.evaluation
    whole = DeclaredView(recipe, registry.PASSES["speculative"].reads, "pass speculative")
    assert whole.decode.strategy == "greedy" and whole.data.calibration == "austen:emma"


# --------------------------------------------------------------------------- declared consumes/produces


@pytest.mark.parametrize(
    "passes, targets, message",
    [
        ([], [CPU_ORT], "targets[0] cpu needs an ONNX decoder graph: put export_onnx in passes"),
        (
            ["  - {type: reform}", "  - {type: materialize}"],
            [],
            "passes[0] reform needs a subnet (a pruning mask): put arch_search (or flap, magnitude_prune, "
            "wanda_sp) before it",
        ),
        (
            ["  - {type: reform}", "  - {type: magnitude_prune, budget: {remove_ratio: 0.3}}"],
            [],
            "passes[0] reform needs a subnet (a pruning mask), which passes[1] magnitude_prune makes after it: "
            "put it after magnitude_prune",
        ),
        (["  - {type: wanda_sp, budget: {remove_ratio: 0.3}}"], [], "put the importance pass before it"),
        (["  - {type: quantize_weights_int4}", EXPORT], [CPU_ORT], "put it after export_onnx"),
        (
            [IMPORTANCE, "  - {type: magnitude_prune, budget: {remove_ratio: 0.3}}", "  - {type: materialize}"]
            + ["  - {type: reform}"],
            [],
            "passes[3] reform needs a subnet",  # materialize used the subnet up
        ),
    ],
)
def test_validate_rejects_a_misordered_recipe_naming_the_step_and_the_fix(cli, tmp_path, passes, targets, message):
    code, out, err = cli("validate", recipe_file(tmp_path, passes, targets))
    assert code == 2 and message in err and out == ""


def test_compile_rejects_a_misordered_recipe_before_any_work(cli, tmp_path):
    code, _, err = cli("compile", recipe_file(tmp_path, [], [CPU_ORT]), "-o", tmp_path / "out")
    assert code == 2 and "put export_onnx in passes" in err and "model: builtin" not in err


@pytest.mark.parametrize(
    "passes, targets",
    [
        ([EXPORT], [CPU_ORT]),
        ([], ["  - {kind: cpu, backends: [tvm]}"]),  # TVM compiles the checkpoint: no graph needed
        ([IMPORTANCE, "  - {type: wanda_sp, budget: {remove_ratio: 0.3}}", "  - {type: reform}"], []),
        (["  - {type: magnitude_prune, budget: {remove_ratio: 0.3}}", "  - {type: materialize}", EXPORT], []),
        ([EXPORT, SPECULATIVE.format(draft="{from_target: true, weights: int4}")], [CPU_ORT]),
    ],
)
def test_validate_accepts_a_correctly_ordered_recipe(cli, tmp_path, passes, targets):
    code, out, err = cli("validate", recipe_file(tmp_path, passes, targets))
    assert code == 0 and '"valid": true' in out, err


def test_every_kind_a_step_consumes_is_declared_and_made_by_some_pass():
    registry.load_all()
    for cls in [*registry.PASSES.values(), *registry.TARGETS.values()]:
        for kind in (*cls.consumes, *cls.produces, *cls.drops):
            assert kind in KINDS, f"{cls.__name__} declares '{kind}', which dataflow.KINDS does not describe"
    consumed = {"onnx_graph", *(k for cls in registry.PASSES.values() for k in cls.consumes)}
    for kind in consumed:
        assert providers(kind), f"no pass produces '{kind}'"


# --------------------------------------------------------------------------- sub-pipelines


def test_the_subnet_draft_runs_through_the_pass_manager_and_its_cache(tmp_path, capsys):
    draft = "{subnet_ratio: 0.5, search_generations: 2, search_population: 6}"
    path = recipe_file(tmp_path, [SPECULATIVE.format(draft=draft)])
    cache = tmp_path / "cache"
    first = run(path, cache)
    err = capsys.readouterr().err
    assert "speculative draft subnet: pass arch_search ..." in err
    assert (first.draft_dir.parent / "DONE").exists()  # materialize's own committed cache step
    second = run(path, cache, ["decode.strategy=sample"])
    err = capsys.readouterr().err
    assert statuses(second) == {"speculative": "ran"}
    for step in ("importance", "arch_search", "reform", "materialize"):
        assert f"speculative draft subnet: pass {step}: cached" in err
    assert second.draft_dir == first.draft_dir


def test_the_missing_export_named_is_the_models_familys_exporter(cli, tmp_path):
    from tests.conftest import write_recipe

    body = "model:\n  builtin: tarflow-tiny\ntargets:\n  - {kind: cpu, backends: [ort]}\n"
    code, _, err = cli("validate", write_recipe(tmp_path, body))
    assert code == 2 and "put export_flow in passes" in err and "export_onnx" not in err
