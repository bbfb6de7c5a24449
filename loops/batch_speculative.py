"""Batch (multi-draft) speculative sampling: k draft candidates per round, verified exactly.

Scheme (Yin et al., arXiv 2411.00841, batch speculative decoding; the multi-step speculative
sampling of SpecInfer, Miao et al., arXiv 2305.09781, i.e. recursive rejection sampling over
the candidates' token tree):

1. Draft k candidate sequences of length gamma, independently, from the same prefix:
   candidate j at depth i is drawn from q(. | prefix, c_j[:i]) with its own uniform, so the
   candidates are i.i.d. draws of the draft's gamma-token continuation. Candidates that share
   a prefix share draft calls (a trie of draft states).
2. Walk the tree from the root. At depth i the live candidates are those whose first i tokens
   equal the accepted path; their tokens at depth i are i.i.d. q(. | path) given everything
   decided so far. With r_1 = p(. | path), try them in index order:
       accept y_m with probability min(1, r_m(y_m) / q(y_m));
       on rejection r_{m+1} = normalise(max(r_m - q, 0)).
   The first acceptance extends the path; if every live candidate is rejected, sample from
   r_{M+1} and end the round. If the path reaches depth gamma, sample a bonus token from p.
   Each step is the SD rule aimed at the current residual, so the committed token is
   distributed exactly as p, and P(all M rejected) = prod_m TV(r_m, q).
3. At temperature 0 the candidates would all be the draft's argmax; instead candidate j
   starts with the draft's j-th most likely token and continues greedily, and a depth accepts
   the live candidate whose token is the target's argmax: the target's greedy output exactly.

Target calls, honestly: a StepModel is batch-1 and causal, so the k candidates cannot share
one call (that needs a tree attention mask or batch > 1). The target scores candidate 0's whole
path in one `extend`; when the accepted path leaves every scored path, one more `extend` from
the shared KV prefix (states are values: truncate a scored path's state to the branch point)
scores the new branch's suffix. So a round costs 1 to k target calls, only as many as the
accepted path needs, and `target_calls` counts them all.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from accelc.loops import registry
from accelc.loops.acceptance import (
    RESIDUAL_FLOOR,
    STREAM_ACCEPT,
    STREAM_DRAFT,
    STREAM_RESIDUAL,
    SpecStats,
    own_sample,
    position_uniform,
    sample_index,
    tv_distance,
)
from accelc.loops.autoregressive import GenerationResult, Sampler
from accelc.loops.cursor import ModelCursor, begin, check_args, commit
from accelc.loops.pricing import Measured, Pricing
from accelc.loops.replay import GammaChoice, choose_batch_gamma
from accelc.loops.speculative import DEFAULT_GAMMA
from accelc.runtime.base import KVState, StepModel

DEFAULT_CANDIDATES = 3  # k: P(all rejected) falls as prod TV(r_m, q) with diminishing returns (R4)


def recursive_rejection(
    p: np.ndarray, q: np.ndarray, candidates: Sequence[int], u_accept: Sequence[float], u_residual: float
) -> tuple[int, int]:
    """One position of multi-draft verification (R4) with i.i.d. candidates y_m ~ q.

    Returns (token, m): m is the index of the accepted candidate, or -1 when every candidate
    was rejected and the token is a sample of the final residual.
    """
    r = p
    for m, y in enumerate(candidates):
        if u_accept[m] * q[y] < r[y]:
            return int(y), m
        r = _next_residual(r, q)
    return sample_index(r, u_residual), -1


def all_rejected_probability(p: np.ndarray, q: np.ndarray, num_candidates: int) -> float:
    """P(all M candidates rejected) = prod_m TV(r_m, q); the residuals do not depend on the draws."""
    r, prob = p, 1.0
    for _ in range(num_candidates):
        prob *= tv_distance(r, q)
        r = _next_residual(r, q)
    return prob


def _next_residual(r: np.ndarray, q: np.ndarray) -> np.ndarray:
    nxt = np.maximum(r - q, 0.0)
    s = nxt.sum()
    # no mass left means r == q up to rounding and a rejection was rounding noise: keep r
    return nxt / s if s > RESIDUAL_FLOOR else r


class _DraftTree:
    """Draft states and next-token logits per candidate prefix (tuple of drafted tokens)."""

    def __init__(self, cursor: ModelCursor, tokens: list[int], sampler: Sampler):
        self.cursor, self.sampler = cursor, sampler
        row = cursor.logits_from(tokens, len(tokens))[-1]
        self.nodes: dict[tuple[int, ...], tuple[KVState, np.ndarray]] = {(): (cursor.state, row)}
        self._q: dict[tuple[int, ...], np.ndarray] = {}

    def row(self, prefix: tuple[int, ...]) -> np.ndarray:
        if prefix not in self.nodes:
            state, _ = self.nodes[prefix[:-1]]
            logits, new = self.cursor.extend(state, prefix[-1:])
            self.nodes[prefix] = (new, logits[-1])
        return self.nodes[prefix][1]

    def q(self, prefix: tuple[int, ...]) -> np.ndarray:
        """The draft's sampling distribution after `prefix` (computed once per node)."""
        if prefix not in self._q:
            self._q[prefix] = self.sampler.probs(self.row(prefix))
        return self._q[prefix]


