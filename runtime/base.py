"""The StepModel protocol: the one interface every decoding algorithm is written against.

A StepModel is a batch-1 causal LM with an explicit KV state. Logits cross the protocol as
float32 numpy arrays of shape [k, vocab] (one row per fed token), token ids as int64 arrays,
so a decoding loop never knows whether torch, ONNX Runtime or TVM computed them.

    prefill(ids)            -> logits [T, V], state      (state.length == T)
    extend(state, ids[k])   -> logits [k, V], new state  (k >= 1: verification of k drafts)
    truncate(state, n)      -> state holding only the first n positions (rejected drafts)
    alone()                 -> optional: a context for calls no other worker runs beside (`alone`)

States are values: extend and truncate return new states and never invalidate the input one,
which is what lets speculative decoding roll back cheaply.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np


@dataclass(frozen=True)
class KVState:
    """Past keys/values of every layer plus how many positions they hold.

    `tensors` is backend specific (numpy arrays, torch tensors or TVM tensors), laid out as
    [key_0, value_0, key_1, value_1, ...], each [1, kv_heads, length, head_dim].
    """

    length: int
    tensors: tuple[Any, ...]


@runtime_checkable
class StepModel(Protocol):
    name: str
    vocab_size: int

    def prefill(self, ids: np.ndarray) -> tuple[np.ndarray, KVState]: ...

    def extend(self, state: KVState, ids: np.ndarray) -> tuple[np.ndarray, KVState]: ...

    def truncate(self, state: KVState, n: int) -> KVState: ...


@runtime_checkable
class BatchModel(Protocol):
    """Several sequences decoding at once, one token each per call (serving's continuous
    batching): `admit` prefills a sequence into a free row, `decode` feeds every active row its
    next token (logits in the order of the rows given), `release` frees a finished one. Rows are opaque handles."""

    slots: int

    @property
    def free(self) -> int: ...

    def admit(self, ids: Sequence[int], positions: int) -> tuple[Any, np.ndarray]: ...

    def decode(self, rows: Sequence[Any], tokens: Sequence[int]) -> np.ndarray: ...

    def release(self, row: Any) -> None: ...


class KVStepModel:
    """Shared plumbing: prefill is extend from an empty state; truncate slices the length axis."""

    name = "base"
    vocab_size: int

    def empty_state(self) -> KVState:
        raise NotImplementedError

    def extend(self, state: KVState, ids: np.ndarray) -> tuple[np.ndarray, KVState]:
        raise NotImplementedError

    def prefill(self, ids: np.ndarray) -> tuple[np.ndarray, KVState]:
        return self.extend(self.empty_state(), np.asarray(ids, dtype=np.int64))

    def truncate(self, state: KVState, n: int) -> KVState:
        if not 0 <= n <= state.length:
            raise ValueError(f"cannot truncate a KV state of length {state.length} to {n}")
        if n == state.length:
            return state
        return KVState(n, tuple(t[:, :, :n, :] for t in state.tensors))

    def alone(self) -> contextlib.AbstractContextManager:
        """A context in which no other worker runs beside this model (PEARL's prefill and its
        copied rounds). A model opened with a share of the cores for a parallel worker runs the
        calls made inside on all of them where its backend can (ORT: a second session); others
        have one thread pool for every call, and this changes nothing."""
        return contextlib.nullcontext()

    def kv_numpy(self, state: KVState) -> list[np.ndarray]:
        """The KV tensors as numpy arrays (validation compares them across backends)."""
        return [np.asarray(t) for t in state.tensors]

    def state_from_kv(self, kv: Sequence[np.ndarray]) -> KVState:
        """A state holding `kv` (kv_numpy's layout), so a draft built from the target's own
        weights can start from the target's prompt cache instead of a prefill of its own."""
        raise NotImplementedError(f"the {self.name} backend cannot adopt KV tensors")


def alone(model: StepModel) -> contextlib.AbstractContextManager:
    """`model.alone()` where the model has it (KVStepModel.alone), else a context that changes
    nothing: a StepModel of one's own needs no such method."""
    method = getattr(model, "alone", None)
    return method() if method is not None else contextlib.nullcontext()


def kv_length(kv: Sequence[np.ndarray], layers: int, kv_heads: int, head_dim: int) -> int:
    """The number of positions `kv` holds, after checking it has this model's layout."""
    from accelc.errors import UsageError

    want = (1, kv_heads, head_dim)
    if (
        len(kv) != 2 * layers
        or any(t.ndim != 4 or (t.shape[0], t.shape[1], t.shape[3]) != want for t in kv)
        or len({t.shape[2] for t in kv}) != 1
    ):
        got = sorted({tuple(t.shape) for t in kv})
        raise UsageError(
            f"KV tensors of another layout ({len(kv)} tensors, shapes {got}) cannot seed a model "
            f"with {layers} layers of [1, {kv_heads}, length, {head_dim}] keys and values"
        )
    return int(kv[0].shape[2])
