"""Parity of lowered backends against the source torch model.

For each fixed prompt: the prefill logits, the logits of `decode_steps` teacher-forced single
token steps, and the final KV tensors are compared with the torch model (max abs diff per
output); then `greedy_tokens` greedy tokens must equal transformers' own `generate` token for
token. The torch StepModel itself is checked against `generate` too, so the decoding loop that
every backend shares is validated, not assumed.
"""

from __future__ import annotations

import numpy as np

from accelc import progress
from accelc.loops.autoregressive import generate


def _eos_ids(model) -> tuple[int, ...]:
    eos = model.generation_config.eos_token_id
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, (list, tuple)) else (int(eos),)


def reference_greedy(model, prompt_ids: list[int], n: int) -> list[int]:
    """transformers' own greedy generate: the ground truth the artifact must reproduce."""
    import torch

    with torch.inference_mode():
        out = model.generate(
            torch.tensor([prompt_ids]),
            attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
            max_new_tokens=n,
            do_sample=False,
            num_beams=1,
            temperature=None,
            top_p=None,
            top_k=None,
            pad_token_id=_eos_ids(model)[0] if _eos_ids(model) else 0,
        )
    return out[0, len(prompt_ids) :].tolist()


def _teacher_forced(step_model, prompt_ids, forced):
    logits, state = step_model.prefill(np.asarray(prompt_ids, dtype=np.int64))
    decode = []
    for tok in forced:
        out, state = step_model.extend(state, np.asarray([tok], dtype=np.int64))
        decode.append(out)
    return logits, (np.concatenate(decode) if decode else None), step_model.kv_numpy(state)


def _max_diff(a, b) -> float:
    return (
        float(np.max(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64))))
        if a is not None
        else 0.0
    )


def validate(torch_model, tokenizer, backends: dict, spec) -> dict:
    """Compare every backend in `backends` (name -> StepModel) with `torch_model`. Returns the report."""
    from accelc.runtime.torch_backend import TorchStepModel

    reference = TorchStepModel(torch_model)
    eos = _eos_ids(torch_model)
    cases = []
    for prompt in spec.prompts:
        ids = list(tokenizer(prompt)["input_ids"])
        with progress.step(f"validate: reference for {prompt!r}"):
            expected = reference_greedy(torch_model, ids, spec.greedy_tokens) if spec.greedy_tokens else []
            forced = (expected or [0])[: spec.decode_steps] if spec.decode_steps else []
            ref_prefill, ref_decode, ref_kv = _teacher_forced(reference, ids, forced)
        case = {"prompt": prompt, "prompt_tokens": len(ids), "expected_tokens": expected, "backends": {}}
        loop = TorchStepModel(torch_model)
        candidates = {"torch": loop, **backends}
        for name, model in candidates.items():
            with progress.step(f"validate: {name} on {prompt!r}"):
                row = {}
                if name != "torch":
                    prefill, decode, kv = _teacher_forced(model, ids, forced)
                    row["max_abs_diff"] = {
                        "prefill_logits": _max_diff(prefill, ref_prefill),
                        "decode_logits": _max_diff(decode, ref_decode),
                        "present_kv": max((_max_diff(a, b) for a, b in zip(kv, ref_kv)), default=0.0),
                    }
                    row["parity_ok"] = all(v <= spec.atol for v in row["max_abs_diff"].values())
                if spec.greedy_tokens:
                    got = generate(model, ids, spec.greedy_tokens, eos_ids=eos).tokens
                    first_mismatch = next(
                        (i for i, (a, b) in enumerate(zip(got, expected)) if a != b),
                        None if len(got) == len(expected) else min(len(got), len(expected)),
                    )
                    row.update(greedy_tokens=got, greedy_match=first_mismatch is None, first_mismatch=first_mismatch)
                case["backends"][name] = row
        cases.append(case)
    verdicts = {}
    for name in ["torch", *backends]:
        rows = [c["backends"][name] for c in cases]
        ok = all(r.get("parity_ok", True) and r.get("greedy_match", True) for r in rows)
        worst = {}
        for r in rows:
            for k, v in r.get("max_abs_diff", {}).items():
                worst[k] = max(worst.get(k, 0.0), v)
        verdicts[name] = {"verdict": "pass" if ok else "fail", "max_abs_diff": worst}
    return {
        "atol": spec.atol,
        "decode_steps": spec.decode_steps,
        "greedy_tokens": spec.greedy_tokens,
        "reference": "source torch model (fp32 eager) and transformers.generate(do_sample=False)",
        "verdict": "pass" if all(v["verdict"] == "pass" for v in verdicts.values()) else "fail",
        "backends": verdicts,
        "cases": cases,
    }


