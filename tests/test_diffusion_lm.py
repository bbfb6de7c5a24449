"""The masked-diffusion family's models, the denoiser protocol and the samplers written against it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

from accelc.errors import UsageError
from accelc.families import diffusion_lm_model as dm
from accelc.families import diffusion_lm_tiny
from accelc.loops import diffusion as D
from accelc.runtime.denoiser import TorchDenoiser

PROMPT = [72, 101, 108, 108, 111, 44, 32, 119, 111, 114]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module", params=sorted(diffusion_lm_tiny.TINY))
def folder(request, tmp_path_factory):
    return diffusion_lm_tiny.build(request.param, tmp_path_factory.mktemp(request.param) / "model")


@pytest.fixture(scope="module")
def denoiser(folder):
    return TorchDenoiser(dm.load(folder))


def run(denoiser, **options):
    return D.generate(denoiser, PROMPT, D.SamplerOptions(stop_at_eos=False, **options))


# --------------------------------------------------------------------------- models


def test_folders_use_the_published_layouts(folder):
    config = json.loads((folder / "config.json").read_text())
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        names = set(f.keys())
    if config["architectures"] == ["LLaDAModelLM"]:
        assert {"d_model", "n_layers", "n_heads", "mlp_hidden_size", "mask_token_id"} <= set(config)
        assert "model.transformer.blocks.1.attn_out.weight" in names
        assert "model.transformer.blocks.0.ff_proj.weight" in names and "model.transformer.ff_out.weight" in names
        assert dm.DiffusionConfig.read(folder).shift == 0
    else:
        assert config["architectures"] == ["DreamModel"] and "mask_token_id" in config
        assert "model.layers.0.self_attn.q_proj.bias" in names and "lm_head.weight" in names
        assert dm.DiffusionConfig.read(folder).shift == 1


def test_attention_is_bidirectional(denoiser):
    """Changing the last token changes the first position's logits (a causal model's would not)."""
    ids = np.array(PROMPT)
    changed = ids.copy()
    changed[-1] = 33
    assert not np.allclose(denoiser(ids)[0][0], denoiser(changed)[0][0])


@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_a_window_with_cached_context_reproduces_the_full_call(denoiser, cache):
    x = np.array(PROMPT + [denoiser.mask_id] * 16)
    full, kv = denoiser(x)
    start, end = 12, 20 if cache == "dual" else len(x)
    context = [
        (np.concatenate([k[:, :, :start], k[:, :, end:]], 2), np.concatenate([v[:, :, :start], v[:, :, end:]], 2))
        for k, v in kv
    ]
    window, _ = denoiser(x[start:end], start, context)
    np.testing.assert_allclose(window, full[start:end], atol=1e-4)


def test_a_config_without_mask_token_is_refused(folder, tmp_path):
    config = json.loads((folder / "config.json").read_text())
    del config["mask_token_id"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UsageError, match="mask_token_id"):
        dm.DiffusionConfig.read(tmp_path)


def test_weights_that_do_not_match_the_config_are_refused(folder, tmp_path):
    import shutil

    shutil.copy(folder / "model.safetensors", tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["n_layers" if "n_layers" in config else "num_hidden_layers"] = 3
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UsageError, match="missing"):
        dm.load(tmp_path)


# --------------------------------------------------------------------------- exactness


def test_threshold_above_one_is_the_baseline_one_token_a_call(denoiser):
    baseline = run(denoiser, sampler="baseline", gen_length=32, block_length=8)
    fast = run(denoiser, sampler="fast_threshold", threshold=1.01, gen_length=32, block_length=8)
    assert fast.tokens == baseline.tokens
    assert fast.calls == baseline.calls == 32


def test_slowfast_without_its_fast_path_is_the_baseline(denoiser):
    """algorithms notes 2(d).4: tau_high > 1 and a span of the whole block decode one token a call."""
    params = D.SlowFastParams(tau_high=1.01, tau_min=0.0)
    slowfast = run(denoiser, sampler="slowfast", slowfast=params, gen_length=32, block_length=16)
    baseline = run(denoiser, sampler="baseline", gen_length=32, block_length=16)
    assert slowfast.tokens == baseline.tokens and slowfast.calls == 32


@pytest.mark.parametrize("sampler", D.SAMPLERS)
@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_a_cache_refreshed_every_call_is_no_cache(denoiser, sampler, cache):
    plain = run(denoiser, sampler=sampler, gen_length=16, block_length=8)
    cached = run(denoiser, sampler=sampler, cache=cache, refresh_every=1, gen_length=16, block_length=8)
    assert cached.tokens == plain.tokens and cached.calls == plain.calls


def test_caches_feed_fewer_tokens(denoiser):
    plain = run(denoiser, gen_length=32, block_length=8)
    prefix = run(denoiser, cache="prefix", gen_length=32, block_length=8)
    dual = run(denoiser, cache="dual", gen_length=32, block_length=8)
    assert dual.tokens_fed < prefix.tokens_fed < plain.tokens_fed
    assert plain.calls == prefix.calls == dual.calls


def llada_algorithm(model, prompt, length, steps, mask_id, shift):
    """LLaDA's reverse process with low-confidence remasking, transcribed from arXiv 2502.09992
    Algorithm 5 (one block): at t -> s = t - 1/N predict every masked token, then remask the
    least confident so that floor(L(1 - s)) of the response are unmasked."""
    r = torch.tensor(prompt + [mask_id] * length)
    m = len(prompt)
    for k in range(steps, 0, -1):
        s = (k - 1) / steps
        with torch.no_grad():
            logits, _ = model(r[None], torch.arange(len(r))[None])
        logits = logits[0]
        if shift:
            logits = torch.cat([logits[:1], logits[:-1]])
        logits[:, mask_id] = -torch.inf
        masked = r == mask_id
        r0 = torch.where(masked, logits.argmax(-1), r)
        c = torch.where(masked, torch.softmax(logits.double(), -1).gather(-1, r0[:, None])[:, 0], torch.ones(len(r)))
        unmasked = int(np.floor(length * (1 - s)))
        response_c = c[m:]
        # stable order: among equal confidences the leftmost is kept, as the sampler does
        order = np.argsort(-response_c.numpy(), kind="stable")
        remask = order[unmasked:]
        r0[m + torch.from_numpy(remask)] = mask_id
        r = r0
    return r[m:].tolist()


@pytest.mark.parametrize("steps", [16, 8, 4])
def test_the_baseline_is_the_papers_algorithm(denoiser, steps):
    length = 16  # steps divide it: the paper's floor(L(1-s)) and the code's quotas then agree
    expected = llada_algorithm(denoiser.model, PROMPT, length, steps, denoiser.mask_id, denoiser.shift)
    got = run(denoiser, sampler="baseline", gen_length=length, block_length=length, steps=steps)
    assert got.tokens == expected and got.calls == steps


# --------------------------------------------------------------------------- rules, on an oracle


class Oracle:
    """A denoiser whose per-position distributions are prescribed: `conf[i]` on token `tokens[i]`,
    the rest spread over the other tokens."""

    name, vocab_size, mask_id, shift = "oracle", 50, 49, 0

    def __init__(self, tokens, conf, eos_id=None):
        self.tokens, self.conf, self.eos_id = np.asarray(tokens), np.asarray(conf, dtype=np.float64), eos_id

    def __call__(self, ids, start=0, context=None):
        n = len(ids)
        total = np.full(start + n, 0.5)
        chosen = np.zeros(start + n, dtype=np.int64)
        total[-len(self.conf) :], chosen[-len(self.tokens) :] = self.conf, self.tokens
        probs = np.full((start + n, self.vocab_size), 1e-9)
        rest = (1 - total) / (self.vocab_size - 2)
        probs[:] = rest[:, None]
        probs[np.arange(start + n), chosen] = total
        return np.log(probs)[start:], [(np.zeros((1, 1, n, 1), np.float32),) * 2]


def test_factor_rule_accepts_the_largest_qualifying_prefix():
    # sorted confidences .99 .8 .6: thresholds 1-1/3=.67 for the second, 1-1/4=.75 for the third
    oracle = Oracle(tokens=[1, 2, 3, 4], conf=[0.6, 0.99, 0.8, 0.3])
    result = D.generate(oracle, [5], D.SamplerOptions(sampler="fast_factor", gen_length=4, block_length=4))
    assert result.tokens == [1, 2, 3, 4] and result.calls == 3  # {.99, .8}, then .6, then .3


def test_threshold_rule_keeps_the_top_one_and_all_above():
    oracle = Oracle(tokens=[1, 2, 3, 4], conf=[0.95, 0.5, 0.91, 0.2])
    result = D.generate(oracle, [5], D.SamplerOptions(sampler="fast_threshold", gen_length=4, block_length=4))
    assert result.calls == 3  # {.95, .91}, {.5}, {.2}


def test_slowfast_span_converges_to_the_confident_region():
    """algorithms notes 2(d).5: confidence 1 on a prefix of length r: the span converges to r and
    the fast stage fills it in one call."""
    conf = [0.999] * 6 + [0.05] * 10
    oracle = Oracle(tokens=list(range(1, 17)), conf=conf)
    params = D.SlowFastParams(tau_high=0.99)  # paper: top-1 while exploring, stable after 2 steps
    opts = D.SamplerOptions(sampler="slowfast", slowfast=params, gen_length=16, block_length=16, stop_at_eos=False)
    result = D.generate(oracle, [5], opts)
    assert result.tokens == list(range(1, 17))
    # 2 exploring calls (1 token each, span 6 stable), 1 fast call for the other 4; then the
    # unconfident tail: explored and decoded a token a call (10 calls)
    assert result.calls == 2 + 1 + 10


def test_end_of_text_pads_the_rest_and_stops():
    oracle = Oracle(tokens=[1, 7, 2, 3, 4, 5, 6, 8], conf=[0.95, 0.99, 0.3, 0.3, 0.3, 0.3, 0.3, 0.3], eos_id=7)
    opts = D.SamplerOptions(sampler="fast_threshold", gen_length=8, block_length=4)
    result = D.generate(oracle, [5], opts)
    assert result.tokens == [1, 7, 7, 7, 7, 7, 7, 7] and result.calls == 1
    assert result.text_tokens(7) == [1]
    full = D.generate(oracle, [5], opts.model_copy(update={"stop_at_eos": False}))
    assert full.calls > 1


def test_the_settled_rule_pads_only_once_the_text_before_end_of_text_is_decoded():
    # end-of-text is the most confident prediction; position 2 (after it) the next
    oracle = Oracle(tokens=[1, 7, 2, 3, 4, 5, 6, 8], conf=[0.3, 0.95, 0.5, 0.3, 0.3, 0.3, 0.3, 0.3], eos_id=7)
    opts = D.SamplerOptions(sampler="fast_threshold", gen_length=8, block_length=4)
    settled = D.generate(oracle, [5], opts)
    eos = D.generate(oracle, [5], opts.model_copy(update={"stop_rule": "eos"}))
    # eos: padded at once, then position 0; settled: positions 2 and 0 decoded before the padding
    assert (eos.tokens, eos.calls) == ([1, 7, 7, 7, 7, 7, 7, 7], 2)
    assert (settled.tokens, settled.calls) == ([1, 7, 2, 7, 7, 7, 7, 7], 3)
    assert settled.text_tokens(7) == eos.text_tokens(7) == [1]


@pytest.mark.parametrize("sampler", D.SAMPLERS)
def test_the_settled_stop_keeps_the_text_of_the_full_run(folder, sampler):
    """A model whose predictions depend on context: the settled stop writes the text the same
    sampler writes without the stop (up to end-of-text), in fewer calls."""
    denoiser = TorchDenoiser(dm.load(folder))
    full = D.generate(denoiser, PROMPT, D.SamplerOptions(sampler=sampler, stop_at_eos=False))
    # the tiny model does not write its end-of-text: take a token it writes mid-response as one
    denoiser.eos_id = eos = full.tokens[len(full.tokens) // 3]
    full = D.generate(denoiser, PROMPT, D.SamplerOptions(sampler=sampler, stop_at_eos=False))
    stopped = D.generate(denoiser, PROMPT, D.SamplerOptions(sampler=sampler))
    assert stopped.text_tokens(eos) == full.text_tokens(eos) and stopped.calls < full.calls


def test_calls_that_decode_only_end_of_text_are_padding_calls():
    oracle = Oracle(tokens=[1, 7, 7, 7], conf=[0.95, 0.3, 0.3, 0.3], eos_id=7)
    opts = D.SamplerOptions(sampler="fast_threshold", gen_length=4, block_length=4, stop_at_eos=False)
    result = D.generate(oracle, [5], opts)
    assert result.tokens == [1, 7, 7, 7] and (result.calls, result.padding_calls) == (4, 3)
    stopped = D.generate(oracle, [5], opts.model_copy(update={"stop_at_eos": True}))
    assert (stopped.calls, stopped.padding_calls) == (2, 1)


# --------------------------------------------------------------------------- bad input


def test_a_block_length_that_does_not_divide_is_refused(denoiser):
    with pytest.raises(UsageError, match="block_length 12 does not divide gen_length 32"):
        run(denoiser, gen_length=32, block_length=12)


def test_steps_not_a_multiple_of_the_blocks_is_refused(denoiser):
    with pytest.raises(UsageError, match="steps 6"):
        run(denoiser, gen_length=32, block_length=8, steps=6)


def test_a_causal_model_is_refused():
    class StepModelLike:
        name = "torch"

        def prefill(self, ids): ...

    with pytest.raises(UsageError, match="masked-diffusion denoiser"):
        D.generate(StepModelLike(), PROMPT, D.SamplerOptions())


# --------------------------------------------------------------------------- dLLM-Cache


@pytest.mark.parametrize(
    "intervals", [(1, 1, 0.0), (1, 5, 1.0)], ids=["refreshed every call", "prompt every call, all verified"]
)
def test_dllm_cache_that_recomputes_everything_is_no_cache(denoiser, intervals):
    """algorithms notes 2(d).7: K_p = K_r = 1 and rho = 0, or rho = 1 (prompt refreshed), are exact."""
    prompt_interval, response_interval, ratio = intervals
    plain = run(denoiser, sampler="fast_threshold", gen_length=16, block_length=8)
    cached = run(
        denoiser,
        sampler="fast_threshold",
        cache="dllm_cache",
        prompt_interval=prompt_interval,
        response_interval=response_interval,
        transfer_ratio=ratio,
        gen_length=16,
        block_length=8,
    )
    assert cached.tokens == plain.tokens


def test_dllm_cache_reuses_features_between_refreshes(denoiser):
    from accelc.runtime.dllm_cache import FeatureCache

    x = np.array(PROMPT + [denoiser.mask_id] * 8)
    features = FeatureCache(denoiser.model)
    np.testing.assert_allclose(features(x, len(PROMPT), True, True, 0.0), denoiser(x)[0], atol=1e-4)
    changed = x.copy()
    changed[len(PROMPT) : len(PROMPT) + 4] = 65
    stale = features(changed, len(PROMPT), False, False, 0.0)  # every feature reused: not the new logits
    assert not np.allclose(stale, denoiser(changed)[0], atol=1e-3)


def test_dllm_cache_on_a_graph_backend_is_refused():
    with pytest.raises(UsageError, match="torch only"):
        D.generate(Oracle([1], [0.9]), [5], D.SamplerOptions(cache="dllm_cache", gen_length=4, block_length=4))
