"""Reformation: rectify the kept weights of o_proj and down_proj with the omitted ones.

For a consumer Linear W [m, n] whose input channels were pruned, with calibration inputs X [n, N]
(all n channels, as the dense q/k/v or gate/up produce them) and H = X X^T [n, n], solve

    min_W'  ||W X - W' X||_F^2 + lam ||W' - W||_F^2     s.t.  W' = 0 outside the keep mask M

(the reformation of Shen et al., arXiv 2409.17372, solved by ADMM as in Boža, arXiv 2401.02938;
the target is the full, unpruned layer output). The damping pulls towards the inherited weights,
not towards zero: lam -> inf gives back plain masking W * M, and because
W * M is feasible the reconstruction error never exceeds masking's for any lam >= 0
(err(W') + lam ||W'_S - W_S||^2 <= err(W * M)). lam = damp * mean(diag H).

    closed form (one kept column set S for every row, the case of o_proj and down_proj):
        W'_S = W_S + W_Sbar H[Sbar, S] (H[S, S] + lam I)^-1            (Cholesky solve, float64)
    ADMM (any mask M [m, n]), Boza-style as in the released code, with the mask polarity fixed
    (M = 1 keeps a weight) and the same damped objective, so it converges to the closed form on
    column masks:
        Hd = H + lam I;  d = sqrt(diag Hd);  Ht = D^-1 Hd D^-1;  V = (W D)^T;  B = Ht V
        A = (Ht + rho I)^-1;  U = 0
        repeat: Z = (V + U) * M^T;  U = U + V - Z;  V = A (B + rho (Z - U))
        W' = ((V + U) * M^T / d)^T

q/k/v and gate/up lose output rows only; their optimum is the original kept rows, so
reformation there is a no-op (it matters for the consumers).

Order: layer by layer, SparseGPT-style. Layer i's inputs come from the already pruned and reformed
layers 0..i-1; inside the layer the MLP's inputs come from the pruned, reformed attention.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import numpy as np

from accelc import progress
from accelc.compiler.pruning.masks import Geometry, Subnet

METHODS = ("closed_form", "admm")
# Ridge as a fraction of mean(diag H). The data README's reference point uses 0.01; measured on
# SmolLM2 with 16 x 512 calibration tokens (persuasion ppl, uniform MLP 1152 / searched 20%
# subnet): 0.01 -> 48.95, 0.05 -> 48.42, 0.2 -> 48.16 / 0.1 -> 47.40, 0.2 -> 47.25, 0.5 -> 47.37.
# Fewer tokens per channel need more (1024 tokens for 1536 channels: 0.01 overfits, 0.2 helps).
# On held-out text of other domains (a four-domain calibration mixture, docs/pruning.md) 0.2 is
# still the best of 0.05 / 0.2 / 1 / 5 on the worst text; more windows help more than more ridge.
DEFAULT_DAMP = 0.2
# ADMM: the released code uses rho = 10 on the unit-diagonal Gram and 20 iterations
# (shawnricecake/search-llm `admm_optimize`, the code of arXiv 2409.17372). A fixed rho = 10 leaves 20-45% relative error after 20 iterations on
# correlated Grams (measured here); None = the spectrum-based optimal penalty, see solve_admm.
DEFAULT_RHO: float | None = None
DEFAULT_ITERS = 20


# --------------------------------------------------------------------------- solvers


def _damping(H, damp: float) -> float:
    return float(damp) * float(H.diagonal().mean())


def solve_closed_form(W, H, keep, damp: float = DEFAULT_DAMP):
    """W [m, n], H [n, n] (float64 tensors), keep: kept column indices (LongTensor [k]).

    Returns W'_S [m, k]: the reformed kept columns.
    """
    import torch

    W, H = W.double(), H.double()
    n = W.shape[1]
    drop = torch.ones(n, dtype=torch.bool)
    drop[keep] = False
    drop = drop.nonzero().flatten()
    if drop.numel() == 0:
        return W.clone()
    lam = _damping(H, damp)
    Hss = H[keep][:, keep] + lam * torch.eye(len(keep), dtype=H.dtype)
    L = _cholesky(Hss)
    # X [k, m] solves (H_SS + lam I) X = H[S, Sbar] W_Sbar^T
    X = torch.cholesky_solve(H[keep][:, drop] @ W[:, drop].T, L)
    return W[:, keep] + X.T


def _cholesky(A):
    """Cholesky with a growing jitter if A is numerically singular (a dead channel, lam = 0)."""
    import torch

    jitter = 0.0
    scale = float(A.diagonal().abs().mean()) or 1.0
    for _ in range(8):
        L, info = torch.linalg.cholesky_ex(A + jitter * torch.eye(len(A), dtype=A.dtype))
        if int(info) == 0:
            return L
        jitter = max(jitter * 10.0, 1e-10 * scale)
    raise ValueError("Gram block is not positive definite even with jitter; raise the damping")


def solve_admm(W, H, mask, damp: float = DEFAULT_DAMP, rho: float | None = DEFAULT_RHO, iters: int = DEFAULT_ITERS):
    """W [m, n], H [n, n], mask [m, n] bool (True keeps). Returns W' [m, n], zero outside mask.

    `rho` is the penalty on the unit-diagonal Gram; None picks sqrt(lambda_min * lambda_max) of
    that Gram, the optimal fixed penalty for ADMM on quadratic programs (Ghadimi et al., IEEE TAC
    2015). (Ht + rho I)^-1 is applied through one eigendecomposition.
    """
    import torch

    W, H = W.double(), H.double()
    n = W.shape[1]
    Hd = H + _damping(H, damp) * torch.eye(n, dtype=H.dtype)
    d = Hd.diagonal().clamp_min(0).sqrt() + 1e-8  # [n]
    Ht = Hd / d[:, None] / d[None, :]  # unit diagonal
    evals, Q = torch.linalg.eigh(Ht)  # Ht = Q diag(evals) Q^T
    if rho is None:
        rho = float(evals.clamp_min(1e-12)[[0, -1]].prod().sqrt())
    Mt = mask.T.to(W.dtype)  # [n, m]
    V = (W * d[None, :]).T  # [n, m]: W D, transposed
    B = Ht @ V
    U = torch.zeros_like(V)
    for _ in range(iters):
        Z = (V + U) * Mt
        U = U + V - Z
        V = Q @ ((Q.T @ (B + rho * (Z - U))) / (evals + rho)[:, None])  # (Ht + rho I)^-1 (...)
    Z = (V + U) * Mt
    return (Z / d[:, None]).T


def reconstruction_error(W, W_new, H) -> float:
    """tr((W - W') H (W - W')^T) = ||W X - W' X||_F^2, both W and W' [m, n]."""
    delta = W.double() - W_new.double()
    return float(((delta @ H.double()) * delta).sum())


def solve(
    W,
    H,
    keep,
    *,
    method: str = "closed_form",
    damp: float = DEFAULT_DAMP,
    rho: float = DEFAULT_RHO,
    iters: int = DEFAULT_ITERS,
):
    """Reformed kept columns W'[:, keep] by either method (column-structured mask)."""
    import torch

    if method == "closed_form":
        return solve_closed_form(W, H, keep, damp)
    if method == "admm":
        mask = torch.zeros(W.shape, dtype=torch.bool)
        mask[:, keep] = True
        return solve_admm(W, H, mask, damp, rho, iters)[:, keep]
    from accelc.errors import UsageError

    raise UsageError(f"unknown reformation method '{method}': choose one of {', '.join(METHODS)}")


