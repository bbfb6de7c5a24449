"""A round's moving parts over two StepModels: the model cursor (a model, its KV state, the tokens
it holds and its call accounting), opening a target/draft pair, drafting (from the draft model or
copied from the context), and committing tokens under the budget."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from accelc.errors import InternalError, UsageError
from accelc.loops.acceptance import STREAM_DRAFT, position_uniform, sample_index
from accelc.loops.autoregressive import Sampler
from accelc.loops.lookup import Lookup, lookup_draft
from accelc.runtime.base import KVState, StepModel


# --------------------------------------------------------------------------- checks
def check_args(prompt: Sequence[int], max_new_tokens: int, **lengths: int) -> None:
    if len(prompt) == 0:
        raise UsageError("the prompt has no tokens")
    if max_new_tokens < 1:
        raise UsageError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    for name, value in lengths.items():
        if int(value) != value or value < 1:
            raise UsageError(f"{name} must be a positive integer, got {value!r}")


def check_pair(
    target: StepModel, draft: StepModel, target_vocab: int | None = None, draft_vocab: int | None = None
) -> None:
    """A draft must score the target's vocabulary: same tokenizer, same number of logits."""
    tv = target_vocab if target_vocab is not None else getattr(target, "vocab_size", None)
    dv = draft_vocab if draft_vocab is not None else getattr(draft, "vocab_size", None)
    if tv is not None and dv is not None and int(tv) != int(dv):
        raise UsageError(
            f"the draft model '{getattr(draft, 'name', 'draft')}' has a vocabulary of {int(dv)} tokens but the "
            f"target '{getattr(target, 'name', 'target')}' has {int(tv)}: speculative decoding needs a draft "
            "that shares the target's tokenizer and vocabulary"
        )


# --------------------------------------------------------------------------- model cursor
class ModelCursor:
    """A StepModel with its KV state, the tokens that state holds, and call accounting.

    `next_logits` is the row that predicts position `state.length`, known right after an
    extend and dropped by a truncation (the next call then re-feeds one token, in the same call).
    """

    def __init__(self, model: StepModel, prompt: Sequence[int], state: KVState | None = None):
        """Prefill `model` on `prompt`, or adopt `state` (which holds the prompt) without a call."""
        self.model = model
        self.calls = 0
        self.tokens_fed = 0
        self.multi_token_calls = 0  # calls after the first that fed more than one token (a draft's catch-ups)
        self.fed: list[int] = list(prompt)
        if state is None:
            logits, self.state = self._extend_call(None, list(prompt))
            self.next_logits: np.ndarray | None = logits[-1]
            self.vocab = int(logits.shape[-1])  # what the model really scores (vocab_size may be unset)
        else:  # nothing was scored: the first call after the prompt needs no prompt row
            self.state, self.next_logits, self.vocab = state, None, int(model.vocab_size)

    def _extend_call(self, state: KVState | None, ids: list[int]) -> tuple[np.ndarray, KVState]:
        arr = np.asarray(ids, dtype=np.int64)
        logits, new = self.model.prefill(arr) if state is None else self.model.extend(state, arr)
        self.multi_token_calls += self.calls > 0 and len(ids) > 1
        self.calls += 1
        self.tokens_fed += len(ids)
        return logits, new

    def extend(self, state: KVState, ids: Sequence[int]) -> tuple[np.ndarray, KVState]:
        """A counted extend from any state (the cursor's own state is left alone)."""
        return self._extend_call(state, list(ids))

    def truncate(self, state: KVState, n: int) -> KVState:
        return self.model.truncate(state, n)

    def logits_from(self, seq: Sequence[int], start: int) -> np.ndarray:
        """Rows predicting positions start..len(seq) of `seq` ([len(seq) - start + 1, V]).

        Feeds only what the state lacks, in at most one extend call. The state must hold a
        prefix of `seq` (callers roll back rejected positions first).
        """
        n_have = self.state.length
        m = min(n_have, len(seq))
        if self.fed[:m] != list(seq[:m]):
            raise InternalError("KV state out of step with the sequence: a rollback is missing")
        if n_have > start or (n_have == start and self.next_logits is None):
            self.rollback(start - 1)
            n_have = start - 1
        parts = []
        if n_have == start:
            parts.append(self.next_logits[None])
        if n_have < len(seq):
            rows, self.state = self._extend_call(self.state, list(seq[n_have:]))
            self.fed = list(seq)
            self.next_logits = rows[-1]
            parts.append(rows[start - n_have - 1 :] if n_have < start else rows)
        return np.concatenate(parts) if len(parts) > 1 else parts[0]

    def rollback(self, n: int) -> None:
        """Keep only the first n positions (rejected drafts go) with `truncate`."""
        if self.state.length > n:
            self.state = self.model.truncate(self.state, n)
            self.fed = self.fed[:n]
            self.next_logits = None

    def reset(self, state: KVState, fed: Sequence[int], next_logits: np.ndarray | None) -> None:
        """Adopt a state computed elsewhere (a tree branch, a staircase row)."""
        self.state, self.fed, self.next_logits = state, list(fed[: state.length]), next_logits


