"""Masked-diffusion sampling, written once against the denoiser protocol (runtime/denoiser.py).

The response starts as `gen_length` mask tokens after the prompt and is decoded block by block
(semi-autoregressive: block b is finished before block b+1 starts; one block of the whole length
is plain diffusion). Decoded tokens are never remasked. Within a block the samplers differ in
how many tokens, and which, each model call commits:

- `baseline`: LLaDA's low-confidence remasking (arXiv 2502.09992 §2.4, Alg. 5 and App. B.3): the
  block's masks are spread over `steps / blocks` calls (the first `count % steps` calls one more),
  each committing its quota of most confident predictions.
- `fast_threshold`: Fast-dLLM's parallel decoding (arXiv 2505.22618 §3.3): the most confident
  prediction, plus every other one whose confidence reaches `threshold` (0.9).
- `fast_factor`: Fast-dLLM's factor rule: the n most confident, for the largest n with the
  i-th confidence at least 1 - factor/(i+1) (the first always; `factor` 1.0).
- `slowfast`: SlowFast sampling (arXiv 2506.10848 §3.3): cycles of a cautious exploratory stage
  that estimates the span the model is already sure of (certainty and convergence principles,
  searched left to right: the positional principle), then an accelerated stage decoding that
  span in parallel. The paper's defaults are the defaults; the released code's differences are
  options (`SlowFastParams`, `SLOWFAST_CODE`).

Confidence is the probability of the argmax (LLaDA's low-confidence remasking); ties go to the
leftmost position. With `temperature` > 0 the prediction is drawn by Gumbel-max in float64, as
LLaDA's sampler does. `stop_at_eos`: once the response's text is settled, every masked position
after it becomes end-of-text padding, which is what the model would fill there, and costs no
more calls (Learn2PD's end-of-text prediction, arXiv 2509.25188). `stop_rule` says when the text
is settled: `settled` (the default) once an end-of-text token is committed and every position
before it is decoded, so the text is the one the same sampler writes without the stop; `eos` as
soon as an end-of-text token is committed, a few calls sooner, but the forced padding then
enters the model's context while positions before it are still masked, and changes the text of
a model that sometimes writes on after an end-of-text.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from accelc.errors import UsageError
from accelc.loops.diffusion_cache import CACHES, ModelView
from accelc.runtime.denoiser import Denoiser

SAMPLERS = ("baseline", "fast_threshold", "fast_factor", "slowfast")


class SlowFastParams(BaseModel):
    """SlowFast's parameters: the paper's defaults (§4.1, §4.3); `SLOWFAST_CODE` the released code's."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tau_min: float = 0.1  # convergence: a position is in the span if its confidence exceeds this
    tau_high: float = 0.85  # certainty: decoded in parallel at or above this
    k_max: int = Field(8, ge=1)  # exploratory steps at most
    window: int = Field(2, ge=1)  # span estimates whose spread decides stability
    stable: float = 1.0  # the spread below which the span is stable
    spread: Literal["variance", "std"] = "variance"  # the paper compares the variance, the code the std
    # the code runs all k_max exploratory steps (stability only freezes the span), and
    # decodes in parallel while exploring; the paper stops exploring once stable, one token a step
    explore_all_steps: bool = False
    explore_parallel: bool = False
    k_slow: int = Field(1, ge=1)
    k_fast: int = Field(1, ge=1)


SLOWFAST_CODE = SlowFastParams(
    tau_min=0.3, tau_high=0.9, k_max=6, spread="std", explore_all_steps=True, explore_parallel=True
)


