"""ONNX Runtime CUDA artifacts without a GPU: the cuda target's session configuration round-trips
through the artifact, a session that does not run on CUDA is refused (exit 3) rather than used,
`accelc run --backend cuda-ort|cuda-tvm` is one line naming what is missing, and the device-KV
IO-binding loop itself matches torch when its device is the CPU."""

from __future__ import annotations

import json

import numpy as np
import pytest

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("transformers")

from accelc.errors import MissingDependency  # noqa: E402
from accelc.runtime.artifact import Artifact  # noqa: E402
from accelc.runtime.cuda_ort_backend import (  # noqa: E402
    CUDA_PROVIDER,
    ORT_GPU_INSTALL,
    DeviceKVStepModel,
    check_active,
    provider_list,
)
from accelc.runtime.torch_backend import TorchStepModel  # noqa: E402

LOGIT_TOL = 1e-4
EXTRA = """
targets:
  - kind: cuda
    backends: [ort]
    architectures: [sm_86]
    memory_limit_mb: 2048
    cuda_graphs: true
    ort: {{cpu_fallback: {fallback}}}
"""


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    from accelc.cli import main
    from tests.conftest import TINY_RECIPE, write_recipe

    root = tmp_path_factory.mktemp("cuda_ort")
    body = TINY_RECIPE.format(model="tiny-llama", backends="[ort]", cache=root / "cache")
    body = body.replace("targets:\n  - kind: cpu\n    backends: [ort]\n", EXTRA.format(fallback="refuse"))
    recipe = write_recipe(root, body)
    assert main(["compile", str(recipe), "-o", str(root / "out")]) == 0
    return root / "out"


def test_session_configuration_round_trips(artifact):
    manifest = json.loads((artifact / "manifest.json").read_text())
    (target,) = manifest["targets"]
    config = target["runtime"]["cuda-ort"]
    assert set(target["runtime"]) == {"cuda-ort"}  # backends: [ort] lowers no TVM decoder
    assert json.loads((artifact / target["dir"] / "ort" / "session.json").read_text()) == config
    assert Artifact(artifact).backend("cuda-ort").placement.config == config
    (name, options), *rest = provider_list(config)
    assert name == CUDA_PROVIDER and rest == []  # refuse: CUDA alone, every node on it
    assert options["gpu_mem_limit"] == str(2048 * 2**20)
    assert options["arena_extend_strategy"] == "kSameAsRequested" and options["do_copy_in_default_stream"] == "1"
    # asked for CUDA graphs, the ORT half records why it cannot replay one instead of failing on a GPU
    assert options["enable_cuda_graph"] == "0" and "attention_mask" in config["cuda_graph"]["reason"]
    assert config["install"] == ORT_GPU_INSTALL and "pip uninstall -y onnxruntime" in ORT_GPU_INSTALL
    # the compile proved what it could here and said what it could not
    assert "cuda-ort" in manifest["metrics"]["not_validated"]
    shape_ops = provider_list({**config, "cpu_fallback": "shape_ops"})
    assert [p if isinstance(p, str) else p[0] for p in shape_ops] == [CUDA_PROVIDER, "CPUExecutionProvider"]


def test_a_session_not_running_on_cuda_is_exit_3(artifact):
    graph = Artifact(artifact).backend("cuda-ort").graph("target")
    # what onnxruntime-gpu hands back when CUDA cannot start: a working session on the CPU
    session = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    with pytest.raises(MissingDependency, match="runs on CPUExecutionProvider instead") as info:
        check_active(session)
    assert info.value.exit_code == 3 and "onnxruntime-gpu" in str(info.value)


@pytest.mark.parametrize(("backend", "names"), [("cuda-ort", "onnxruntime-gpu"), ("cuda-tvm", "not in this artifact")])
def test_run_on_a_gpu_backend_without_a_gpu_is_one_line(cli, artifact, backend, names):
    code, out, err = cli("run", artifact, "--prompt", "Hi", "--max-new-tokens", "2", "--backend", backend)
    assert code == (3 if backend == "cuda-ort" else 2) and names in err and len(err.strip().splitlines()) == 1, err
    assert out == ""


def test_device_kv_loop_matches_torch_on_the_cpu_device(artifact):
    """The IO-binding loop (present outputs bound on the device, fed back as past) with the CPU as
    the device: the code path cuda-ort runs, checked here against torch."""
    art = Artifact(artifact)
    session = ort.InferenceSession(str(art.backend("cuda-ort").graph("target")), providers=["CPUExecutionProvider"])
    model, ref = DeviceKVStepModel(session, "cpu"), TorchStepModel(art.torch_model())
    prompt = np.array([3, 17, 42, 9, 100, 7, 55])
    (a, s), (b, r) = model.prefill(prompt), ref.prefill(prompt)
    worst = float(np.abs(a - b).max())
    (a, s2), (b, r2) = model.extend(s, np.array([5, 6])), ref.extend(r, np.array([5, 6]))
    worst = max(worst, float(np.abs(a - b).max()))
    (a, _), (b, _) = model.extend(model.truncate(s2, 8), np.array([9])), ref.extend(ref.truncate(r2, 8), [9])
    worst = max(worst, float(np.abs(a - b).max()))
    (a, _), (b, _) = model.extend(s, np.array([11])), ref.extend(r, np.array([11]))  # s is still a value
    worst = max(worst, float(np.abs(a - b).max()))
    assert worst <= LOGIT_TOL
    assert all(x.shape == y.shape for x, y in zip(model.kv_numpy(s2), ref.kv_numpy(r2)))