def _scatter_cols(W_kept, keep, n):
    import torch

    full = torch.zeros(W_kept.shape[0], n, dtype=torch.float64)
    full[:, keep] = W_kept.double()
    return full


# --------------------------------------------------------------------------- layer by layer


@dataclass
class Reformation:
    """Reformed consumer weights for materialize.shrink, and the per-module error report."""

    overrides: dict = field(default_factory=dict)  # {(layer, "o_proj"|"down_proj"): (W', bias)}
    report: list = field(default_factory=list)  # dicts: layer, module, err_masked, err_reformed, ...


def save_overrides(overrides: dict, path) -> None:
    """Replacement consumer weights as safetensors: `layers.{i}.{module}.weight` / `.bias`."""
    from safetensors.torch import save_file

    tensors = {}
    for (i, name), (weight, bias) in overrides.items():
        tensors[f"layers.{i}.{name}.weight"] = weight.contiguous()
        if bias is not None:
            tensors[f"layers.{i}.{name}.bias"] = bias.contiguous()
    save_file(tensors, str(path))


def load_overrides(path) -> dict:
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    out = {}
    for key, weight in tensors.items():
        _, i, name, kind = key.split(".")
        if kind == "weight":
            out[(int(i), name)] = (weight, tensors.get(f"layers.{i}.{name}.bias"))
    return out


