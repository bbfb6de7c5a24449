"""TarFlow (Zhai et al., arXiv 2412.06329): a transformer autoregressive flow over image patches.

An image (C, H, W) is cut into T = (H/p)^2 patches of D = C p^2 values (section 2.1). K flow
blocks each run a causal transformer over the patch sequence, in alternating order (odd blocks
flip it, so the autoregression direction alternates), and map patch t affinely with parameters
computed from the patches before it:

    z_t = (x_t - b_t(x_<t)) * exp(-a_t(x_<t)),  log|det| = -sum_t a_t   (density direction, eq. 3)
    x_t = z_t * exp(a_t(x_<t)) + b_t(x_<t)                                (sampling direction, eq. 4)

The transformer's output is shifted right by one token, so patch 0 passes unchanged and the
parameters of patch t+1 are the output at token t. Its output projection starts at zero, so
every block starts as the identity. Training adds Gaussian noise of `noise_std` to the data
(section 2.3); samples are cleaned by one score step, x + sigma^2 grad log p(x) (section 2.4).

A block's transformer is called two ways, which runtime/flow.py names as its protocol: over a
whole sequence (`params`, no cache), and over k new tokens after a key/value cache of the P
tokens before them (`extend`), which returns the cache grown by those k tokens.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from accelc.errors import UsageError
from accelc.families.tarflow_config import CONFIG_FILE, WEIGHTS_FILE, TarFlowConfig, is_tarflow_dir, read_config

__all__ = ["CONFIG_FILE", "WEIGHTS_FILE", "TarFlow", "TarFlowConfig", "is_tarflow_dir", "load", "read_config", "save"]


class Layer(nn.Module):
    """A pre-LN transformer layer with causal attention over a key/value cache and its new tokens."""

    def __init__(self, config: TarFlowConfig):
        super().__init__()
        self.heads, self.head_dim = config.heads, config.head_dim
        self.norm1 = nn.LayerNorm(config.width)
        self.qkv = nn.Linear(config.width, 3 * config.width)
        self.proj = nn.Linear(config.width, config.width)
        self.norm2 = nn.LayerNorm(config.width)
        self.fc1 = nn.Linear(config.width, 4 * config.width)
        self.fc2 = nn.Linear(4 * config.width, config.width)

    def forward(self, h: torch.Tensor, past_k: torch.Tensor | None = None, past_v: torch.Tensor | None = None):
        n, k, width = h.shape
        q, key, value = (
            self.qkv(self.norm1(h)).view(n, k, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        )
        if past_k is not None:
            key = torch.cat([past_k, key], dim=2)
            value = torch.cat([past_v, value], dim=2)
        past = key.shape[2] - k
        scores = (q @ key.transpose(-1, -2)) * (1.0 / math.sqrt(self.head_dim))
        rows = torch.arange(k, device=h.device).unsqueeze(1) + past
        cols = torch.arange(key.shape[2], device=h.device).unsqueeze(0)
        scores = scores.masked_fill(cols > rows, float("-inf"))
        out = (scores.softmax(dim=-1) @ value).transpose(1, 2).reshape(n, k, width)
        h = h + self.proj(out)
        h = h + self.fc2(F.gelu(self.fc1(self.norm2(h))))
        return h, key, value


class FlowBlock(nn.Module):
    """One TarFlow block: a causal transformer whose output at token t is (a, b) of token t+1."""

    def __init__(self, config: TarFlowConfig, flip: bool):
        super().__init__()
        self.flip = flip
        self.proj_in = nn.Linear(config.token_dim, config.width)
        self.position = nn.Parameter(torch.randn(config.tokens, config.width) * 0.02)
        self.layers = nn.ModuleList(Layer(config) for _ in range(config.layers))
        self.norm = nn.LayerNorm(config.width)
        self.proj_out = nn.Linear(config.width, 2 * config.token_dim)
        nn.init.zeros_(self.proj_out.weight)  # every block starts as the identity
        nn.init.zeros_(self.proj_out.bias)

    def permute(self, x: torch.Tensor) -> torch.Tensor:
        """Natural patch order <-> this block's order (a flip is its own inverse)."""
        return x.flip(1) if self.flip else x

    def _net(self, x: torch.Tensor, start, past: list[torch.Tensor] | None):
        k = x.shape[1]
        h = self.proj_in(x) + self.position[start : start + k]
        present = []
        for i, layer in enumerate(self.layers):
            h, key, value = layer(h, *(past[2 * i : 2 * i + 2] if past is not None else (None, None)))
            present += [key, value]
        a, b = self.proj_out(self.norm(h)).chunk(2, dim=-1)
        return a, b, present

    def params(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(a, b) of every token of `x` (N, T, D, this block's order) from the tokens before it;
        token 0's are zero."""
        a, b, _ = self._net(x[:, :-1], 0, None)
        zero = torch.zeros_like(x[:, :1])
        return torch.cat([zero, a], dim=1), torch.cat([zero, b], dim=1)

    def extend(self, x: torch.Tensor, past: list[torch.Tensor]):
        """Feed k tokens after the P cached ones (`past`: key, value per layer, N x H x P x hd):
        (a, b) of tokens P+1 .. P+k and the cache of P+k tokens."""
        return self._net(x, past[0].shape[2], past)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Density direction: x (natural order) -> (z, log|det| per sample)."""
        xp = self.permute(x)
        a, b = self.params(xp)
        z = (xp - b) * torch.exp(-a)
        return self.permute(z), -a.sum(dim=(1, 2))


class TarFlow(nn.Module):
    def __init__(self, config: TarFlowConfig):
        super().__init__()
        self.config = config
        self.blocks = nn.ModuleList(FlowBlock(config, flip=bool(i % 2)) for i in range(config.blocks))

    def patchify(self, images: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, T, D)."""
        p = self.config.patch
        return F.unfold(images, kernel_size=p, stride=p).transpose(1, 2)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        c, p, size = self.config.channels, self.config.patch, self.config.image_size
        return F.fold(x.transpose(1, 2), output_size=(size, size), kernel_size=p, stride=p).view(-1, c, size, size)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Patches (N, T, D) -> (z, log|det| per sample)."""
        logdet = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
        for block in self.blocks:
            x, ld = block(x)
            logdet = logdet + ld
        return x, logdet

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """log p(x) per sample of patches x under the standard normal prior (nats)."""
        z, logdet = self(x)
        dims = z[0].numel()
        return -0.5 * (z**2).sum(dim=(1, 2)) - 0.5 * dims * math.log(2 * math.pi) + logdet

    def bits_per_dim(self, x: torch.Tensor) -> torch.Tensor:
        """Per sample: -log2 of the probability of the 8-bit pixel bin around x in [-1, 1] (bin
        2/256), by the density times the bin width (the usual dequantised bound)."""
        dims = x[0].numel()
        return -self.log_prob(x) / (dims * math.log(2)) + 7.0

    def denoise(self, x: torch.Tensor) -> torch.Tensor:
        """One score step x + sigma^2 grad log p(x) (Tweedie's formula; TarFlow section 2.4)."""
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(self.log_prob(x).sum(), x)
        return (x + self.config.noise_std**2 * grad).detach()


def save(model: TarFlow, directory: Path, extra: dict | None = None) -> None:
    """Config + safetensors: the model of record (never a pickle)."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    (directory / CONFIG_FILE).write_text(json.dumps({**model.config.to_json(), **(extra or {})}, indent=2) + "\n")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(directory / WEIGHTS_FILE))


def load(directory: Path) -> TarFlow:
    """A TarFlow from its folder; the weights must match the config exactly."""
    from safetensors.torch import load_file

    config = read_config(directory)
    model = TarFlow(config)
    path = directory / WEIGHTS_FILE
    try:
        weights = load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types for a bad header
        raise UsageError(f"{path}: cannot read safetensors weights ({exc})") from None
    own = model.state_dict()
    missing = sorted(set(own) - set(weights))
    unexpected = sorted(set(weights) - set(own))
    shapes = sorted(k for k in set(own) & set(weights) if own[k].shape != weights[k].shape)
    if missing or unexpected or shapes:
        raise UsageError(
            f"{path}: weights do not belong to {directory / CONFIG_FILE} "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]}, wrong shape {shapes[:3]})"
        )
    model.load_state_dict(weights)
    return model.eval()
