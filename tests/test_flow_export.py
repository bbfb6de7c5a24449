"""TarFlow blocks exported to ONNX (families/tarflow_export.py) and run on ORT (runtime/flow_ort.py)."""

from __future__ import annotations

import numpy as np
import pytest

from accelc.families.tarflow import tiny_model
from accelc.families.tarflow_export import export_blocks
from accelc.loops import flow_sampling as fs
from accelc.runtime.flow import torch_flow_model
from accelc.runtime.flow_ort import ort_flow_model


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    model = tiny_model()
    directory = tmp_path_factory.mktemp("flow-onnx")
    export_blocks(model, directory)
    return torch_flow_model(model), ort_flow_model(directory, {"intra_op_threads": 1})


def test_both_calls_of_every_block_match_torch(models):
    reference, ort = models
    x = fs.prior_noise(reference, 3, seed=4)
    for ours, theirs in zip(ort.blocks, reference.blocks):
        assert ours.flip == theirs.flip
        for got, want in zip(ours.params(x), theirs.params(x)):
            np.testing.assert_allclose(got, want, atol=1e-5)
        state, *got = ours.extend(ours.empty(3), x[:, :6])  # from an empty cache, then after 6 tokens
        _, *want = theirs.extend(theirs.empty(3), x[:, :6])
        state, *got2 = ours.extend(state, x[:, 6:9])
        _, *want2 = theirs.extend(theirs.extend(theirs.empty(3), x[:, :6])[0], x[:, 6:9])
        for g, w in zip(got + got2, want + want2):
            np.testing.assert_allclose(g, w, atol=1e-5)


def test_ort_samples_equal_torch_samples_for_every_schedule(models):
    reference, ort = models
    z = fs.prior_noise(reference, 4, seed=5)
    for schedule in (fs.FlowSchedule.sequential(4), fs.FlowSchedule.gs_jacobi(reference, 5, 1e-3)):
        want, _ = fs.sample(reference, z, schedule)
        got, _ = fs.sample(ort, z, schedule)
        np.testing.assert_allclose(got, want, atol=1e-4, err_msg=schedule.name)
