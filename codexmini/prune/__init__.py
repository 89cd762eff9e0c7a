"""Structured pruning: depth (whole layers) and width (heads, MLP channels, hidden size) on torch-pruning."""

from .depth import block_influence, contiguous_block, select_layers
from .width import PruneConfig, check_config, prune, prune_width, target_sizes

__all__ = ["PruneConfig", "block_influence", "check_config", "contiguous_block", "prune", "prune_width",
           "select_layers", "target_sizes"]