class _Stop(Exception):
    pass


def layer_inputs(model, windows):
    """Hidden states entering layer 0 and the keyword arguments the layer receives, per window."""
    import torch

    captured = []

    def grab(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        keep = {k: kwargs.get(k) for k in ("attention_mask", "position_ids", "cache_position", "position_embeddings")}
        captured.append((hidden.detach(), keep))
        raise _Stop

    handle = model.model.layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.inference_mode():
            for win in windows:
                with contextlib.suppress(_Stop):
                    model.model(
                        input_ids=torch.as_tensor(np.asarray(win, dtype=np.int64)).unsqueeze(0), use_cache=False
                    )
    finally:
        handle.remove()
    return captured


def _inputs_of(linear, run):
    """Run `run()` and return the list of inputs `linear` saw (one per call)."""
    seen = []
    handle = linear.register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach()))
    try:
        run()
    finally:
        handle.remove()
    return seen


def _gram(xs, n):
    import torch

    H = torch.zeros(n, n, dtype=torch.float64)
    for x in xs:
        x = x.reshape(-1, n).float()
        H += (x.T @ x).double()  # fp32 per window, fp64 across windows
    return H


def reform(
    model,
    subnet: Subnet,
    windows,
    *,
    method: str = "closed_form",
    damp: float = DEFAULT_DAMP,
    rho: float = DEFAULT_RHO,
    iters: int = DEFAULT_ITERS,
    modules=("o_proj", "down_proj"),
    show_progress: bool = True,
) -> Reformation:
    """Sequential reformation of the dense `model` for `subnet` on calibration `windows`.

    `modules` chooses which consumers are reformed (the others are only sliced). Returns the
    overrides for materialize.shrink and a report of calibration reconstruction errors per module.
    """
    import torch

    from accelc.compiler.pruning.materialize import _index_sets

    if method not in METHODS:
        from accelc.errors import UsageError

        raise UsageError(f"unknown reformation method '{method}': choose one of {', '.join(METHODS)}")
    geo = Geometry.from_model(model)
    result = Reformation()
    states = layer_inputs(model, windows)
    layers = progress.bar(
        list(enumerate(zip(model.model.layers, subnet.layers))),
        desc="reformation",
        unit="layer",
        **({} if show_progress else {"disable": True}),
    )
    with torch.inference_mode():
        for i, (layer, mask) in layers:
            q_rows, _, ch, _ = _index_sets(geo, mask.heads, mask.channels)
            new_states = []
            # attention: the dense attention's o_proj inputs (every head) on the pruned stream
            a = layer.self_attn
            xo = _inputs_of(a.o_proj, lambda: [a(hidden_states=layer.input_layernorm(h), **kw) for h, kw in states])
            Wo = _consumer(result, i, "o_proj", a.o_proj, xo, q_rows, "o_proj" in modules, method, damp, rho, iters)
            mids = [h + _apply(x, q_rows, Wo, a.o_proj.bias) for (h, _), x in zip(states, xo)]
            del xo
            # MLP: the dense down_proj inputs (every channel) after the pruned attention
            m = layer.mlp
            xd = _inputs_of(m.down_proj, lambda: [m(layer.post_attention_layernorm(h)) for h in mids])
            Wd = _consumer(
                result, i, "down_proj", m.down_proj, xd, ch, "down_proj" in modules, method, damp, rho, iters
            )
            for (_h, kw), mid, x in zip(states, mids, xd):
                new_states.append((mid + _apply(x, ch, Wd, m.down_proj.bias), kw))
            states = new_states
    return result