class SamplerOptions(BaseModel):
    """One diffusion sampling configuration: the decode plan of a diffusion-LM artifact."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    sampler: Literal["baseline", "fast_threshold", "fast_factor", "slowfast"] = "baseline"
    cache: Literal["none", "prefix", "dual", "dllm_cache"] = "none"
    gen_length: int = Field(64, ge=1)
    block_length: int = Field(32, ge=1)
    steps: int | None = Field(None, ge=1)  # baseline: calls in all; None: one token a call (gen_length)
    threshold: float = 0.9
    factor: float = 1.0
    slowfast: SlowFastParams = SlowFastParams()
    refresh_every: int | None = Field(None, ge=1)  # cache refresh in calls; None: once per block
    # dLLM-Cache: the demo's defaults (its Config's 1 / 1 / 0 are exact, and no faster)
    prompt_interval: int = Field(100, ge=1)
    response_interval: int = Field(7, ge=1)
    transfer_ratio: float = Field(0.25, ge=0.0, le=1.0)
    temperature: float = Field(0.0, ge=0.0)
    seed: int = 0
    stop_at_eos: bool = True
    stop_rule: Literal["settled", "eos"] = "settled"

    def check(self) -> None:
        """UsageError (exit 2) for a configuration no sampler can run, naming the option."""
        if self.gen_length % self.block_length:
            raise UsageError(
                f"block_length {self.block_length} does not divide gen_length {self.gen_length}: "
                "blocks must tile the response (choose a divisor)"
            )
        blocks = self.gen_length // self.block_length
        steps = self.steps or self.gen_length
        if self.sampler == "baseline" and steps % blocks:
            raise UsageError(
                f"steps {steps} is not a multiple of the {blocks} blocks (gen_length {self.gen_length} / "
                f"block_length {self.block_length}): every block gets the same number of steps"
            )

    def label(self) -> str:
        return f"{self.sampler}/{self.cache}"


@dataclass
class DiffusionResult:
    tokens: list[int]  # the response (gen_length tokens, end-of-text padding included)
    calls: int
    tokens_fed: int
    seconds: float
    padding_calls: int = 0  # calls that decoded nothing but end-of-text: the work spent on padding

    def text_tokens(self, eos_id: int | None) -> list[int]:
        """The response up to its first end-of-text token."""
        if eos_id is not None and eos_id in self.tokens:
            return self.tokens[: self.tokens.index(eos_id)]
        return list(self.tokens)

    @property
    def tokens_per_call(self) -> float:
        return len(self.tokens) / max(self.calls, 1)

    @property
    def tokens_per_second(self) -> float:
        return len(self.tokens) / self.seconds if self.seconds > 0 else 0.0


class Block:
    """One block's decoding state: the sequence, the block's bounds, the model view, the commits."""

    def __init__(self, x: np.ndarray, lo: int, hi: int, view: ModelView, opts: SamplerOptions, rng, eos_id):
        self.x, self.lo, self.hi, self.view, self.opts, self.rng, self.eos_id = x, lo, hi, view, opts, rng, eos_id
        self.mask_id = view.denoiser.mask_id

    def masked(self, lo: int | None = None, hi: int | None = None) -> np.ndarray:
        """Absolute positions still masked in [lo, hi) (the block by default)."""
        lo, hi = self.lo if lo is None else lo, self.hi if hi is None else hi
        return lo + np.flatnonzero(self.x[lo:hi] == self.mask_id)

    def predict(self) -> tuple[np.ndarray, np.ndarray]:
        """(prediction, confidence) for each block position; confidence -inf where decoded."""
        logits = self.view.predict(self.x, self.lo, self.hi).astype(np.float64)
        # a trained model never predicts the mask token, an untrained one may: it would decode nothing
        logits[:, self.mask_id] = -np.inf
        if self.opts.temperature > 0:
            u = self.rng.random(logits.shape)
            pred = np.argmax(logits - self.opts.temperature * np.log(-np.log(u)), axis=-1)
        else:
            pred = np.argmax(logits, axis=-1)
        z = logits - logits.max(axis=-1, keepdims=True)
        probs = np.exp(np.take_along_axis(z, pred[:, None], axis=-1)[:, 0]) / np.exp(z).sum(axis=-1)
        conf = np.where(self.x[self.lo : self.hi] == self.mask_id, probs, -np.inf)
        return pred, conf

    def commit(self, positions: np.ndarray, pred: np.ndarray) -> None:
        """Decode the block-relative `positions` to their predictions; with stop_at_eos, pad after the
        text once `stop_rule` says it is settled."""
        self.x[self.lo + positions] = pred[positions]
        if self.eos_id is not None and positions.size and (pred[positions] == self.eos_id).all():
            self.view.stats.padding_calls += 1
        if not self.opts.stop_at_eos or self.eos_id is None:
            return
        response = self.x[self.view.prompt_length :]
        eos = np.flatnonzero(response == self.eos_id)
        if not eos.size:
            return
        first = int(eos[0])
        if self.opts.stop_rule == "settled" and (response[:first] == self.mask_id).any():
            return
        tail = response[first + 1 :]
        tail[tail == self.mask_id] = self.eos_id


def ranked(conf: np.ndarray, among: np.ndarray | None = None) -> np.ndarray:
    """Block-relative positions by descending confidence, ties to the left; only decodable ones."""
    order = np.argsort(-conf, kind="stable")
    order = order[np.isfinite(conf[order])]
    return order if among is None else order[np.isin(order, among)]


def quotas(count: int, steps: int) -> list[int]:
    """LLaDA's schedule: `count` tokens over `steps` calls, the first `count % steps` one more."""
    base, extra = divmod(count, steps)
    return [base + (1 if i < extra else 0) for i in range(steps)]


def fill_baseline(block: Block) -> None:
    opts = block.opts
    steps = (opts.steps or opts.gen_length) // (opts.gen_length // opts.block_length)
    for quota in quotas(len(block.masked()), steps):
        if not block.masked().size:
            return
        if quota == 0:
            continue
        pred, conf = block.predict()
        block.commit(ranked(conf)[:quota], pred)