def open_pair(
    target: StepModel, draft: StepModel, prompt: Sequence[int], prompt_kv_from_target: bool = False
) -> tuple[ModelCursor, ModelCursor]:
    """Prefill both models on the prompt and check they score the same vocabulary.

    prompt_kv_from_target: the draft starts from a copy of the target's prompt cache instead of
    its own prefill. Only for drafts made from the target's own weights (compressed copies):
    their keys and values mean the same, and a long prompt then costs one prefill, not two.
    Exactness does not depend on it: acceptance uses whatever q the draft then computes."""
    check_pair(target, draft)
    tgt = ModelCursor(target, prompt)
    # a draft whose vocabulary size is not known before its first call keeps its own prefill
    adopt = prompt_kv_from_target and getattr(draft, "vocab_size", None) is not None
    adopted = draft.state_from_kv(target.kv_numpy(tgt.state)) if adopt else None
    dft = ModelCursor(draft, prompt, adopted)
    check_pair(target, draft, tgt.vocab, dft.vocab)
    return tgt, dft


def begin(
    target: StepModel,
    draft: StepModel,
    prompt: Sequence[int],
    max_new_tokens: int,
    eos_ids,
    first_token,
    prompt_kv_from_target: bool = False,
) -> tuple[ModelCursor, ModelCursor, list[int], bool]:
    """Every draft-then-verify loop starts alike: prefill both models (see open_pair) and commit
    the target's own first token, `first_token(logits)`. Returns the cursors, the committed
    tokens and whether generation is already done (eos or a budget of one)."""
    tgt, dft = open_pair(target, draft, prompt, prompt_kv_from_target)
    tokens = list(prompt)
    done = commit(tokens, [first_token(tgt.next_logits)], len(prompt), max_new_tokens, eos_ids)
    return tgt, dft, tokens, done


def draft_tokens(
    cursor: ModelCursor, context: Sequence[int], count: int, sampler: Sampler, seed: int, index: int = 0
) -> tuple[list[int], list[np.ndarray | None]]:
    """`count` tokens drafted after `context`, one draft call each; their q (None when greedy)."""
    greedy = sampler.temperature == 0.0
    seq = list(context)
    drafts: list[int] = []
    qs: list[np.ndarray | None] = []
    for _ in range(count):
        row = cursor.logits_from(seq, len(seq))[-1]
        if greedy:
            x, q = int(np.argmax(row)), None
        else:
            q = sampler.probs(row)
            x = sample_index(q, position_uniform(seed, len(seq), STREAM_DRAFT, index))
        drafts.append(x)
        qs.append(q)
        seq.append(x)
    return drafts, qs


def copied_drafts(
    context: Sequence[int], lookup: Lookup | None, limit: int | None, sampler: Sampler, vocab: int
) -> tuple[list[int], list[np.ndarray | None]]:
    """Drafts copied from the context (lookup.py; [] without a match or a lookup), each with the
    one-hot q of a deterministic draft (None when greedy)."""
    copied = lookup_draft(context, lookup, limit) if lookup is not None else []
    if sampler.temperature == 0.0:
        return copied, [None] * len(copied)
    qs = []
    for x in copied:
        q = np.zeros(vocab)
        q[x] = 1.0
        qs.append(q)
    return copied, qs


def propose(
    cursor: ModelCursor,
    context: Sequence[int],
    count: int,
    sampler: Sampler,
    seed: int,
    lookup: Lookup | None = None,
    limit: int | None = None,
) -> tuple[list[int], list[np.ndarray | None], bool]:
    """A round's drafts after `context`: copied from the context when `lookup` finds a match (at
    most `limit` tokens, copied_drafts), else `count` tokens from the draft model (draft_tokens).
    The flag says whether they were copied."""
    copied, qs = copied_drafts(context, lookup, limit, sampler, cursor.vocab)
    if not copied:
        return (*draft_tokens(cursor, context, count, sampler, seed), False)
    return copied, qs, True


def commit(tokens: list[int], new: Sequence[int], n_prompt: int, max_new_tokens: int, eos_ids: Sequence[int]) -> bool:
    """Append `new`, stopping after an eos or at the token budget; True when generation is over."""
    for t in new:
        tokens.append(int(t))
        if t in eos_ids or len(tokens) - n_prompt >= max_new_tokens:
            return True
    return False
