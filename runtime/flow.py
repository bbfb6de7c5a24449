"""The flow-block protocol: what a sampler needs of one autoregressive flow block, on any backend.

A TarFlow block (families/tarflow_model.py) maps token t of its sequence affinely with (a_t, b_t),
computed by a causal transformer from the tokens before it. Sampling inverts it token by token,
x_t = z_t exp(a_t) + b_t, and the samplers (loops/flow_sampling.py) need two calls of its
transformer, in the block's own token order, on float32 numpy arrays (N, k, D):

- `params(x)`: (a, b) of all T tokens from one pass over the whole sequence, no cache (token 0's
  are zero): Jacobi's call.
- `extend(state, x)`: feed k tokens after the P the state caches; returns the state of P+k tokens
  and (a, b) of tokens P+1 .. P+k: the sequential step (k = 1) and Gauss-Seidel-Jacobi's chunk.
  States are values: extending one again from the same state is how a chunk's Jacobi iterations
  roll the cache back, so a backend that grows its cache in place must copy on write.

A `FlowModel` is the blocks in density order (sampling runs them last to first), each with
`flip` (whether its order is the natural patch order reversed), over T tokens of D values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np


class FlowBlockModel(Protocol):
    flip: bool

    def params(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...

    def empty(self, batch: int) -> Any: ...

    def extend(self, state: Any, x: np.ndarray) -> tuple[Any, np.ndarray, np.ndarray]: ...


@dataclass(frozen=True)
class FlowModel:
    blocks: tuple[FlowBlockModel, ...]  # density order: block 0 is applied to data first
    tokens: int
    token_dim: int
    name: str = "flow"

    def permute(self, index: int, x: np.ndarray) -> np.ndarray:
        """Natural order <-> block `index`'s order (a flip is its own inverse)."""
        return x[:, ::-1] if self.blocks[index].flip else x


class TorchFlowBlock:
    """A block of the torch model of record (families/tarflow_model.FlowBlock) behind the protocol."""

    def __init__(self, block, heads: int, head_dim: int):
        import torch

        self._torch = torch
        self.block = block.eval()
        self.flip = bool(block.flip)
        self._heads, self._head_dim, self._layers = heads, head_dim, len(block.layers)

    def params(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with self._torch.inference_mode():
            a, b = self.block.params(self._torch.from_numpy(np.ascontiguousarray(x)))
        return a.numpy(), b.numpy()

    def empty(self, batch: int):
        shape = (batch, self._heads, 0, self._head_dim)
        return [self._torch.zeros(shape) for _ in range(2 * self._layers)]

    def extend(self, state, x: np.ndarray):
        with self._torch.inference_mode():
            a, b, present = self.block.extend(self._torch.from_numpy(np.ascontiguousarray(x)), state)
        return present, a.numpy(), b.numpy()


def torch_flow_model(model, name: str = "torch") -> FlowModel:
    """The protocol over a torch TarFlow (families/tarflow_model.TarFlow)."""
    config = model.config
    blocks = tuple(TorchFlowBlock(block, config.heads, config.head_dim) for block in model.blocks)
    return FlowModel(blocks, config.tokens, config.token_dim, name)
