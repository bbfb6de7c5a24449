"""`accelc train smollm2-dream`'s data and loss, on synthetic text and a tiny seeded model (no test
trains the real model)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from accelc.families import diffusion_lm_model as dm
from accelc.families import diffusion_lm_tiny
from accelc.families import diffusion_lm_train as T

EOS, MASK = 0, 1


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def stream():
    """Sentences of 3..9 distinct tokens (ids from 2 up), and the positions after each."""
    generator = torch.Generator().manual_seed(0)
    ids, ends = [], []
    while len(ids) < 400:
        ids += [2 + len(ids) + k for k in range(int(torch.randint(3, 10, (1,), generator=generator)))]
        ends.append(len(ids))
    return ids, ends


SMALL = replace(T.SFT, length=32, batch=64, prompt_tokens=(4, 8), max_sentences=2)


def test_sentences_end_after_punctuation_and_closing_quotes_not_abbreviations():
    text = 'Mr. Elliot came in. "Who is he?" she asked!  It rained\nall day'
    pieces = T.sentences(text)
    assert "".join(pieces) == text
    assert pieces == ["Mr. Elliot came in.", ' "Who is he?"', " she asked!", "  It rained\nall day"]


def test_unwrap_joins_line_wraps_and_keeps_paragraphs():
    assert T.unwrap("It was\na truth  \nuniversally.\n\n  Acknowledged\nthat") == (
        "It was a truth universally.\n\n  Acknowledged that"
    )


def test_sft_examples_are_prompt_then_whole_sentences_then_end_of_text(stream):
    ids, ends = stream
    x, noisy, masked, _, maskable = T.training_batch(torch, stream, SMALL, EOS, MASK, torch.Generator().manual_seed(1))
    assert x.shape == (SMALL.batch, SMALL.length)
    for row, noisy_row, masked_row, count in zip(x.tolist(), noisy, masked, maskable.tolist()):
        prompt = SMALL.length - count
        assert SMALL.prompt_tokens[0] <= prompt <= SMALL.prompt_tokens[1]
        assert not masked_row[:prompt].any()  # the prompt is never masked
        end = row.index(EOS)
        assert end > prompt and row[end:] == [EOS] * (SMALL.length - end)  # padding to the end, at least one
        start = ids.index(row[0])
        assert row[:end] == ids[start : start + end]  # real text, unbroken
        assert start + end in ends  # the response stops at a sentence end...
        between = [e for e in ends if start + prompt < e < start + end]
        assert len(between) < SMALL.max_sentences  # ...after at most max_sentences of them
        assert torch.equal(noisy_row[masked_row], torch.full((int(masked_row.sum()),), MASK))
        assert torch.equal(noisy_row[~masked_row], torch.tensor(row)[~masked_row])
    assert masked[:, -1].any()  # padding is masked, and so part of the loss


def test_a_minimum_response_keeps_every_end_of_text_past_it(stream):
    """`min_response`: no response stops before that many tokens, and each stops at one of the
    first `max_sentences` sentence ends past them."""
    ids, ends = stream
    cfg = replace(SMALL, min_response=6)
    x, _, _, _, maskable = T.training_batch(torch, stream, cfg, EOS, MASK, torch.Generator().manual_seed(3))
    lengths = []
    for row, count in zip(x.tolist(), maskable.tolist()):
        prompt, end = cfg.length - count, row.index(EOS)
        start = ids.index(row[0])
        assert end - prompt > cfg.min_response and start + end in ends
        assert len([e for e in ends if start + prompt + cfg.min_response < e < start + end]) < cfg.max_sentences
        lengths.append(end - prompt)
    plain, _, _, _, counts = T.training_batch(torch, stream, SMALL, EOS, MASK, torch.Generator().manual_seed(3))
    shortest = min(row.index(EOS) - (SMALL.length - c) for row, c in zip(plain.tolist(), counts.tolist()))
    assert shortest <= cfg.min_response < min(lengths)  # without it, some responses are that short


def test_plain_windows_keep_only_the_first_token():
    ids = list(range(2, 200))
    cfg = replace(T.TEXT, length=16, batch=32)
    x, _, masked, _, maskable = T.training_batch(torch, (ids, []), cfg, EOS, MASK, torch.Generator().manual_seed(0))
    assert (maskable == cfg.length - 1).all() and not masked[:, 0].any() and masked[:, 1:].any()
    assert EOS not in x


def test_the_loss_reads_only_masked_targets(stream, tmp_path):
    model = dm.load(diffusion_lm_tiny.build("tiny-dream", tmp_path / "model"))
    vocab = model.config.vocab_size
    ids = [i % (vocab - 2) + 2 for i in stream[0]]
    cfg = replace(SMALL, batch=4)
    x, noisy, masked, t, maskable = T.training_batch(
        torch, (ids, stream[1]), cfg, EOS, MASK, torch.Generator().manual_seed(2)
    )
    with torch.no_grad():
        loss, correct, targets = T.diffusion_loss(model, x, noisy, masked, t, maskable)
        changed = torch.where(masked, x, (x + 1) % vocab)  # every target that is not masked changed
        again, _, _ = T.diffusion_loss(model, changed, noisy, masked, t, maskable)
    assert targets.numel() == correct.numel() == int(masked.sum())
    assert torch.isfinite(loss) and float(loss) > 0 and torch.equal(loss, again)


def test_the_cache_key_covers_the_data_format_not_the_run_length(monkeypatch):
    assert T.model_dir(replace(T.SFT, steps=T.SFT.steps + 1)) == T.model_dir(T.SFT)
    assert T.model_dir(replace(T.SFT, max_sentences=T.SFT.max_sentences + 1)) != T.model_dir(T.SFT)
    assert T.model_dir(replace(T.SFT, length=T.SFT.length * 2)) != T.model_dir(T.SFT)
    assert T.model_dir(replace(T.SFT, min_response=24)) != T.model_dir(T.SFT)
    assert T.model_dir(replace(T.SFT, start="")) != T.model_dir(T.SFT)
    assert T.model_dir(replace(T.SFT, full_mask=1)) != T.model_dir(T.SFT)
    assert T.model_dir(replace(T.SFT, padding_weight=0.5)) != T.model_dir(T.SFT)
    assert T.model_dir(T.SFT) != T.model_dir(T.TEXT)
    # another thread count trains another model
    assert T.model_dir(replace(T.SFT, threads=T.SFT.threads + 1)) != T.model_dir(T.SFT)
    # a change of a stage reaches the stages that continue it
    short = T.model_dir(T.SFT_SHORT)
    monkeypatch.setitem(T.STAGES, "sft", replace(T.SFT, threads=T.SFT.threads + 1))
    assert T.model_dir(T.SFT_SHORT) != short


def test_a_stage_trains_on_its_own_threads_and_gives_them_back():
    before = torch.get_num_threads()
    with T.torch_threads(before + 1):
        assert torch.get_num_threads() == before + 1
    assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError), T.torch_threads(before + 1):
        raise RuntimeError("a failed step")
    assert torch.get_num_threads() == before


def test_the_response_check_reports_the_lengths_the_sampler_writes(tmp_path):
    from accelc.loops.diffusion import SamplerOptions, generate
    from accelc.runtime.denoiser import TorchDenoiser

    model = dm.load(diffusion_lm_tiny.build("tiny-dream", tmp_path / "model"))
    denoiser, eos = TorchDenoiser(model), model.config.eos_token_id
    prompts = [[5, 6, 7, 8], [9, 10, 11, 12]]
    opts = SamplerOptions(sampler="fast_factor", factor=2.0, gen_length=32, block_length=32)
    lengths = [len(generate(denoiser, p, opts).text_tokens(eos)) for p in prompts]
    check = T.response_check(denoiser, prompts, eos, expected=min(lengths), gen_length=32)
    assert check["text_tokens"] == lengths and check["prompts"] == 2 and check["passed"]
    assert check["sampler"] == "fast_factor" and check["block_length"] == 32
    assert not T.response_check(denoiser, prompts, eos, expected=33, gen_length=32)["passed"]


def published_stage(monkeypatch, tmp_path, check: dict) -> Path:
    """The sft-short stage's folder in an empty cache, as `accelc train` publishes it, with `check`."""
    import json

    monkeypatch.setenv("ACCELC_CACHE_DIR", str(tmp_path / "cache"))
    folder = T.model_dir(T.SFT_SHORT)
    folder.mkdir(parents=True)
    (folder / "accelc_builtin.json").write_text(json.dumps({"stage": "sft-short", "response_check": check}))
    return folder


