"""Swapping modules and counting storage bits (which scheme each module gets: `codexmini.models.qat`)."""

from __future__ import annotations

from torch import nn

from ..models.quantized import QuantLinear


def replace_linear(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def model_bits_per_weight(model: nn.Module) -> float:
    """Storage bits of all weights (quantized buffers with scales and zero points, float parameters as stored)
    over the number of weights the float model has."""
    bits, weights = 0, 0
    seen = set()
    for mod in model.modules():
        if isinstance(mod, QuantLinear):  # a QuantEmbedding too
            bits += mod.storage_bits()
            weights += mod.in_features * mod.out_features
            continue
        for p in mod.parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            bits += p.numel() * p.element_size() * 8
            weights += p.numel()
    return bits / max(weights, 1)
