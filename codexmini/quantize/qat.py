"""Quantization-aware training: linear weights pass through fake quantization with a straight-through estimator.

While `fake_quantized(model, schemes)` is active, each named linear layer computes with `dequantize(quantize(W))`
(the exact grid the quantize stage will use) and the gradient flows to the float W as if rounding were the
identity. Training under it (e.g. a distillation stage) teaches the float weights to sit well on the grid;
leaving it restores plain float layers holding the trained weights, ready for the quantize stage.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.nn.utils import parametrize

from .numerics import fake_quant


class FakeQuant(nn.Module):
    """A weight parametrization: forward value on the grid, gradient straight through."""

    def __init__(self, scheme: str):
        super().__init__()
        self.scheme = scheme

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            q = fake_quant(w.detach().float(), self.scheme).to(w.dtype)
        return w + (q - w).detach()


@contextmanager
def fake_quantized(model: nn.Module, schemes: dict[str, str]) -> Iterator[nn.Module]:
    """Fake-quantize the named linear layers' weights for the duration of the block."""
    done = []
    try:
        for name, scheme in schemes.items():
            mod = model.get_submodule(name)
            parametrize.register_parametrization(mod, "weight", FakeQuant(scheme))
            done.append(mod)
        yield model
    finally:
        for mod in done:
            # Keep the trained float weights (the quantize stage rounds them afterwards).
            parametrize.remove_parametrizations(mod, "weight", leave_parametrized=False)
