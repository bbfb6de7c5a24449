"""Model families and runtime backends come from registries; a recipe is held to its family."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import write_recipe


def _onnx_file(directory: Path) -> Path:
    """A two-node MLP graph: an ONNX input that is no causal LM."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper

    w = helper.make_tensor(
        "w", TensorProto.FLOAT, [8, 4], np.random.default_rng(0).standard_normal(32).astype("float32").tolist()
    )
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Relu", ["h"], ["y"])],
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
        [w],
    )
    path = directory / "mlp.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def _onnx_recipe(tmp_path: Path, passes: str, backends: str = "[ort]") -> Path:
    body = (
        f"model:\n  path: {_onnx_file(tmp_path)}\n"
        + (f"passes:\n{passes}" if passes else "passes: []\n")
        + f"targets:\n  - kind: cpu\n    backends: {backends}\n"
        f"cache:\n  dir: {tmp_path / 'cache'}\n"
    )
    return write_recipe(tmp_path, body)


WRONG_FAMILY = {
    "speculative": "  - type: speculative\n    draft: {keep_layers: [0]}\n",
    "arch_search": "  - type: arch_search\n    budget: {remove_ratio: 0.2}\n",
}


@pytest.mark.parametrize("step", sorted(WRONG_FAMILY))
def test_pass_of_another_family_fails_validate_with_the_passes_that_apply(cli, tmp_path, step):
    recipe = _onnx_recipe(tmp_path, "  - type: quantize_dynamic_int8\n" + WRONG_FAMILY[step])
    code, _, err = cli("validate", recipe)
    assert code == 2 and "Traceback" not in err
    message = err.strip().splitlines()[-1]
    assert f"passes[1] '{step}' does not apply to the onnx family" in message
    assert message.endswith("passes that do: quantize_dynamic_int8, quantize_weights_int4")


def test_compile_refuses_a_pass_of_another_family_before_any_work(cli, tmp_path):
    recipe = _onnx_recipe(tmp_path, WRONG_FAMILY["arch_search"])
    code, _, err = cli("compile", recipe, "-o", tmp_path / "out")
    assert code == 2 and "'arch_search' does not apply to the onnx family" in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()


def test_backend_of_another_family_fails_validate_with_the_backends_that_apply(cli, tmp_path):
    recipe = _onnx_recipe(tmp_path, "", backends="[ort, tvm]")
    code, _, err = cli("validate", recipe)
    assert code == 2
    assert "backend 'tvm' does not apply to the onnx family" in err and "backends that do: ort" in err


def test_passes_that_apply_to_the_model_family_validate(cli, tmp_path):
    recipe = _onnx_recipe(tmp_path, "  - type: quantize_dynamic_int8\n")
    code, out, err = cli("validate", recipe)
    assert code == 0, err
    assert '"valid": true' in out


def test_model_section_is_recognised_as_its_family(tmp_path):
    from accelc.compiler.recipe import load_recipe
    from accelc.errors import UsageError
    from accelc.families.base import family_for

    def family(model: str) -> str:
        return family_for(load_recipe(write_recipe(tmp_path, f"model:\n  {model}\n"))).name

    (tmp_path / "hf").mkdir()
    (tmp_path / "notes.txt").write_text("not a model")
    assert family("builtin: tiny-llama") == "causal_lm"
    assert family(f"path: {tmp_path / 'hf'}") == "causal_lm"
    assert family(f"path: {_onnx_file(tmp_path)}") == "onnx"
    with pytest.raises(UsageError, match=r"notes\.txt: expected .*\.onnx file.*checkpoint folder"):
        family(f"path: {tmp_path / 'notes.txt'}")
    with pytest.raises(UsageError, match=r"'tiny-nothing' is not a built-in model; allowed: .*tiny-llama"):
        family("builtin: tiny-nothing")


def test_every_pass_and_target_names_registered_families_and_each_family_lists_them():
    from accelc.compiler import registry
    from accelc.families.base import get_family, load_all

    families = load_all()
    registry.load_all()
    for name, cls in {**registry.PASSES, **registry.TARGETS}.items():
        assert cls.families and set(cls.families) <= set(families), name
    assert "speculative" in get_family("causal_lm").passes() and "speculative" not in get_family("onnx").passes()
    assert get_family("onnx").targets() == ["cpu"]


def test_run_backend_choices_are_the_registered_backends(capsys):
    from accelc.cli import build_parser
    from accelc.runtime.backends import load_all

    parser = build_parser()
    for name in load_all():
        assert parser.parse_args(["run", "art", "--prompt", "p", "--backend", name]).backend == name
    with pytest.raises(SystemExit):
        parser.parse_args(["run", "art", "--prompt", "p", "--backend", "no-such-backend"])
    assert (
        "choose from 'cuda-ort', 'cuda-tvm', 'openvino', 'ort', 'torch', 'tvm', 'tvm-twin'" in capsys.readouterr().err
    )


def test_missing_backend_dependency_is_exit_3_naming_the_install():
    from accelc.errors import MissingDependency
    from accelc.runtime.backends import BACKENDS, Backend, Dependency, check_dependencies, register_backend

    absent = Dependency("accelc_test_no_such_module", "pip install accelc-test-runtime", "a test runtime")
    cls = register_backend(type("AbsentBackend", (Backend,), {"name": "absent-test", "dependency": absent}))
    try:
        with pytest.raises(MissingDependency) as info:
            check_dependencies(["ort", "absent-test"])
        assert info.value.exit_code == 3 and "pip install accelc-test-runtime" in str(info.value)
    finally:
        assert BACKENDS.pop("absent-test") is cls


def test_eval_and_bench_ask_the_artifact_family(cli, tmp_path):
    """An opaque ONNX graph has no tokenizer, so no perplexity, and no decode loop to time: its
    family says so (exit 2) instead of failing inside the causal-LM code."""
    out = tmp_path / "out"
    code, _, err = cli("compile", _onnx_recipe(tmp_path, ""), "-o", out)
    assert code == 0, err
    code, _, err = cli("eval", out)
    assert code == 2 and "opaque ONNX graph artifacts have no quality measure" in err and "Traceback" not in err
    code, _, err = cli("bench", out)
    assert code == 2 and "opaque ONNX graph artifacts have no benchmark" in err


def test_train_names_the_built_ins_and_refuses_ones_accelc_does_not_train(cli):
    code, _, err = cli("train", "tiny-nothing")
    assert code == 2 and "'tiny-nothing' is not a built-in model; allowed:" in err and "tiny-llama" in err
    code, _, err = cli("train", "tiny-llama")
    assert code == 2 and "not trained by accelc" in err
    code, _, err = cli("train", "tiny-llama", "--steps", "0")
    assert code == 2 and "--steps 0 is below its minimum 1" in err


def test_families_are_asked_in_the_registry_list_order_whatever_the_import_order():
    from accelc.families.base import FAMILIES
    from accelc.families.causal_lm import CausalLM
    from accelc.families.onnx_graph import OnnxGraph
    from accelc.registry import Registry

    registry = Registry("model family", ("accelc.families.onnx_graph", "accelc.families.causal_lm"))
    registry.register(CausalLM)  # imported (so registered) first, as another module may cause
    registry.register(OnnxGraph)
    assert list(registry) == ["onnx", "causal_lm"]  # causal_lm claims every folder: it must come last
    assert list(FAMILIES.load_all())[-1] == "causal_lm"
