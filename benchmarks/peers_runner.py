"""One row of benchmarks/peers.py, measured warm in a process of its own.

    python -m benchmarks.peers_runner SPEC.json
    python -m benchmarks.peers_runner --quantize SOURCE.gguf OUT.gguf F32|Q8_0

Run from the repository root by the peers benchmark, with the peers' venv python (llama.cpp, ORT
GenAI) or accelc's (accelc rows). SPEC names the runtime, its model, the threads, the prompts and perplexity windows as token
ids (tokenised once by the benchmark with the Hugging Face tokenizer, so every runtime sees the same
ids and ORT GenAI's tokenizer, which mis-reads SmolLM2's byte-level BPE, is never used). The last
stdout line is the JSON result: per prompt the time to first token and decode tokens/s, the tokens,
the peak RSS, and the perplexity windows' summed NLL.

The module imports neither accelc nor the peers at the top, so it runs in either environment; the
NLL is computed here, with the protocol of accelc.compiler.evaluation (row i predicts token i + 1,
the last n tokens of each window scored, float64 log-softmax), for every runtime alike.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

WARMUP_TOKENS = 8  # first-call allocations and lazy initialisation out of the timing


def peak_rss_mb() -> float:
    """VmHWM: this process's peak resident memory (model load included)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def window_nll(logits: np.ndarray, window: list[int], scored: int) -> float:
    """Summed -log p of the last `scored` tokens of `window` given `logits` [len(window), V]."""
    rows = np.asarray(logits[len(window) - scored - 1 : len(window) - 1], dtype=np.float64)
    targets = np.asarray(window[len(window) - scored :])
    peak = rows.max(axis=1)
    lse = peak + np.log(np.exp(rows - peak[:, None]).sum(axis=1))
    return float((lse - rows[np.arange(len(targets)), targets]).sum())


class Greedy:
    """A runtime's greedy decoding as two timed halves: `first(prompt)` prefills and returns the
    first new token, `next(token)` feeds the last token and returns the following one; `logits(ids)` are
    the logits of every position of ids from an empty cache (perplexity)."""

    def first(self, prompt: list[int]) -> int:
        raise NotImplementedError

    def next(self, token: int) -> int:
        raise NotImplementedError

    def logits(self, ids: list[int]) -> np.ndarray:
        raise NotImplementedError


class LlamaCpp(Greedy):
    """llama-cpp-python on a GGUF: `eval` of the prompt, then one token at a time; the argmax of the
    last logits. Its ggml CPU backend is built with OpenMP (llama-cpp-python's default build), so its
    graph threads are OpenMP's and OMP_WAIT_POLICY decides whether they spin between tokens."""

    def __init__(self, spec: dict):
        import llama_cpp

        self.llama_cpp = llama_cpp
        self.common = dict(
            model_path=spec["model"],
            n_threads=spec["threads"],
            n_threads_batch=spec["threads"],
            n_batch=spec["context"],
            n_ubatch=spec["context"],
            verbose=False,
        )
        self.llm = llama_cpp.Llama(n_ctx=spec["context"], **self.common)
        self.scorer = None  # a second context with the logits of every position, made on first use

    def _argmax(self) -> int:
        last = self.llama_cpp.llama_get_logits_ith(self.llm._ctx.ctx, -1)
        return int(np.argmax(np.ctypeslib.as_array(last, shape=(self.llm.n_vocab(),))))

    def first(self, prompt):
        self.llm.reset()
        self.llm.eval(prompt)
        return self._argmax()

    def next(self, token):
        self.llm.eval([token])
        return self._argmax()

    def logits(self, ids):
        if self.scorer is None:
            self.scorer = self.llama_cpp.Llama(n_ctx=len(ids), logits_all=True, **self.common)
        self.scorer.reset()
        self.scorer.eval(ids)
        return np.array(self.scorer.scores[: len(ids)])


class OrtGenai(Greedy):
    """onnxruntime-genai on a folder made by its own model builder: `append_tokens` prefills, each
    `generate_next_token` picks a token from the last logits (and, after the first, runs the model
    on the previous token first). Threads are set through its config overlay."""

    def __init__(self, spec: dict):
        import onnxruntime_genai as og

        self.og = og
        config = og.Config(spec["model"])
        # its threads; 0.18's genai_config has no key for ORT's spinning, so its pool spins (ORT's default)
        session = {"intra_op_num_threads": spec["threads"]}
        config.overlay(json.dumps({"model": {"decoder": {"session_options": session}}}))
        self.model = og.Model(config)
        self.context = spec["context"]

    def _generator(self, length: int):
        params = self.og.GeneratorParams(self.model)
        # min_length = max_length: an end-of-text token does not stop it (every runtime decodes all tokens)
        params.set_search_options(max_length=length, min_length=length, do_sample=False)
        return self.og.Generator(self.model, params)

    def first(self, prompt):
        self.gen = self._generator(self.context)
        self.gen.append_tokens(np.asarray(prompt, dtype=np.int32))
        return self.next(None)

    def next(self, token):  # the generator holds the previous token itself
        self.gen.generate_next_token()
        return int(self.gen.get_next_tokens()[0])

    def logits(self, ids):
        gen = self._generator(len(ids) + 1)
        gen.append_tokens(np.asarray(ids, dtype=np.int32))
        out = np.asarray(gen.get_output("logits"))
        return out.reshape(-1, out.shape[-1])[-len(ids) :]