class _TargetTree:
    """Target logits per path prefix, scored lazily one candidate path per extend call."""

    def __init__(self, cursor: ModelCursor, tokens: list[int], first: list[int]):
        self.cursor, self.tokens = cursor, tokens
        n = len(tokens)
        rows = cursor.logits_from(tokens + first, start=n)  # [len(first)+1, V]: depths 0..len(first)
        self.paths: list[tuple[tuple[int, ...], KVState]] = [(tuple(first), cursor.state)]
        self.rows = {tuple(first[:i]): (rows[i], 0) for i in range(len(first) + 1)}

    def row(self, prefix: tuple[int, ...], path: tuple[int, ...]) -> np.ndarray:
        """p at `prefix`; when unscored, score the candidate `path` (which extends it) from the branch point."""
        if prefix not in self.rows:
            depth = len(prefix) - 1  # the parent is scored, so some scored path shares depth tokens
            owner = next(i for i, (pth, _) in enumerate(self.paths) if pth[:depth] == prefix[:depth])
            n = len(self.tokens)
            base = self.cursor.truncate(self.paths[owner][1], n + depth)
            logits, state = self.cursor.extend(base, path[depth:])
            self.paths.append((path, state))
            for i in range(depth + 1, len(path) + 1):
                self.rows.setdefault(path[:i], (logits[i - depth - 1], len(self.paths) - 1))
        return self.rows[prefix][0]

    def adopt(self, prefix: tuple[int, ...]) -> None:
        """Leave the cursor holding tokens + prefix, with the row that predicts what follows."""
        row, owner = self.rows[prefix]
        n = len(self.tokens)
        state = self.cursor.truncate(self.paths[owner][1], n + len(prefix))
        self.cursor.reset(state, self.tokens + list(prefix), row)