def _apply(x, keep, W_kept, bias):
    out = x[..., keep] @ W_kept.T.to(x.dtype)
    return out if bias is None else out + bias


def _consumer(result, i, name, linear, xs, keep, enabled, method, damp, rho, iters):
    """Solve one consumer; record its override and errors; return the kept weight [m, k]."""
    W = linear.weight.detach().double()
    n = W.shape[1]
    H = _gram(xs, n)
    masked_full = _scatter_cols(W[:, keep], keep, n)
    err_masked = reconstruction_error(W, masked_full, H)
    if enabled:
        W_new = solve(W, H, keep, method=method, damp=damp, rho=rho, iters=iters)
        err_new = reconstruction_error(W, _scatter_cols(W_new, keep, n), H)
    else:
        W_new, err_new = W[:, keep], err_masked
    W_new = W_new.to(linear.weight.dtype)
    bias = None if linear.bias is None else linear.bias.detach().clone()
    result.overrides[(i, name)] = (W_new, bias)
    target = float(((W @ H) * W).sum())
    result.report.append(
        {
            "layer": i,
            "module": name,
            "kept": len(keep),
            "of": n,
            "err_masked": err_masked,
            "err_reformed": err_new,
            "target_energy": target,
            "tokens": sum(x.reshape(-1, n).shape[0] for x in xs),
            "reformed": bool(enabled),
        }
    )
    return W_new


def oneshot(model, subnet: Subnet, grams: dict, *, damp: float = DEFAULT_DAMP, cache=None) -> dict:
    """Closed-form overrides from the *dense* model's Gram matrices (no sequential pass).

    grams: {(layer, "o_proj"|"down_proj"): H [n, n]} e.g. from importance.collect(gram=True).
    A cheap approximation of `reform` (inputs are the dense ones), for use inside a search;
    measured on SmolLM2 it gives the same perplexities as the sequential pass to within 0.5%.
    cache: an optional dict-like {(layer, module, kept indices): override}; a search's offspring
    share most layers with their parents, so most solves are found there.
    """
    import torch

    from accelc.compiler.pruning.materialize import _index_sets

    geo = Geometry.from_model(model)
    overrides = {}
    with torch.no_grad():
        for i, (layer, mask) in enumerate(zip(model.model.layers, subnet.layers)):
            q_rows, _, ch, _ = _index_sets(geo, mask.heads, mask.channels)
            for name, lin, keep, ident in (
                ("o_proj", layer.self_attn.o_proj, q_rows, mask.heads),
                ("down_proj", layer.mlp.down_proj, ch, mask.channels),
            ):
                H = grams.get((i, name))
                if H is None:
                    continue
                key = (i, name, ident)
                if cache is not None and key in cache:
                    overrides[(i, name)] = cache[key]
                    continue
                W_new = solve_closed_form(lin.weight.detach(), H, keep, damp).to(lin.weight.dtype)
                overrides[(i, name)] = (W_new, None if lin.bias is None else lin.bias.detach())
                if cache is not None:
                    cache[key] = overrides[(i, name)]
    return overrides
