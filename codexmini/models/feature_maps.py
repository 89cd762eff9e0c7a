"""Feature maps phi(.) of linear attention: phi(q) . phi(k) stands in for exp(q . k / sqrt(d)).

Each takes `[B, H, T, D]` and returns `[B, H, T, F]` with non-negative features (Taylor's kernel value is positive
even where single features are negative), so the normaliser `sum_j phi(q) . phi(k_j)` stays positive.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class EluFeatureMap(nn.Module):
    """elu(x) + 1 (Katharopoulos et al., 2020)."""

    def out_dim(self, head_dim: int) -> int:
        return head_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.elu(x) + 1.0


class ReluFeatureMap(nn.Module):
    """relu(x): sparse features; rows that are all zero give a zero output (the normaliser carries an epsilon)."""

    def out_dim(self, head_dim: int) -> int:
        return head_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x)


class TaylorFeatureMap(nn.Module):
    """2nd-order Taylor expansion of exp (Based): phi(q).phi(k) = 1 + q.k/sqrt(d) + (q.k)^2 / (2 d).

    The quadratic term keeps only the d(d+1)/2 distinct products x_i x_j (i <= j), off-diagonal ones scaled by
    sqrt(2), which gives the same inner product as the full d^2 outer product at about half the width.
    """

    def __init__(self, head_dim: int):
        super().__init__()
        self.head_dim = head_dim
        # Index tables are derived from head_dim and built on first use, not kept as buffers: from_pretrained
        # materialises modules on the meta device and would leave such buffers uninitialised.
        self._pairs: dict = {}

    def pairs(self, device):
        if device not in self._pairs:
            rows, cols = torch.triu_indices(self.head_dim, self.head_dim, device=device)
            weight = torch.where(rows == cols, 1.0, 2.0 ** 0.5).to(device)
            self._pairs[device] = (rows, cols, weight)
        return self._pairs[device]

    def out_dim(self, head_dim: int) -> int:
        return 1 + head_dim + head_dim * (head_dim + 1) // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = x.shape[-1]
        x1 = x / d ** 0.25
        rows, cols, weight = self.pairs(x.device)
        x2 = x[..., rows] * x[..., cols] * weight.to(x.dtype) / (2.0 ** 0.5 * d ** 0.5)
        return torch.cat([torch.ones_like(x[..., :1]), x1, x2], dim=-1)


class HedgehogFeatureMap(nn.Module):
    """Learnable feature map (Hedgehog, Zhang et al. 2024): [softmax(x W_h), softmax(-x W_h)] per head.

    `weight` is `[heads, head_dim, feature_dim]`, initialised to the identity; attention transfer trains it to
    make linear attention mimic the softmax attention it replaces.
    """

    def __init__(self, num_heads: int, head_dim: int, feature_dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_heads, head_dim, feature_dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.weight.copy_(self.identity_weight())

    def identity_weight(self) -> torch.Tensor:
        """`[heads, head_dim, feature_dim]` identity per head: phi starts as [softmax(x), softmax(-x)]."""
        eye = torch.zeros_like(self.weight)
        n = min(eye.shape[1], eye.shape[2])
        eye[:, torch.arange(n), torch.arange(n)] = 1.0
        return eye

    def out_dim(self, head_dim: int) -> int:
        return 2 * self.weight.shape[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, H, T, D] -> [B, H, T, F]; the softmax runs in fp32 so bf16 training stays stable.
        proj = torch.einsum("bhtd,hdf->bhtf", x, self.weight.to(x.dtype)).float()
        return torch.cat([proj.softmax(-1), (-proj).softmax(-1)], dim=-1).to(x.dtype)


def build_feature_map(name: str, num_heads: int, head_dim: int, feature_dim: int) -> nn.Module:
    if name == "elu":
        return EluFeatureMap()
    if name == "relu":
        return ReluFeatureMap()
    if name == "taylor":
        return TaylorFeatureMap(head_dim)
    if name == "hedgehog":
        return HedgehogFeatureMap(num_heads, head_dim, feature_dim)
    raise ValueError(f"unknown feature_map {name!r}; choose one of elu, relu, hedgehog, taylor")