def batch_speculative_generate(
    target: StepModel,
    draft: StepModel,
    prompt: Sequence[int],
    max_new_tokens: int,
    *,
    gamma: int = DEFAULT_GAMMA,
    num_candidates: int = DEFAULT_CANDIDATES,
    sampler: Sampler = Sampler(),
    eos_ids: Sequence[int] = (),
    seed: int = 0,
    prompt_kv_from_target: bool = False,
) -> GenerationResult:
    """Multi-draft speculative sampling with `num_candidates` draft sequences of length `gamma`;
    prompt_kv_from_target: see speculative.open_pair."""
    check_args(prompt, max_new_tokens, gamma=gamma, num_candidates=num_candidates)
    greedy = sampler.temperature == 0.0
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
    attempts = 0
    k = min(num_candidates, tgt.vocab)
    while not done:
        n = len(tokens)
        g = min(gamma, max_new_tokens - (n - n_prompt) - 1)
        # 1. draft k candidates of length g (a trie: shared prefixes share draft calls)
        tree = _DraftTree(dft, tokens, sampler)
        top = np.argsort(-tree.row(()), kind="stable")[:k] if greedy else None  # greedy first tokens
        cands: list[tuple[int, ...]] = []
        for j in range(k if g > 0 else 0):
            c: tuple[int, ...] = ()
            for i in range(g):
                if greedy:
                    x = int(top[j]) if i == 0 else int(np.argmax(tree.row(c)))
                else:
                    x = sample_index(tree.q(c), position_uniform(seed, n + i, STREAM_DRAFT, j))
                c = c + (x,)
            cands.append(c)
        stats.drafted += g * len(cands)
        # 2. walk the tree with recursive rejection sampling; the target scores paths lazily
        ttree = _TargetTree(tgt, tokens, list(cands[0]) if cands else [])
        path: tuple[int, ...] = ()
        live = list(range(len(cands)))
        t = None
        for i in range(g):
            p_row = ttree.row(path, cands[live[0]])
            ys = [cands[m][i] for m in live]
            stats.verified += 1
            if greedy:
                choice = int(np.argmax(p_row))
                hit = ys.index(choice) if choice in ys else -1
                attempts += len(ys) if hit < 0 else hit + 1
                tv = 0.0 if hit >= 0 else 1.0
                tok = choice
            else:
                p, q = sampler.probs(p_row), tree.q(path)
                u = [position_uniform(seed, n + i, STREAM_ACCEPT, a) for a in range(len(ys))]
                tok, hit = recursive_rejection(p, q, ys, u, position_uniform(seed, n + i, STREAM_RESIDUAL))
                attempts += len(ys) if hit < 0 else hit + 1
                tv = all_rejected_probability(p, q, len(ys))
            stats.expected_rejections += tv  # P(every live candidate rejected) here
            if hit < 0:
                stats.rejections += 1
                t = tok
                break
            stats.accepted += 1
            path = path + (tok,)
            live = [m for m in live if cands[m][i] == tok]
        if t is None:  # every depth accepted (or g == 0): the target's own token after the path
            t = own_sample(ttree.row(path, cands[live[0]] if live else path), sampler, seed, n + len(path))
        # 3. keep the accepted path's KV on both models (the rest of the tree is dropped)
        ttree.adopt(path)
        d_prefix = path[: max(g - 1, 0)] if len(path) == g else path
        d_state, d_row = tree.nodes[d_prefix]
        dft.reset(d_state, tokens + list(d_prefix), d_row)
        stats.rounds += 1
        before = len(tokens)
        done = commit(tokens, list(path) + [t], n_prompt, max_new_tokens, eos_ids)
        stats.round_tokens += len(tokens) - before
    t2 = time.perf_counter()
    return GenerationResult(
        tokens[n_prompt:],
        t1 - t0,
        t2 - t1,
        stats.as_dict(tgt, dft, method="batch_speculative", gamma=gamma, num_candidates=k, candidate_attempts=attempts),
    )


@dataclass(frozen=True)
class BatchOptions:
    gamma: int = DEFAULT_GAMMA
    num_candidates: int = 2
    prompt_kv_from_target: bool = False

    @classmethod
    def from_plan(cls, plan) -> BatchOptions:
        return cls(plan.gamma, plan.num_candidates, plan.prompt_kv_from_target)


def _generate(target, draft, prompt, max_new_tokens, options: BatchOptions, *, sampler, eos_ids, seed):
    return batch_speculative_generate(
        target,
        draft,
        prompt,
        max_new_tokens,
        gamma=options.gamma,
        sampler=sampler,
        num_candidates=options.num_candidates,
        eos_ids=eos_ids,
        seed=seed,
        prompt_kv_from_target=options.prompt_kv_from_target,
    )


def _choose(measured: Measured, gamma_max: int, lookups) -> GammaChoice:
    """Replayed with the k candidates' acceptance at each round's first position."""
    return choose_batch_gamma(
        measured.alpha.alpha,
        measured.cost.cost_ratio,
        measured.candidates,
        gamma_max=gamma_max,
        verify_cost=measured.cost.verify,
        trajectories=measured.alpha.trajectories,
        first_accepts=measured.alpha.first_accepts,
        catchup_cost=measured.cost.catchup,
    )


registry.register_loop(
    registry.Loop(
        "batch_speculative",
        _generate,
        BatchOptions,
        needs_draft=True,
        pricing=Pricing(
            _choose,
            "acceptance replayed over the calibration continuations, the candidates' own at each "
            "round's first position (replay.batch_replayed_speedup)",
            candidates=True,
        ),
    )
)
