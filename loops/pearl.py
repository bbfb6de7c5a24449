"""PEARL: parallel speculative decoding with adaptive draft length (Liu et al., ICLR 2025).

Vanilla speculative decoding alternates: the target idles while the draft drafts and the draft
idles while the target verifies. PEARL runs both in every round, on two workers, from the same
sequence x = verified tokens + U unverified drafts (Liu et al., arXiv 2408.11850; the state machine
of smart-lty/ParallelSpeculativeDecoding `parallel_speculative_decoding`):

    draft worker:  draft gamma tokens d_0..d_{gamma-1} after x   (gamma one-token draft calls)
    target worker: one extend over x's unfed tail -> p for every position from the first
                   unverified one up to the position of d_0

Pre-verify mode (U empty): the target's call yields p for d_0's position only, and d_0 is
checked with the SD rule while the draft was already drafting d_1.. . Rejected: commit the
residual sample, drop every draft, roll the draft back. Accepted: commit d_0, keep d_1..d_{g-1}
as U (gamma - 1 unverified) and switch to post-verify.

Post-verify mode (U = gamma - 1 drafts): while the target verifies U and d_0 (gamma positions,
one call), the draft keeps drafting after them. All accepted: commit U and d_0, the new
d_1.. become U, stay in post-verify: this is the adaptive draft length, runs of 2 gamma, 3 gamma
... tokens continue without a break. A rejection at i: commit the accepted prefix and a
residual sample, roll both models back with `truncate`, switch to pre-verify.

Drafts copied from the context (`lookup`, lookup.py): where the end of x = verified + U
recurred earlier in the sequence, the tokens that followed it then are drafts C (one-hot q)
that cost the draft model nothing, so there is no drafting to overlap with their verification:
such a round runs alone, as a round of plain speculative decoding does. The target checks U + C
in one call, on all the cores where its backend can (StepModel.alone: ORT opens a second,
all-core session over the same cache), and commits the accepted prefix and a residual, or a
bonus token from its last row when all are accepted; the draft model idles, and its next call
feeds every token it skipped. The next round starts in pre-verify. (Copies added to a parallel
round's U instead measured 5-7% slower on a 2-core CPU: PEARL's rounds there are paced by the
draft model, so a copy shortened no round, and the target verified it on its one thread.)
The prompt's prefill runs alone too.

Every committed token passes the exact SD rule min(1, p/q) with residual norm(max(p - q, 0)),
or is the target's own sample (the first token, a copied round's bonus; PEARL's parallel rounds
have no bonus token), so the output is distributed exactly as the target's;
at temperature 0 it is the target's greedy output. Randomness is per position (see
`accelc.loops.speculative`), so the threaded schedule and the deterministic sequential one
(`concurrent=False`: the same maths, the draft's work then the target's in one thread) emit
identical tokens for the same seed.

Threads: the draft and the target each run on their own single worker thread; ONNX Runtime and
torch release the GIL inside their kernels, and each backend keeps its own intra-op thread pool
(for ORT the session options; give each model 1 thread on a 2-core machine). The coordinator
verifies, and runs the rounds made alone itself.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from accelc.loops import registry
from accelc.loops.acceptance import SpecStats, own_sample, verify_chain
from accelc.loops.autoregressive import GenerationResult, Sampler
from accelc.loops.cursor import begin, check_args, commit, copied_drafts, draft_tokens
from accelc.loops.lookup import Lookup
from accelc.loops.pricing import Measured, Pricing
from accelc.loops.registry import DraftOptions
from accelc.loops.replay import GammaChoice, choose_pearl_gamma
from accelc.runtime.base import StepModel, alone

DEFAULT_GAMMA = 4  # PEARL's scripts use 3 to 5 (gamma ~ t_target / t_draft); the cost model refines it
PRE, POST, COPIED = "pre", "post", "copied"  # COPIED: a round of copied drafts, run alone

A = TypeVar("A")
B = TypeVar("B")


class _Workers:
    """Run the draft's job and the target's job of one round: concurrently or one after the other."""

    def __init__(self, concurrent: bool):
        self.concurrent = concurrent
        self.busy = {"draft": 0.0, "target": 0.0}
        self._pools = (
            {
                "draft": ThreadPoolExecutor(1, thread_name_prefix="accelc-pearl-draft"),
                "target": ThreadPoolExecutor(1, thread_name_prefix="accelc-pearl-target"),
            }
            if concurrent
            else None
        )

    def _timed(self, who: str, job: Callable[[], A]) -> Callable[[], A]:
        def run() -> A:
            t = time.perf_counter()
            try:
                return job()
            finally:
                self.busy[who] += time.perf_counter() - t

        return run

    def both(self, draft_job: Callable[[], A], target_job: Callable[[], B]) -> tuple[A, B]:
        if not self.concurrent:
            return self._timed("draft", draft_job)(), self._timed("target", target_job)()
        fd = self._pools["draft"].submit(self._timed("draft", draft_job))
        ft = self._pools["target"].submit(self._timed("target", target_job))
        return fd.result(), ft.result()

    def close(self) -> None:
        if self._pools:
            for pool in self._pools.values():
                pool.shutdown(wait=True)


def pearl_generate(
    target: StepModel,
    draft: StepModel,
    prompt: Sequence[int],
    max_new_tokens: int,
    *,
    gamma: int = DEFAULT_GAMMA,
    sampler: Sampler = Sampler(),
    eos_ids: Sequence[int] = (),
    seed: int = 0,
    concurrent: bool = True,
    prompt_kv_from_target: bool = False,
    lookup: Lookup | None = None,
) -> GenerationResult:
    """PEARL with window `gamma`; `concurrent=False` is the deterministic single-thread schedule;
    prompt_kv_from_target: see speculative.open_pair; lookup: where the context has a match, a
    round verifies U and the copied drafts alone (the module doc)."""
    check_args(prompt, max_new_tokens, gamma=gamma)
    workers = _Workers(concurrent)
    try:
        t0 = time.perf_counter()
        n_prompt = len(prompt)
        with alone(target):
            tgt, dft, tokens, done = begin(
                target,
                draft,
                prompt,
                max_new_tokens,
                eos_ids,  # tokens: verified
                lambda logits: own_sample(logits, sampler, seed, n_prompt),
                prompt_kv_from_target,
            )
        t1 = time.perf_counter()
        stats = SpecStats()
        unverified: list[int] = []  # U: drafts after `tokens`, the target has not checked them
        unverified_q: list = []  # their draft distributions (None when greedy)
        mode, trace = PRE, []
        transitions = {"pre_to_post": 0, "post_to_pre": 0}
        while not done:
            n = len(tokens)
            x = tokens + unverified
            # copies go only as far as the budget: U, the copies and a bonus are all a round can commit
            copies, copies_q = copied_drafts(x, lookup, max_new_tokens - (len(x) - n_prompt) - 1, sampler, dft.vocab)
            checked, checked_q = unverified + copies, unverified_q + copies_q
            if copies:  # nothing to draft: verify U + the copies alone, then a bonus as speculative decoding does
                with alone(target):
                    rows = tgt.logits_from(x + copies, start=n)
                stats.lookup_rounds += 1
                round_mode, drafted = COPIED, len(copies)
            else:
                # both workers start from x: the draft drafts gamma tokens after it, the target scores
                # positions n .. len(x) (pre-verify: 1 row; post-verify: |U| + 1 rows)
                (drafts, qs), rows = workers.both(
                    lambda: draft_tokens(dft, x, gamma, sampler, seed), lambda: tgt.logits_from(x, start=n)
                )
                checked, checked_q = checked + drafts[:1], checked_q + qs[:1]
                round_mode, drafted = mode, gamma
            j, t = verify_chain(rows, checked, checked_q, sampler, seed, n, stats)
            stats.rounds += 1
            stats.drafted += drafted
            trace.append(round_mode)
            before = len(tokens)
            if t is None and round_mode == COPIED:  # all accepted: the target's own token after them
                t = own_sample(rows[j], sampler, seed, n + j)
            if t is None:  # all checked tokens accepted: the rest of this round's drafts become U
                done = commit(tokens, checked, n_prompt, max_new_tokens, eos_ids)
                unverified, unverified_q = drafts[1:], qs[1:]
                if mode == PRE:
                    transitions["pre_to_post"] += 1
                mode = POST
            else:  # a rejection at j (or a copied round's end): keep the accepted prefix and t, roll back
                done = commit(tokens, checked[:j] + [t], n_prompt, max_new_tokens, eos_ids)
                unverified, unverified_q = [], []
                tgt.rollback(n + j)
                dft.rollback(n + j)
                if mode == POST:
                    transitions["post_to_pre"] += 1
                mode = PRE
            stats.round_tokens += len(tokens) - before
        t2 = time.perf_counter()
    finally:
        workers.close()
    # mode_trace: the mode each round ran in; draft/target busy seconds show how much they overlapped
    return GenerationResult(
        tokens[n_prompt:],
        t1 - t0,
        t2 - t1,
        stats.as_dict(
            tgt,
            dft,
            method="pearl",
            gamma=gamma,
            concurrent=concurrent,
            mode_trace=trace,
            rounds_pre=trace.count(PRE),
            rounds_post=trace.count(POST),
            rounds_copied=trace.count(COPIED),
            **transitions,
            lookup=lookup.to_dict() if lookup else None,
            draft_busy_seconds=workers.busy["draft"],
            target_busy_seconds=workers.busy["target"],
        ),
    )


def _choose(measured: Measured, gamma_max: int, lookups) -> GammaChoice:
    """The measured acceptance replayed through PEARL's two modes, at its workers' costs."""
    return choose_pearl_gamma(
        measured.alpha.alpha,
        measured.cost.cost_ratio,
        gamma_max=gamma_max,
        verify_cost=measured.cost.verify,
        worker_slowdown=measured.worker_slowdown,
        trajectories=measured.alpha.trajectories,
        lookups=lookups,
        catchup_cost=measured.cost.catchup,
        alone_verify=measured.alone_verify,
    )


registry.register_loop(
    registry.Loop(
        "pearl",
        registry.with_draft_options(pearl_generate),
        DraftOptions,
        needs_draft=True,
        copies_from_context=True,
        pricing=Pricing(
            _choose,
            "acceptance replayed through PEARL's two modes (replay.pearl_replayed_speedup)",
            parallel_workers=True,
        ),
    )
)
