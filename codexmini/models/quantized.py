"""Quantized linear layers holding the portable packed weight layout.

Part of the model definition (a config's `quantization_scheme` makes `from_pretrained` rebuild these modules), so
it lives with the models; the layout itself, its scheme names and its numerics (pack / unpack, quantize /
dequantize) are `codexmini.ops.layouts`, and finding the codes (RTN, GPTQ, AWQ) is the `quantize` package's work.

`QuantLinear` computes with the dequantized weight: the reference every faster kernel is tested against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.layouts import Int4Weight, Scheme, check_group_size, dequantize, dequantize_int8


class QuantLinear(nn.Module):
    """A linear layer with int8 or int4 weights in the portable layout (dequantized in forward)."""

    def __init__(self, in_features: int, out_features: int, scheme: str, bias: bool = False):
        super().__init__()
        self.in_features, self.out_features, self.scheme = in_features, out_features, Scheme(scheme)
        s = self.scheme
        if s.bits == 8:
            self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8))
            self.register_buffer("scale", torch.ones(out_features))
        elif s.bits == 4:
            g = s.group_size
            check_group_size(in_features, g)
            self.register_buffer("qweight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8))
            self.register_buffer("scale", torch.ones(out_features, in_features // g))
            self.register_buffer("zero", torch.full((out_features, in_features // g), 8, dtype=torch.uint8))
        else:
            raise ValueError("QuantLinear needs an int8 or int4 scheme")
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    @classmethod
    def from_codes(cls, scheme: str, codes, bias: torch.Tensor | None = None) -> QuantLinear:
        """From `(int8 codes, scale)` or an `Int4Weight`."""
        if isinstance(codes, Int4Weight):
            out, inp = codes.packed.shape[0], codes.in_features
            m = cls(inp, out, scheme, bias is not None)
            m.qweight.copy_(codes.packed)
            m.scale.copy_(codes.scale)
            m.zero.copy_(codes.zero)
        else:
            q, scale = codes
            m = cls(q.shape[1], q.shape[0], scheme, bias is not None)
            m.qweight.copy_(q)
            m.scale.copy_(scale)
        if bias is not None:
            m.bias.data.copy_(bias)
        return m

    def dequantized_weight(self) -> torch.Tensor:
        """The float32 weight `[out, in]`."""
        return dequantize(self.scheme, self.qweight, self.scale, getattr(self, "zero", None))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.dequantized_weight().to(x.dtype)
        return F.linear(x, w, self.bias.to(x.dtype) if self.bias is not None else None)

    def storage_bits(self) -> int:
        return sum(b.numel() * b.element_size() * 8 for b in self.buffers())

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, scheme={self.scheme.name}"


class QuantEmbedding(nn.Module):
    """An embedding table in int8, one scale per row (the int8 layout of `QuantLinear`, rows = tokens).

    Lookups dequantize only the rows they read."""

    def __init__(self, num_embeddings: int, embedding_dim: int, scheme: str = "int8"):
        super().__init__()
        if scheme != "int8":
            raise ValueError(f"embedding tables support the int8 scheme only, got {scheme!r}")
        self.num_embeddings, self.embedding_dim, self.scheme = num_embeddings, embedding_dim, Scheme(scheme)
        self.register_buffer("qweight", torch.zeros(num_embeddings, embedding_dim, dtype=torch.int8))
        self.register_buffer("scale", torch.ones(num_embeddings))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return dequantize_int8(F.embedding(ids, self.qweight), self.scale[ids])

    def dequantized_weight(self) -> torch.Tensor:
        return dequantize_int8(self.qweight, self.scale)

    def storage_bits(self) -> int:
        return sum(b.numel() * b.element_size() * 8 for b in self.buffers())


def install_quant_linears(model: nn.Module, schemes: dict[str, str]) -> None:
    """Replace the named `nn.Linear` (and `nn.Embedding`) modules by empty quantized modules of the same shape,
    ready for loading."""
    for name, scheme in schemes.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        old = getattr(parent, child)
        if isinstance(old, (QuantLinear, QuantEmbedding)):
            continue
        if isinstance(old, nn.Embedding):
            setattr(parent, child, QuantEmbedding(old.num_embeddings, old.embedding_dim, scheme))
            continue
        if not isinstance(old, nn.Linear):
            raise ValueError(f"quantization_scheme names {name!r}, which is a {type(old).__name__}, not a Linear "
                             "or an Embedding")
        setattr(parent, child, QuantLinear(old.in_features, old.out_features, scheme, old.bias is not None))


def weight_count(model: nn.Module) -> int:
    """Parameters of the float model: float parameters plus the logical weights of every `QuantLinear`."""
    n = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    n += sum(m.num_embeddings * m.embedding_dim for m in model.modules() if isinstance(m, QuantEmbedding))
    return n + sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, QuantLinear))
