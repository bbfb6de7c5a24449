"""TVM target + runtime: a tiny seeded model of each supported family, lowered once per module,
must reproduce Hugging Face's logits for prefill, single-token and multi-token extends,
truncation, and greedy generation."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("tvm")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from accelc.errors import UsageError  # noqa: E402
from accelc.loops.autoregressive import generate  # noqa: E402
from accelc.runtime.base import StepModel  # noqa: E402
from accelc.runtime.tvm_backend import TVMStepModel  # noqa: E402
from accelc.targets import tvm_build  # noqa: E402

LOGIT_TOL = 1e-4  # float32, different summation order: observed <= 2e-5 on logits of size ~10
VOCAB = 256
MAX_SEQ_LEN = 64  # the compiled bound on P + k; small keeps the memory plan small
PROMPT_LEN = 7
GREEDY_TOKENS = 8
SEED = 0
# Wider than HF's default 0.02 init: with it these tiny models greedily repeat one token, and a
# generation test that compares constant sequences would not notice a wrong position or cache.
INIT_STD = 0.3

# Tiny configs: 2 layers, hidden 64, 4 heads (2 KV heads where the family has GQA).
TINY = {
    "llama": lambda: transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=MAX_SEQ_LEN,
        tie_word_embeddings=True,
        rope_theta=1e5,
        initializer_range=INIT_STD,
    ),
    "qwen2": lambda: transformers.Qwen2Config(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=MAX_SEQ_LEN,
        tie_word_embeddings=False,
        initializer_range=INIT_STD,
    ),
    "gpt2": lambda: transformers.GPT2Config(
        n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=MAX_SEQ_LEN, initializer_range=INIT_STD
    ),
    "opt": lambda: transformers.OPTConfig(
        hidden_size=64,
        ffn_dim=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=VOCAB,
        max_position_embeddings=MAX_SEQ_LEN,
        word_embed_proj_dim=64,
        init_std=INIT_STD,
    ),
}


def tiny_model(family: str):
    torch.manual_seed(SEED)
    model = transformers.AutoModelForCausalLM.from_config(TINY[family]())
    # HF initialises biases to zero; random ones make the parity check cover them.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    return model.eval()


@pytest.fixture(scope="module", params=list(TINY))
def lowered(request, tmp_path_factory):
    """(family, HF model, TVMStepModel, meta) — one build per family for the whole module."""
    family = request.param
    model = tiny_model(family).train()  # lowering exports in eval mode without changing ours
    out = tmp_path_factory.mktemp(f"tvm_{family}")
    meta = tvm_build.lower_causal_lm(model, out, tvm_build.host_llvm_target(), max_seq_len=MAX_SEQ_LEN)
    assert model.training
    return family, model.eval(), TVMStepModel(out), meta


def token_ids(n: int, seed: int = SEED) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, size=n).astype(np.int64)


def hf_logits(model, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(ids)[None]).logits[0].numpy()


def assert_close(ours: np.ndarray, ref: np.ndarray):
    assert ours.dtype == np.float32 and ours.shape == ref.shape
    diff = float(np.abs(ours - ref).max())
    assert diff < LOGIT_TOL, f"max |logits - HF| = {diff:.2e}"


def test_artifact_metadata(lowered):
    family, _model, step, meta = lowered
    assert isinstance(step, StepModel) and step.name == "tvm"
    assert step.vocab_size == VOCAB
    written = json.loads((step.artifact_dir / tvm_build.META_FILE).read_text())
    assert written == meta
    assert meta["function"] == tvm_build.STEP_FUNC and meta["family"] == family
    assert meta["num_layers"] == 2 and len(meta["outputs"]) == 1 + 2 * meta["num_layers"]
    assert meta["inputs"][0] == "input_ids" and len(meta["inputs"]) == 1 + 2 * meta["num_layers"]
    assert meta["target"]["kind"] == "llvm" and meta["target"]["mcpu"] not in ("", "native", "generic")
    if family == "llama":  # tied embeddings are stored once but fill both slots
        assert len(meta["params"]) == len(set(meta["params"])) + 1


def test_prefill_matches_hf(lowered):
    _, model, step, _ = lowered
    ids = token_ids(PROMPT_LEN)
    logits, state = step.prefill(ids)
    assert state.length == PROMPT_LEN
    assert tuple(state.tensors[0].shape) == (1, step.kv_heads, PROMPT_LEN, step.head_dim)
    assert_close(logits, hf_logits(model, ids))


def test_extends_match_hf_with_past(lowered):
    """Two single-token extends, then a 3-token extend (verification), each against HF fed the
    same tokens on top of its own KV cache."""
    _, model, step, _ = lowered
    ids = token_ids(PROMPT_LEN + 5)
    chunks = [
        ids[:PROMPT_LEN],
        ids[PROMPT_LEN : PROMPT_LEN + 1],
        ids[PROMPT_LEN + 1 : PROMPT_LEN + 2],
        ids[PROMPT_LEN + 2 :],
    ]
    state = step.empty_state()
    past = None
    with torch.no_grad():
        for chunk in chunks:
            logits, state = step.extend(state, chunk)
            out = model(torch.from_numpy(chunk)[None], past_key_values=past, use_cache=True)
            past = out.past_key_values
            assert_close(logits, out.logits[0].numpy())
    assert state.length == len(ids)


def test_kv_cache_matches_hf(lowered):
    _, model, step, _ = lowered
    ids = token_ids(PROMPT_LEN)
    _, state = step.prefill(ids)
    with torch.no_grad():
        past = model(torch.from_numpy(ids)[None], use_cache=True).past_key_values
    ref = [t.numpy() for layer in past.layers for t in (layer.keys, layer.values)]
    ours = step.kv_numpy(state)
    assert len(ours) == len(ref)
    for a, b in zip(ours, ref):
        assert a.shape == b.shape and float(np.abs(a - b).max()) < LOGIT_TOL


def test_states_are_values(lowered):
    """Extending a state does not invalidate it: the same state extended twice agrees."""
    _, _, step, _ = lowered
    ids = token_ids(PROMPT_LEN + 2)
    _, state = step.prefill(ids[:PROMPT_LEN])
    first, _ = step.extend(state, ids[PROMPT_LEN:])
    again, _ = step.extend(state, ids[PROMPT_LEN:])
    np.testing.assert_array_equal(first, again)


def test_greedy_generation_matches_hf_generate(lowered):
    _, model, step, _ = lowered
    prompt = token_ids(PROMPT_LEN)
    with torch.no_grad():
        ref = model.generate(
            torch.from_numpy(prompt)[None],
            max_new_tokens=GREEDY_TOKENS,
            min_new_tokens=GREEDY_TOKENS,
            do_sample=False,
            pad_token_id=0,
        )
    expected = ref[0, PROMPT_LEN:].tolist()
    ours = generate(step, prompt.tolist(), GREEDY_TOKENS).tokens
    assert ours == expected


def test_truncate_then_extend_equals_fresh(lowered):
    _, _, step, _ = lowered
    ids = token_ids(PROMPT_LEN + 4)
    keep = PROMPT_LEN - 2
    _, state = step.prefill(ids[:PROMPT_LEN])
    _, state = step.extend(state, ids[PROMPT_LEN:])  # rejected "drafts"
    cut = step.truncate(state, keep)
    assert cut.length == keep and tuple(cut.tensors[0].shape)[2] == keep
    resumed, _ = step.extend(cut, ids[keep:])
    fresh, _ = step.prefill(ids)
    np.testing.assert_allclose(resumed, fresh[keep:], atol=LOGIT_TOL, rtol=0)
    assert step.truncate(state, state.length) is state
    with pytest.raises(ValueError):
        step.truncate(state, state.length + 1)


@pytest.mark.parametrize(
    "bad", [np.array([], dtype=np.int64), np.zeros((2, 2), dtype=np.int64), np.array([VOCAB]), np.array([0.5])]
)
def test_bad_ids_rejected(lowered, bad):
    _, _, step, _ = lowered
    with pytest.raises(UsageError):
        step.extend(step.empty_state(), bad)


def test_empty_prefill_rejected(lowered):
    _, _, step, _ = lowered
    with pytest.raises(UsageError, match="at least one token"):
        step.prefill(np.array([], dtype=np.int64))


def test_sequence_longer_than_compiled_bound_rejected(lowered):
    _, _, step, _ = lowered
    with pytest.raises(UsageError, match="max_seq_len"):
        step.prefill(token_ids(MAX_SEQ_LEN + 1))


def test_unsupported_family_is_a_usage_error(tmp_path):
    config = transformers.MistralConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
    )
    model = transformers.MistralForCausalLM(config)
    with pytest.raises(UsageError, match="llama"):
        tvm_build.lower_causal_lm(model, tmp_path, tvm_build.host_llvm_target())


def test_non_fp32_model_is_a_usage_error(tmp_path):
    model = tiny_model("llama").half()
    with pytest.raises(UsageError, match="float32"):
        tvm_build.lower_causal_lm(model, tmp_path, tvm_build.host_llvm_target())


def test_missing_artifact_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match=r"tvm_meta\.json"):
        TVMStepModel(tmp_path)


def test_a_library_built_for_a_cpu_this_one_lacks_is_refused_by_name():
    import tvm

    from accelc.errors import HostUnsupported
    from accelc.runtime.tvm_backend import check_host_cpu, missing_cpu_features

    host = tvm.get_global_func("tvm.codegen.llvm.GetHostCPUName")()
    assert missing_cpu_features({"kind": "llvm", "mcpu": host}) == []
    assert missing_cpu_features({"kind": "llvm", "mcpu": "x86-64"}) == []  # the baseline runs everywhere
    for newer in ("graniterapids", "sapphirerapids", "znver5", "arrowlake"):
        missing = missing_cpu_features({"kind": "llvm", "mcpu": newer})
        if missing:
            with pytest.raises(HostUnsupported, match=f"compiled for CPU '{newer}'.* lacks {missing[0]}"):
                check_host_cpu({"kind": "llvm", "mcpu": newer})
            return
    pytest.skip(f"this CPU ({host}) has every feature of the newer CPUs tried")