def test_accelc_train_fails_on_a_model_that_does_not_write_its_responses(monkeypatch, tmp_path):
    from accelc.errors import ValidationFailed

    check = {"prompts": 4, "text_tokens": [3, 1, 2, 1], "expected_at_least": 24, "passed": False}
    folder = published_stage(monkeypatch, tmp_path, check)
    with pytest.raises(ValidationFailed, match=r"\[3, 1, 2, 1\] tokens"):
        T.train(f"{T.NAME}-sft-short")
    assert folder.is_dir()  # the trained model is kept with its record
    (folder / "accelc_builtin.json").write_text('{"response_check": {"passed": true}}')
    assert T.train(f"{T.NAME}-sft-short") == folder


def test_the_diffusion_benchmark_refuses_a_model_that_failed_its_check(monkeypatch, tmp_path):
    from benchmarks import diffusion

    check = {"prompts": 4, "text_tokens": [0, 1, 0, 2], "expected_at_least": 24, "passed": False}
    folder = published_stage(monkeypatch, tmp_path, check)
    assert diffusion.main(["--model", str(folder), "--json", str(tmp_path / "rows.json")]) == 2
    assert not (tmp_path / "rows.json").exists()


def test_a_full_mask_example_masks_its_whole_response(stream):
    cfg = replace(SMALL, batch=8, full_mask=2)
    _, _, masked, t, maskable = T.training_batch(torch, stream, cfg, EOS, MASK, torch.Generator().manual_seed(3))
    prompt = cfg.length - maskable  # the per-example count of maskable positions
    assert torch.equal(t[:2, 0], torch.ones(2)) and bool((t[2:] < 1).all())
    for row in range(2):
        assert bool(masked[row, prompt[row] :].all()) and not bool(masked[row, : prompt[row]].any())
    assert not bool(masked[2:].sum(1).eq(maskable[2:]).all())  # the others draw their rate


def test_padding_weight_scales_only_the_padding_after_the_first_end_of_text(tmp_path):
    model = dm.load(diffusion_lm_tiny.build("tiny-dream", tmp_path / "model"))
    eos = model.config.eos_token_id
    x = torch.tensor([[5, 6, 7, 8, 9, 10, eos, eos, eos, eos]])
    maskable = torch.arange(10)[None] >= 4
    noisy = torch.where(maskable, torch.full_like(x, model.config.mask_token_id), x)
    t = torch.ones(1, 1)
    padding = torch.arange(10)[None] >= 7  # targets after the first end-of-text (position 6)
    with torch.no_grad():
        weighted = [T.diffusion_loss(model, x, noisy, maskable, t, maskable.sum(1), w, eos)[0] for w in (0.0, 0.5, 1.0)]
        without = T.diffusion_loss(model, x, noisy, maskable & ~padding, t, maskable.sum(1))[0]
    assert torch.allclose(weighted[0], without)  # weight 0: as if the padding were not scored at all
    assert torch.allclose(weighted[1], (weighted[0] + weighted[2]) / 2) and weighted[0] < weighted[2]
