"""The feature maps of linear attention as modules: what a layer holds (hedgehog's learnable weight), around the
functions in `codexmini.ops.feature_maps`, which define the maps.

Each takes `[B, H, T, D]` and returns `[B, H, T, F]` (F = `out_dim(D)`).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..ops.feature_maps import (elu_feature_map, feature_map_dim, hedgehog_feature_map, relu_feature_map,
                                taylor_feature_map)
from ..ops.names import FEATURE_MAPS


class EluFeatureMap(nn.Module):
    """elu(x) + 1 (Katharopoulos et al., 2020)."""

    def out_dim(self, head_dim: int) -> int:
        return feature_map_dim("elu", head_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return elu_feature_map(x)


class ReluFeatureMap(nn.Module):
    """relu(x): sparse features; rows that are all zero give a zero output (the normaliser carries an epsilon)."""

    def out_dim(self, head_dim: int) -> int:
        return feature_map_dim("relu", head_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return relu_feature_map(x)


class TaylorFeatureMap(nn.Module):
    """2nd-order Taylor expansion of exp (Based): phi(q).phi(k) = 1 + q.k/sqrt(d) + (q.k)^2 / (2 d)."""

    def __init__(self, head_dim: int):
        super().__init__()
        self.head_dim = head_dim

    def out_dim(self, head_dim: int) -> int:
        return feature_map_dim("taylor", head_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return taylor_feature_map(x)


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
        return feature_map_dim("hedgehog", head_dim, self.weight.shape[-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return hedgehog_feature_map(x, self.weight)


def build_feature_map(name: str, num_heads: int, head_dim: int, feature_dim: int) -> nn.Module:
    """The module for feature map `name` (one of `FEATURE_MAPS`) of a layer with `num_heads` heads."""
    if name == "elu":
        return EluFeatureMap()
    if name == "relu":
        return ReluFeatureMap()
    if name == "taylor":
        return TaylorFeatureMap(head_dim)
    if name == "hedgehog":
        return HedgehogFeatureMap(num_heads, head_dim, feature_dim)
    raise ValueError(f"unknown feature_map {name!r}; choose one of {', '.join(FEATURE_MAPS)}")