def fill_threshold(block: Block) -> None:
    while block.masked().size:
        pred, conf = block.predict()
        order = ranked(conf)
        keep = 1 + int(np.sum(conf[order[1:]] >= block.opts.threshold))
        block.commit(order[:keep], pred)


def fill_factor(block: Block) -> None:
    while block.masked().size:
        pred, conf = block.predict()
        order = ranked(conf)
        n = 1
        while n < order.size and conf[order[n]] >= 1 - block.opts.factor / (n + 2):
            n += 1
        block.commit(order[:n], pred)


def parallel_or_top(conf: np.ndarray, tau: float, k: int, span: np.ndarray) -> np.ndarray:
    """SlowFast's fill: every masked position of `span` at or above `tau`, else its k most confident."""
    order = ranked(conf, span)
    sure = order[conf[order] >= tau]
    return sure if sure.size >= 1 else order[:k]


def fill_slowfast(block: Block) -> None:
    p = block.opts.slowfast
    size = block.hi - block.lo
    start = 0  # the cycle's start, block-relative
    while block.masked().size:
        # exploratory stage: cautious decoding while the converged span's end is estimated
        estimates: list[int] = []
        span_end = None
        for _ in range(p.k_max):
            if not block.masked().size:
                return
            pred, conf = block.predict()
            region = np.arange(start, size)
            converged = region[conf[start:] > p.tau_min]
            estimates.append(int(converged.max()) + 1 if converged.size else start + 1)
            if p.explore_parallel:
                block.commit(parallel_or_top(conf, p.tau_high, p.k_slow, region), pred)
            else:
                block.commit(ranked(conf, region)[: p.k_slow], pred)
            if span_end is None and len(estimates) >= p.window:
                recent = np.asarray(estimates[-p.window :], dtype=np.float64)
                spread = recent.var() if p.spread == "variance" else recent.std()
                if spread < p.stable:
                    # the paper's e_cycle is the window's mean; the code keeps the last estimate
                    span_end = round(float(recent.mean())) if not p.explore_all_steps else estimates[-1]
                    if not p.explore_all_steps:
                        break
        if span_end is None:
            span_end = round(float(np.mean(estimates[-p.window :])))
        span_end = min(max(span_end, start + 1), size)
        # accelerated stage: the span decoded in parallel until it has no masks
        span = np.arange(start, span_end)
        while (block.x[block.lo + span] == block.mask_id).any():
            pred, conf = block.predict()
            block.commit(parallel_or_top(conf, p.tau_high, p.k_fast, span), pred)
        start = span_end  # every mask before it is decoded: exploring covered [start, size)


FILL = {
    "baseline": fill_baseline,
    "fast_threshold": fill_threshold,
    "fast_factor": fill_factor,
    "slowfast": fill_slowfast,
}


def generate(denoiser, prompt: Sequence[int], opts: SamplerOptions) -> DiffusionResult:
    """Decode `opts.gen_length` tokens after `prompt` with the configured sampler and cache."""
    if not isinstance(denoiser, Denoiser):
        raise UsageError(
            f"a diffusion sampler needs a masked-diffusion denoiser, not a {type(denoiser).__name__}: "
            "compile a LLaDA- or Dream-style model (family diffusion_lm)"
        )
    if denoiser.mask_id is None:
        raise UsageError("the model has no mask token (mask_token_id): it cannot be sampled by diffusion")
    opts.check()
    if opts.cache not in CACHES:
        raise UsageError(f"cache '{opts.cache}' is unknown; allowed: {', '.join(CACHES)}")
    prompt = [int(t) for t in prompt]
    if not prompt:
        raise UsageError("a diffusion sampler needs a non-empty prompt")
    x = np.asarray(prompt + [denoiser.mask_id] * opts.gen_length, dtype=np.int64)
    dllm = (opts.prompt_interval, opts.response_interval, opts.transfer_ratio)
    view = ModelView(denoiser, opts.cache, opts.refresh_every, prompt_length=len(prompt), dllm=dllm)
    rng = np.random.default_rng(opts.seed)
    t0 = time.perf_counter()
    for b in range(opts.gen_length // opts.block_length):
        lo = len(prompt) + b * opts.block_length
        block = Block(x, lo, lo + opts.block_length, view, opts, rng, denoiser.eos_id)
        if block.masked().size:
            view.begin_block()
            FILL[opts.sampler](block)
    seconds = time.perf_counter() - t0
    stats = view.stats
    return DiffusionResult(x[len(prompt) :].tolist(), stats.calls, stats.tokens_fed, seconds, stats.padding_calls)