class Accelc(Greedy):
    """An accelc artifact on one backend through accelc's runtime (the StepModel a user's
    `accelc run` decodes with); `plan` times the artifact's decode plan (e.g. speculative) instead
    of plain greedy steps, as one call per prompt."""

    def __init__(self, spec: dict):
        from accelc.runtime.artifact import Artifact

        art = Artifact(spec["model"])
        self.plan = art.plan_for(spec["backend"]) if spec.get("plan") else None
        self.model, self.draft = art.decode_pair(spec["backend"])

    def first(self, prompt):
        self.logits_, self.state = self.model.prefill(np.asarray(prompt, dtype=np.int64))
        return int(np.argmax(self.logits_[-1]))

    def next(self, token):
        self.logits_, self.state = self.model.extend(self.state, np.asarray([token], dtype=np.int64))
        return int(np.argmax(self.logits_[-1]))

    def logits(self, ids):
        return np.asarray(self.model.prefill(np.asarray(ids, dtype=np.int64))[0])

    def run_plan(self, prompt: list[int], new_tokens: int) -> tuple[list[int], float, float]:
        from accelc.loops.plan import run_plan

        result = run_plan(self.plan, self.model, self.draft, prompt, new_tokens)
        return result.tokens, result.prefill_seconds, result.decode_seconds


RUNTIMES = {"llama.cpp": LlamaCpp, "ort-genai": OrtGenai, "accelc": Accelc}


def decode(runtime: Greedy, prompt: list[int], new_tokens: int) -> tuple[list[int], float, float]:
    """Greedy tokens, seconds to the first one (prefill), seconds for the rest."""
    if getattr(runtime, "plan", None) is not None:
        return runtime.run_plan(prompt, new_tokens)
    t0 = time.perf_counter()
    tokens = [runtime.first(prompt)]
    t1 = time.perf_counter()
    while len(tokens) < new_tokens:
        tokens.append(runtime.next(tokens[-1]))
    return tokens, t1 - t0, time.perf_counter() - t1


def measure(spec: dict) -> dict:
    t0 = time.perf_counter()
    runtime = RUNTIMES[spec["runtime"]](spec)
    load_s = time.perf_counter() - t0
    prompts, new_tokens = spec["prompts"], spec["new_tokens"]
    decode(runtime, prompts[0], WARMUP_TOKENS)
    ttft_ms, tok_s, tokens = [], [], []
    for prompt in prompts:
        out, first_s, rest_s = decode(runtime, prompt, new_tokens)
        ttft_ms.append(first_s * 1e3)
        tok_s.append((len(out) - 1) / rest_s)
        tokens.append(out)
    # peak memory of loading and decoding, before perplexity's long windows (llama.cpp's scorer is a second context)
    result = {"load_s": load_s, "ttft_ms": ttft_ms, "decode_tok_s": tok_s, "tokens": tokens, "rss_mb": peak_rss_mb()}
    if spec.get("windows"):
        result["nll"] = sum(window_nll(runtime.logits(w), w, n) for w, n in spec["windows"])
        result["scored"] = sum(n for _, n in spec["windows"])
    return result


def quantize(source: str, out: str, ftype: str) -> None:
    """llama.cpp's own quantize API (what its `llama-quantize` tool calls): `source` GGUF rewritten
    with every weight as `ftype` (F32: dequantised, exactly the shipped weights; Q8_0: 8-bit blocks)."""
    import ctypes

    import llama_cpp

    types = {"F32": llama_cpp.LLAMA_FTYPE_ALL_F32, "Q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0}
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = types[ftype]
    params.allow_requantize = True  # the shipped weights are already quantised (Q4_1)
    code = llama_cpp.llama_model_quantize(source.encode(), out.encode(), ctypes.byref(params))
    if code != 0:
        raise SystemExit(f"llama_model_quantize {source} -> {ftype} returned {code}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--quantize"]:
        quantize(*argv[1:4])
        return 0
    spec = json.loads(Path(argv[0]).read_text())
    print(json.dumps(measure(spec)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
