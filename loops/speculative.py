"""Speculative sampling (Leviathan et al. 2023; Chen et al. 2023) over two StepModels.

Each round the draft proposes gamma tokens autoregressively (gamma one-token draft calls), the
target scores all of them in ONE `extend` call (a StepModel returns logits for every fed
position) and the exact rule of Leviathan et al. (arXiv 2211.17192, algorithm 1) and Chen et al.
(arXiv 2302.01318, algorithm 2) keeps a prefix of them:

    accept the draft token x ~ q with probability min(1, p(x) / q(x))
    at the first rejection sample r = max(p - q, 0) / sum(max(p - q, 0)) and end the round
    if all gamma drafts are accepted, sample one bonus token from p at position gamma + 1

Every committed token is then distributed exactly as the target's p, where p and q are the
same `Sampler`'s distributions (temperature, top-k and top-p applied identically to both).
Rejected positions are rolled back on both models with `truncate`. At temperature 0 both are
one-hot argmaxes and the rule reads "accept while the draft token equals the target's argmax,
then take the target's argmax": the target's greedy output, token for token, for any draft.

As in `generate`, the first new token comes from the target's prefill logits, so prefill and
decode times compare with the autoregressive baseline's.

Randomness uses per-position streams (PEARL's code seeds per position too):
the uniform behind a decision at absolute position n comes from (seed, n, stream, index) alone.
A committed token depends only on its own position's streams and on earlier tokens, which keeps
the rule exact however rounds fall, and makes runs reproducible across algorithms and across
threaded / sequential schedules. The draft's token at n uses the DRAFT stream; a token the
target samples itself (first token, bonus) uses the same stream, so with draft == target
speculative, batch speculative and PEARL emit the same sequence for the same seed.

Statistics (GenerationResult.stats), shared by every method in this package:
    target_calls, draft_calls   model calls, prefill included
    drafted                     draft tokens proposed (batch speculative: every candidate's)
    verified                    positions where a draft token was checked against the target
    accepted                    draft tokens accepted
    rejections                  verified positions that ended in a residual sample
    expected_rejections         sum of TV(p, q) over verified positions (arXiv 2411.00841)
    acceptance_rate             accepted / verified: the empirical alpha of the cost model
    draft_efficiency            accepted / drafted
    mean_accepted_length        tokens committed per verification round (R6's
                                (1 - alpha^(gamma+1)) / (1 - alpha); the prefill token excluded)
    draft_catchup_calls         draft calls feeding several tokens (after a fully accepted round,
                                or rounds the draft sat out)
    lookup_rounds               rounds whose drafts were copied from the context (lookup.py)
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from accelc.errors import InternalError, UsageError
from accelc.loops.autoregressive import GenerationResult, Sampler
from accelc.loops.lookup import Lookup, lookup_draft
from accelc.runtime.base import KVState, StepModel

DEFAULT_GAMMA = 4  # drafts per round when no plan chose one; the cost model picks gamma in [1, 16]
RESIDUAL_FLOOR = 1e-12  # a residual with less mass is rounding noise of p == q: sample p itself

# Random streams of one position (see the module docstring).
STREAM_DRAFT, STREAM_ACCEPT, STREAM_RESIDUAL = 0, 1, 2
_MASK64 = (1 << 64) - 1


# --------------------------------------------------------------------------- randomness
def _splitmix64(z: int) -> int:
    z = (z + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def position_uniform(seed: int, position: int, stream: int, index: int = 0) -> float:
    """A uniform in [0, 1) fixed by (seed, absolute position, stream, index) and nothing else.

    SplitMix64 chained over the four keys: a counter-based generator, so no state is carried
    between rounds or threads (and it costs a microsecond, not a Generator construction).
    """
    z = _splitmix64(seed & _MASK64)
    z = _splitmix64(z ^ (position & _MASK64))
    z = _splitmix64(z ^ (stream & _MASK64))
    z = _splitmix64(z ^ (index & _MASK64))
    return (z >> 11) * (1.0 / (1 << 53))


def sample_index(p: np.ndarray, u: float) -> int:
    """Inverse-CDF draw from the nonnegative weights p (any positive total) with the uniform u."""
    c = np.cumsum(p)
    i = int(np.searchsorted(c, u * c[-1], side="right"))
    if i >= p.size:  # u * total rounded up to total: the last token with mass
        i = int(np.flatnonzero(p)[-1])
    return i


def own_sample(logits: np.ndarray, sampler: Sampler, seed: int, position: int) -> int:
    """A token the target picks itself (first token, bonus, or a step with no draft)."""
    if sampler.temperature == 0.0:
        return int(np.argmax(logits))
    return sample_index(sampler.probs(logits), position_uniform(seed, position, STREAM_DRAFT))


def verify_token(p: np.ndarray, q: np.ndarray, x: int, u_accept: float, u_residual: float) -> tuple[bool, int]:
    """The exact rule at one position: (True, x) keeps the draft x ~ q, else (False, a residual sample).

    Accept with probability min(1, p(x)/q(x)), written u * q(x) < p(x) so p >= q always accepts.
    """
    if u_accept * q[x] < p[x]:
        return True, x
    r = np.maximum(p - q, 0.0)
    if r.sum() <= RESIDUAL_FLOOR:
        r = p
    return False, sample_index(r, u_residual)


def tv_distance(p: np.ndarray, q: np.ndarray) -> float:
    """TV(p, q) = 1/2 sum |p - q| = 1 - sum min(p, q)."""
    return 0.5 * float(np.abs(p - q).sum())


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


# --------------------------------------------------------------------------- statistics
@dataclass
class SpecStats:
    rounds: int = 0
    drafted: int = 0
    verified: int = 0
    accepted: int = 0
    rejections: int = 0
    expected_rejections: float = 0.0
    round_tokens: int = 0  # tokens committed by verification rounds (the prefill token excluded)
    lookup_rounds: int = 0  # rounds whose drafts were copied from the context (lookup.py)

    def record(self, p: np.ndarray | None, q: np.ndarray | None, accepted: bool, *, greedy_tv: float = 0.0) -> None:
        """One verified position: a draft checked against the target."""
        self.verified += 1
        self.expected_rejections += greedy_tv if p is None else tv_distance(p, q)
        if accepted:
            self.accepted += 1
        else:
            self.rejections += 1

    def as_dict(self, target: ModelCursor, draft: ModelCursor, **extra) -> dict:
        return {
            "target_calls": target.calls,
            "draft_calls": draft.calls,
            "target_tokens_fed": target.tokens_fed,
            "draft_tokens_fed": draft.tokens_fed,
            "draft_catchup_calls": draft.multi_token_calls,
            "lookup_rounds": self.lookup_rounds,
            "rounds": self.rounds,
            "drafted": self.drafted,
            "verified": self.verified,
            "accepted": self.accepted,
            "rejections": self.rejections,
            "expected_rejections": self.expected_rejections,
            "acceptance_rate": self.accepted / self.verified if self.verified else 0.0,
            "draft_efficiency": self.accepted / self.drafted if self.drafted else 0.0,
            "mean_accepted_length": self.round_tokens / self.rounds if self.rounds else 0.0,
            **extra,
        }


def verify_chain(
    rows: np.ndarray,
    drafts: Sequence[int],
    qs: Sequence[np.ndarray | None],
    sampler: Sampler,
    seed: int,
    start: int,
    stats: SpecStats,
) -> tuple[int, int | None]:
    """Check drafts[i] (at position start + i) against rows[i] in turn.

    Returns (j, t): j drafts accepted, then t = the residual (or, greedy, the target's argmax)
    at the first rejection, or None when all were accepted.
    """
    greedy = sampler.temperature == 0.0
    for i, x in enumerate(drafts):
        if greedy:
            choice = int(np.argmax(rows[i]))
            ok = choice == x
            stats.record(None, None, ok, greedy_tv=0.0 if ok else 1.0)
            if not ok:
                return i, choice
        else:
            p = sampler.probs(rows[i])
            pos = start + i
            ok, t = verify_token(
                p, qs[i], x, position_uniform(seed, pos, STREAM_ACCEPT), position_uniform(seed, pos, STREAM_RESIDUAL)
            )
            stats.record(p, qs[i], ok)
            if not ok:
                return i, t
    return len(drafts), None


# --------------------------------------------------------------------------- the loop
def speculative_generate(
    target: StepModel,
    draft: StepModel,
    prompt: Sequence[int],
    max_new_tokens: int,
    *,
    gamma: int = DEFAULT_GAMMA,
    sampler: Sampler = Sampler(),
    eos_ids: Sequence[int] = (),
    seed: int = 0,
    prompt_kv_from_target: bool = False,
    lookup: Lookup | None = None,
) -> GenerationResult:
    """Speculative sampling with `gamma` drafts per round; greedy when sampler.temperature == 0.
    prompt_kv_from_target: see open_pair. lookup: rounds copy their drafts from the context where
    it has a match (lookup.py), and ask the draft model elsewhere."""
    check_args(prompt, max_new_tokens, gamma=gamma)
    t0 = time.perf_counter()
    n_prompt = len(prompt)
    tgt, dft, tokens, done = begin(
        target,
        draft,
        prompt,
        max_new_tokens,
        eos_ids,
        lambda logits: own_sample(logits, sampler, seed, n_prompt),
        prompt_kv_from_target,
    )
    t1 = time.perf_counter()
    stats = SpecStats()
    while not done:
        n = len(tokens)
        budget = max_new_tokens - (n - n_prompt) - 1  # never draft past the token budget
        # 1. draft g tokens (positions n .. n+g-1): copied from the context, or gamma from the model
        drafts, qs, copied = propose(dft, tokens, min(gamma, budget), sampler, seed, lookup, budget)
        g = len(drafts)
        stats.lookup_rounds += copied
        # 2. one target call: rows [g+1, V] predict positions n .. n+g
        rows = tgt.logits_from(tokens + drafts, start=n)
        # 3. accept a prefix, then a residual sample or the bonus token
        j, t = verify_chain(rows, drafts, qs, sampler, seed, n, stats)
        if t is None:
            t = own_sample(rows[g], sampler, seed, n + g)
        # 4. roll back what was rejected: both models keep tokens + drafts[:j]
        tgt.rollback(n + j)
        dft.rollback(n + j)
        stats.rounds += 1
        stats.drafted += g
        before = len(tokens)
        done = commit(tokens, drafts[:j] + [t], n_prompt, max_new_tokens, eos_ids)
        stats.round_tokens += len(tokens) - before
    t2 = time.perf_counter()
    return GenerationResult(
        tokens[n_prompt:],
        t1 - t0,
        t2 - t1,
        stats.as_dict(tgt, dft, method="speculative", gamma=gamma, lookup=lookup.to_dict() if lookup else None),
    )
