"""The cuda target without a GPU: the sm_80 build's kernels and their dlight rules, the nvcc fatbin,
the llvm twin's parity with torch on tiny Llama and Qwen2 (paged cache: prefill, decode, k-token
verify, truncation and forks), the ORT CUDA configuration, and one-line exits 2 and 3."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest

pytest.importorskip("tvm")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from accelc.errors import HostUnsupported  # noqa: E402
from accelc.families.tiny import TINY_CONFIGS  # noqa: E402
from accelc.runtime.cuda_tvm_backend import PagedKVStepModel  # noqa: E402
from accelc.runtime.torch_backend import TorchStepModel  # noqa: E402
from accelc.targets import tvm_nn_build  # noqa: E402

LOGIT_TOL = 1e-4  # float32 with another summation order: observed <= 1e-5 on logits of size ~10
ARCHS = ["sm_80", "sm_90"]
# wider than HF's 0.02 init, so logits are O(10) and a wrong position or cache shows (test_tvm_backend.py)
INIT_STD = 0.3
PROMPT = np.array([3, 17, 42, 9, 100, 7, 55])


def _checkpoint(name: str, directory, **overrides):
    spec = {**TINY_CONFIGS[name], "vocab_size": 258, "initializer_range": INIT_STD, **overrides}
    config = transformers.AutoConfig.for_model(**spec)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(directory)
    return model


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """tiny-llama (tied embeddings) built for sm_80 (fatbin for ARCHS where nvcc is installed) and llvm."""
    root = tmp_path_factory.mktemp("llama")
    model = _checkpoint("tiny-llama", root / "hf")
    meta = tvm_nn_build.lower_decoder(root / "hf", root / "decoder", architectures=ARCHS)
    return model, root / "decoder", meta


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory):
    """tiny-qwen2 (qkv bias, an untied lm_head) as the llvm twin only."""
    root = tmp_path_factory.mktemp("qwen2")
    model = _checkpoint("tiny-qwen2", root / "hf", tie_word_embeddings=False)
    tvm_nn_build.lower_decoder(root / "hf", root / "decoder", architectures=None)
    return model, root / "decoder"


def test_sm80_build_schedules_every_matmul_with_matmul_or_gemv(llama):
    _, directory, meta = llama
    assert meta["target"]["kind"] == "cuda" and meta["target"]["arch"] == "sm_80"  # never TVM's bare sm_50
    rules = meta["kernels"]
    matmuls = {name: rule for name, rule in rules.items() if "matmul" in name}
    # FuseTransposeMatmul ran first: every matmul reads its weight as [N, K], the layout GEMV needs
    assert matmuls and all(name.startswith(("NT_matmul", "fused_NT_matmul")) for name in matmuls)
    assert set(matmuls.values()) == {"Matmul", "GEMV"}, matmuls
    # each projection has a prefill kernel (dynamic length: Matmul) and a decode one (one row: GEMV)
    counts = [sum(rule == r for rule in matmuls.values()) for r in ("Matmul", "GEMV")]
    assert counts[0] == counts[1] == 5, matmuls  # qkv, o (+ residual), gate_up, down (+ residual), lm_head
    assert {"rms_norm"} <= {name for name, rule in rules.items() if rule == "Reduction"}
    assert "unscheduled" not in rules.values()
    # the paged KV cache's own attention and paging kernels are in the CUDA source
    source = (directory / "kernels.cu").read_text()
    kernels = set(meta["cuda_kernels"])
    assert {"batch_prefill_paged_kv_kernel", "batch_decode_paged_kv_kernel", "copy_single_page_kernel"} <= kernels
    assert kernels == set(tvm_nn_build.kernel_names(source))
    assert len(kernels) > 20


def test_aot_fatbin_holds_every_listed_architecture(llama):
    nvcc = tvm_nn_build.find_nvcc()
    if nvcc is None:
        pytest.skip("nvcc not installed: pip install nvidia-cuda-nvcc (the accelc[cuda-build] extra)")
    _, directory, meta = llama
    fatbin = meta["fatbin"]
    assert fatbin["architectures"] == ARCHS and fatbin["ptx"] == "compute_90"
    assert fatbin["source_sha256"] == meta["source_sha256"]
    assert meta["nvcc"] and meta["tvm_version"]
    data = (directory / fatbin["file"]).read_bytes()
    assert data[:4] == bytes.fromhex("50ed55ba") and len(data) == fatbin["bytes"]  # the fatbin magic
    cuobjdump = nvcc.parent / "cuobjdump"
    if cuobjdump.is_file():
        listing = subprocess.run([str(cuobjdump), "--list-elf", str(directory / fatbin["file"])], capture_output=True)
        for arch in ARCHS:
            assert arch in listing.stdout.decode()


def _parity(model, directory):
    twin, ref = PagedKVStepModel(directory, "cpu"), TorchStepModel(model)
    worst = 0.0

    def same(a, b):
        nonlocal worst
        worst = max(worst, float(np.abs(a - b).max()))

    (a, s), (b, r) = twin.prefill(PROMPT), ref.prefill(PROMPT)
    same(a, b)
    (a, s1), (b, r1) = twin.extend(s, np.array([5])), ref.extend(r, np.array([5]))  # decode
    same(a, b)
    (a, s3), (b, r3) = twin.extend(s1, np.array([6, 7, 8])), ref.extend(r1, np.array([6, 7, 8]))  # verify
    same(a, b)
    for x, y in zip(twin.kv_numpy(s3), ref.kv_numpy(r3)):
        assert x.shape == y.shape
        same(x, y)
    # s3 is alive: extending s1 again must fork its prefix, not overwrite s3's positions
    (a, _), (b, _) = twin.extend(s1, np.array([9])), ref.extend(r1, np.array([9]))
    same(a, b)
    (a, _), (b, _) = twin.extend(s3, np.array([10])), ref.extend(r3, np.array([10]))
    same(a, b)
    del s3
    (a, _), (b, _) = twin.extend(twin.truncate(s1, 4), np.array([11, 12])), ref.extend(ref.truncate(r1, 4), [11, 12])
    same(a, b)
    return worst


def test_llvm_twin_matches_torch_on_tiny_llama(llama):
    model, directory, _ = llama
    assert _parity(model, directory) <= LOGIT_TOL


def test_llvm_twin_matches_torch_on_tiny_qwen2(qwen2):
    model, directory = qwen2
    assert _parity(model, directory) <= LOGIT_TOL


def test_prefill_longer_than_a_chunk_is_split(qwen2, tmp_path):
    model, directory = qwen2
    meta = json.loads((directory / "decoder.json").read_text())
    chunked = tmp_path / "decoder"
    chunked.mkdir()
    for f in directory.iterdir():
        (chunked / f.name).symlink_to(f)
    (chunked / "decoder.json").unlink()
    meta["kv_cache"]["prefill_chunk_size"] = 3  # the cache's own bound is the compiled 512; 3 forces chunks
    (chunked / "decoder.json").write_text(json.dumps(meta))
    a, _ = PagedKVStepModel(chunked, "cpu").prefill(PROMPT)
    b, _ = TorchStepModel(model).prefill(PROMPT)
    assert np.abs(a - b).max() <= LOGIT_TOL


def test_cuda_library_without_a_gpu_is_exit_3_naming_the_driver(llama):
    _, directory, _ = llama
    with pytest.raises(HostUnsupported, match=r"libcuda\.so\.1") as info:
        PagedKVStepModel(directory, "cuda")
    assert info.value.exit_code == 3 and "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("arch", "why"), [("sm_70", "below sm_75: CUDA 13"), ("sm_50", "below sm_75"), ("sm_81", "unknown CUDA arch")]
)
def test_bad_architecture_is_exit_2_with_one_line(cli, tmp_path, arch, why):
    from tests.conftest import write_recipe

    recipe = write_recipe(
        tmp_path,
        f"""
        version: 1
        model: {{builtin: tiny-llama}}
        targets:
          - kind: cuda
            backends: [tvm]
            architectures: [sm_80, {arch}]
        """,
    )
    code, _, err = cli("validate", recipe)
    # the recipe error's one line: file:line, the key and the reason
    assert code == 2 and [
        line for line in err.splitlines() if "recipe.yaml:6: targets[0].architectures" in line and why in line
    ], err


def test_unsupported_architecture_family_is_exit_2(tmp_path):
    from accelc.errors import UsageError
    from accelc.targets.tvm_nn_llm import LlmConfig

    with pytest.raises(UsageError, match="model_type 'gpt2'"):
        LlmConfig.from_hf({"model_type": "gpt2"}, "config.json")
    base = {**TINY_CONFIGS["tiny-llama"], "vocab_size": 258}
    with pytest.raises(UsageError, match="rope_scaling 'yarn'"):
        LlmConfig.from_hf({**base, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})


def test_targets_show_cuda_lists_its_options(cli):
    code, out, err = cli("targets", "show", "cuda")
    assert code == 0, err
    assert '"sm_80", "sm_86", "sm_89", "sm_90"' in out and '"cpu_fallback": "refuse"' in out
