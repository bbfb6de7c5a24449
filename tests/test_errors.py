"""Exit codes keep their meaning: a broken invariant of accelc's own is an InternalError (exit 1),
never a UsageError (exit 2, "fix your input")."""

from __future__ import annotations

import pytest

from accelc.compiler import registry
from accelc.errors import InternalError, UsageError


def test_a_second_class_registering_a_pass_name_is_an_internal_error():
    registry.load_all()
    taken = registry.PASSES["export_onnx"]

    class Impostor(registry.Pass):
        name = "export_onnx"

    with pytest.raises(InternalError) as info:
        registry.register_pass(Impostor)
    assert not isinstance(info.value, UsageError) and info.value.exit_code == 1
    assert "export_onnx" in str(info.value) and "bug in accelc" in str(info.value)
    assert registry.PASSES["export_onnx"] is taken


def test_a_second_class_registering_a_target_kind_is_an_internal_error():
    registry.load_all()
    taken = registry.TARGETS["cpu"]

    class Impostor(registry.Target):
        kind = "cpu"

    with pytest.raises(InternalError):
        registry.register_target(Impostor)
    assert registry.TARGETS["cpu"] is taken
