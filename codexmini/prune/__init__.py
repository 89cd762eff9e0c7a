"""Structured pruning. So far: depth (whole layers) by block influence."""

from .depth import block_influence, select_layers

__all__ = ["block_influence", "select_layers"]
