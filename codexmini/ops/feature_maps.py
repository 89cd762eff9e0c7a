"""Feature maps phi(.) of linear attention, as plain functions: phi(q) . phi(k) stands in for exp(q . k / sqrt(d)).

Each takes `[..., T, D]` (the model passes `[B, H, T, D]`, the runtime `[H, T, D]`) and returns `[..., T, F]` with
non-negative features (Taylor's kernel value is positive even where single features are negative), so the
normaliser `sum_j phi(q) . phi(k_j)` stays positive. Hedgehog's learnable weight is an argument: the modules that
own it as a parameter live in `codexmini.models.feature_maps`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .names import FEATURE_MAPS


def elu_feature_map(x: torch.Tensor) -> torch.Tensor:
    """elu(x) + 1 (Katharopoulos et al., 2020): `[..., D]` -> `[..., D]`, positive."""
    return F.elu(x) + 1.0


def relu_feature_map(x: torch.Tensor) -> torch.Tensor:
    """relu(x): sparse features; rows that are all zero give a zero output (the normaliser carries an epsilon)."""
    return F.relu(x)


_TAYLOR_PAIRS: dict = {}


def taylor_pairs(head_dim: int, device=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Index tables of Taylor's quadratic term: rows, cols `[P]` (i <= j, P = D(D+1)/2) and the weight `[P]`
    (1 on the diagonal, sqrt(2) off it).

    Built on first use per (head_dim, device) and kept here, not in a module's buffers: from_pretrained
    materialises modules on the meta device and would leave such buffers uninitialised.
    """
    key = (head_dim, torch.device(device) if device is not None else torch.device("cpu"))
    if key not in _TAYLOR_PAIRS:
        rows, cols = torch.triu_indices(head_dim, head_dim, device=key[1])
        weight = torch.where(rows == cols, 1.0, 2.0 ** 0.5)
        _TAYLOR_PAIRS[key] = (rows, cols, weight)
    return _TAYLOR_PAIRS[key]


def taylor_feature_map(x: torch.Tensor) -> torch.Tensor:
    """2nd-order Taylor expansion of exp (Based): phi(q).phi(k) = 1 + q.k/sqrt(D) + (q.k)^2 / (2 D).

    The quadratic term keeps only the D(D+1)/2 distinct products x_i x_j (i <= j), off-diagonal ones scaled by
    sqrt(2), which gives the same inner product as the full D^2 outer product at about half the width.

    Args:
        x: `[..., D]`.

    Returns:
        `[..., 1 + D + D(D+1)/2]`.
    """
    d = x.shape[-1]
    rows, cols, weight = taylor_pairs(d, x.device)
    x2 = x[..., rows] * x[..., cols] * weight.to(x.dtype) / (2.0 ** 0.5 * d ** 0.5)
    return torch.cat([torch.ones_like(x[..., :1]), x / d ** 0.25, x2], dim=-1)


def hedgehog_feature_map(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Hedgehog (Zhang et al. 2024): `[softmax(x W_h), softmax(-x W_h)]` per head h.

    Args:
        x: `[..., H, T, D]`.
        weight: `[H, D, Fh]`.

    Returns:
        `[..., H, T, 2 Fh]` in the dtype of `x` (the softmax runs in fp32 so bf16 training stays stable).
    """
    proj = torch.einsum("...htd,hdf->...htf", x, weight.to(x.dtype)).float()
    return torch.cat([proj.softmax(-1), (-proj).softmax(-1)], dim=-1).to(x.dtype)


def feature_map(name: str, x: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """The feature map called `name` (one of `FEATURE_MAPS`) on `x [..., H, T, D]`; hedgehog needs `weight`."""
    if name == "elu":
        return elu_feature_map(x)
    if name == "relu":
        return relu_feature_map(x)
    if name == "taylor":
        return taylor_feature_map(x)
    if name == "hedgehog":
        if weight is None:
            raise ValueError("the hedgehog feature map needs its weight [heads, head_dim, feature_dim]")
        return hedgehog_feature_map(x, weight)
    raise ValueError(f"unknown feature_map {name!r}; choose one of {', '.join(FEATURE_MAPS)}")


def feature_map_dim(name: str, head_dim: int, hedgehog_dim: int | None = None) -> int:
    """Width F of the features `feature_map(name, ...)` gives for heads of `head_dim` (hedgehog: 2 * its width,
    `head_dim` unless given)."""
    if name in ("elu", "relu"):
        return head_dim
    if name == "taylor":
        return 1 + head_dim + head_dim * (head_dim + 1) // 2
    if name == "hedgehog":
        return 2 * (hedgehog_dim or head_dim)
    raise ValueError(f"unknown feature_map {name!r}; choose one of {', '.join(FEATURE_MAPS)}")