def validate_plan(art, cases: list[dict], eos: tuple[int, ...]) -> dict:
    """A rewritten generation loop must give the same greedy tokens as the target alone, on every
    backend: run the artifact's decode plan at temperature 0 on each validation prompt."""
    from accelc.loops.autoregressive import Sampler
    from accelc.loops.plan import run_plan

    rows = {}
    for backend in art.backends():
        plan = art.plan_for(backend)  # plain decoding where the backend holds no draft
        target, draft = art.decode_pair(backend)
        checks = []
        for case in cases:
            ids = list(art.tokenizer(case["prompt"])["input_ids"])
            with progress.step(f"validate: decode plan '{plan.strategy}' on {backend}"):
                got = run_plan(plan, target, draft, ids, len(case["expected_tokens"]), eos_ids=eos, sampler=Sampler())
            checks.append(
                {
                    "prompt": case["prompt"],
                    "tokens": got.tokens,
                    "match": got.tokens == case["expected_tokens"],
                    "stats": got.stats,
                }
            )
        rows[backend] = {
            "verdict": "pass" if all(c["match"] for c in checks) else "fail",
            "strategy": plan.strategy,
            **({"reason": plan.reason} if plan.planned_strategy is not None else {}),
            "cases": checks,
        }
    return {
        "strategy": art.plan.strategy,
        "check": "greedy tokens equal transformers.generate",
        "verdict": "pass" if all(r["verdict"] == "pass" for r in rows.values()) else "fail",
        "backends": rows,
    }


# ------------------------------------------------------------------ ONNX input (lowering only)

ONNX_DYNAMIC_DIM = 4  # size given to symbolic dimensions when making parity inputs
ONNX_PARITY_SEEDS = 3


def _random_feed(session, rng) -> dict:
    """Seeded inputs matching the graph's declared inputs (symbolic dims set to a small size)."""
    feed = {}
    for inp in session.get_inputs():
        shape = [d if isinstance(d, int) and d > 0 else ONNX_DYNAMIC_DIM for d in inp.shape]
        if "int" in inp.type:
            feed[inp.name] = rng.integers(0, 2, size=shape).astype(np.int64 if "int64" in inp.type else np.int32)
        elif "bool" in inp.type:
            feed[inp.name] = rng.integers(0, 2, size=shape).astype(bool)
        else:
            dtype = np.float16 if "float16" in inp.type else np.float32
            feed[inp.name] = rng.standard_normal(shape).astype(dtype)
    return feed


def validate_onnx(graph, session_cfg: dict, spec) -> dict:
    """An ONNX input has no torch source: the lowered session (its optimisation level and
    threads) is compared with the graph run unoptimised on one thread, on seeded inputs."""
    import onnxruntime as ort

    from accelc.runtime.ort_backend import session_options

    lowered = ort.InferenceSession(
        str(graph), sess_options=session_options(session_cfg), providers=["CPUExecutionProvider"]
    )
    reference = ort.InferenceSession(
        str(graph),
        sess_options=session_options({"graph_optimization_level": "disable", "intra_op_threads": 1}),
        providers=["CPUExecutionProvider"],
    )
    worst: dict[str, float] = {}
    for seed in range(ONNX_PARITY_SEEDS):
        feed = _random_feed(reference, np.random.default_rng(seed))
        names = [o.name for o in reference.get_outputs()]
        for name, a, b in zip(names, lowered.run(names, feed), reference.run(names, feed)):
            worst[name] = max(worst.get(name, 0.0), _max_diff(a, b))
    ok = all(v <= spec.atol for v in worst.values())
    return {
        "atol": spec.atol,
        "reference": "the input graph in ONNX Runtime, optimisations off, 1 thread",
        "inputs": f"{ONNX_PARITY_SEEDS} seeded random feeds, symbolic dims = {ONNX_DYNAMIC_DIM}",
        "verdict": "pass" if ok else "fail",
        "backends": {"ort": {"verdict": "pass" if ok else "fail", "max_abs_diff": worst}},
    }
