"""The decoding engines a serving worker runs: requests in, tokens out, one step at a time.

`ContinuousBatcher` decodes up to `max_batch` sequences per model call (runtime/ort_batch.py):
between two calls, finished or cancelled sequences leave and waiting ones join (prefilled alone,
then decoding with the others), so a long generation never holds a short one back. Greedy
requests decode the tokens they would alone; sampled ones draw from their own generator.

`PlanRunner` runs one request at a time through the artifact's decode plan (`run_plan`), for what
a batch cannot hold: a backend without a batched graph, or a plan's loop with a draft (speculative
and its kin verify several positions per call of one sequence). With `max_batch` 1 it is what
serves, so a single-stream server keeps the plan's speed-up; its tokens arrive when a request ends.

Both answer with `Event`s and never let one request's failure reach another: a request whose
prefill fails gets its error, the others decode on.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from accelc.loops.autoregressive import Sampler


@dataclass(frozen=True)
class Request:
    """A generation a worker decodes: prompt token ids, how many tokens at most, how to pick them."""

    id: int
    prompt: tuple[int, ...]
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0

    @property
    def sampler(self) -> Sampler:
        return Sampler(self.temperature, self.top_k, self.top_p) if self.temperature > 0 else Sampler()


@dataclass(frozen=True)
class Event:
    """New tokens of request `id`; `finish` ("stop": an end-of-sequence token, "length": max_tokens,
    "cancelled", "error", or "lost": its worker exited) once it is over, with `error` saying why
    for the last two."""

    id: int
    tokens: tuple[int, ...] = ()
    finish: str | None = None
    error: str | None = None


@dataclass(eq=False)
class _Sequence:
    request: Request
    row: object
    rng: np.random.Generator
    tokens: list[int] = field(default_factory=list)


class ContinuousBatcher:
    def __init__(self, model, max_batch: int, eos_ids: Sequence[int]):
        self.model, self.max_batch, self.eos_ids = model, min(max_batch, model.slots), frozenset(eos_ids)
        self.waiting: deque[Request] = deque()
        self.active: list[_Sequence] = []
        self.cancelled: set[int] = set()
        self.calls = 0  # model calls of the decode steps
        self.last_batch = 0  # sequences the last step's decode call held

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.active

    def submit(self, request: Request) -> None:
        self.waiting.append(request)

    def cancel(self, request_id: int) -> None:
        self.cancelled.add(request_id)

    def step(self) -> list[Event]:
        """Admit what fits, then one decode call for every active sequence; the events it made."""
        events, self.last_batch = self._drop_cancelled(), 0
        while self.waiting and len(self.active) < self.max_batch:
            events += self._admit(self.waiting.popleft())
        if self.active:
            try:
                logits = self.model.decode([s.row for s in self.active], [s.tokens[-1] for s in self.active])
            except Exception as exc:  # the batch as a whole failed: every sequence in it ends, the worker lives
                for seq in list(self.active):
                    events.append(self._finish(seq, "error", f"decoding failed: {exc}"))
                return events
            self.calls, self.last_batch = self.calls + 1, len(self.active)
            for seq, row in zip(list(self.active), logits):
                events.append(self._advance(seq, row))
        return events

    def _drop_cancelled(self) -> list[Event]:
        if not self.cancelled:
            return []
        events = [Event(r.id, finish="cancelled") for r in self.waiting if r.id in self.cancelled]
        self.waiting = deque(r for r in self.waiting if r.id not in self.cancelled)
        events += [self._finish(s, "cancelled") for s in list(self.active) if s.request.id in self.cancelled]
        self.cancelled.clear()
        return events

    def _admit(self, request: Request) -> list[Event]:
        try:
            rng = np.random.default_rng(request.seed)
            row, logits = self.model.admit(request.prompt, len(request.prompt) + request.max_tokens)
        except Exception as exc:  # this request alone fails
            return [Event(request.id, finish="error", error=f"prefill failed: {exc}")]
        seq = _Sequence(request, row, rng)
        self.active.append(seq)
        event = self._advance(seq, logits)
        return [event]

    def _advance(self, seq: _Sequence, logits: np.ndarray) -> Event:
        token = seq.request.sampler.pick(logits, seq.rng)
        seq.tokens.append(token)
        if token in self.eos_ids:
            return self._finish(seq, "stop", tokens=(token,))
        if len(seq.tokens) >= seq.request.max_tokens:
            return self._finish(seq, "length", tokens=(token,))
        return Event(seq.request.id, (token,))

    def _finish(self, seq: _Sequence, reason: str, error: str | None = None, tokens: tuple[int, ...] = ()) -> Event:
        self.active.remove(seq)
        self.model.release(seq.row)
        return Event(seq.request.id, tokens, reason, error)


class PlanRunner:
    """One request at a time through the artifact's decode plan on its target (and draft)."""

    def __init__(self, plan, target, draft, eos_ids: Sequence[int]):
        self.plan, self.target, self.draft, self.eos_ids = plan, target, draft, tuple(eos_ids)
        self.waiting: deque[Request] = deque()
        self.cancelled: set[int] = set()
        self.calls = 0
        self.last_batch = 1  # one sequence per call, always

    @property
    def idle(self) -> bool:
        return not self.waiting

    def submit(self, request: Request) -> None:
        self.waiting.append(request)

    def cancel(self, request_id: int) -> None:
        self.cancelled.add(request_id)

    def step(self) -> list[Event]:
        from accelc.loops.plan import run_plan

        request = self.waiting.popleft()
        if request.id in self.cancelled:
            self.cancelled.discard(request.id)
            return [Event(request.id, finish="cancelled")]
        try:
            result = run_plan(
                self.plan.model_copy(update={"seed": request.seed}),
                self.target,
                self.draft,
                list(request.prompt),
                request.max_tokens,
                eos_ids=self.eos_ids,
                sampler=request.sampler,
            )
        except Exception as exc:  # this request alone fails
            return [Event(request.id, finish="error", error=f"decoding failed: {exc}")]
        self.calls += result.stats.get("target_calls", 0)
        tokens = tuple(result.tokens[: request.max_tokens])
        return [Event(request.id, tokens, "stop" if tokens and tokens[-1] in self.eos_ids else "length")]
