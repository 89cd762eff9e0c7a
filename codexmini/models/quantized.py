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

from ..ops.layouts import GroupWeight, Scheme, check_group_size, dequantize


class QuantLinear(nn.Module):
    """A linear layer with int8 or group-quantized (int4 / int3 / int2) weights in the portable layout: `qweight`,
    a float16 `scale` and, for asymmetric schemes only, `zero` (for `_min` schemes a float16 `min`; dequantized in
    forward)."""

    def __init__(self, in_features: int, out_features: int, scheme: str, bias: bool = False):
        super().__init__()
        self.in_features, self.out_features, self.scheme = in_features, out_features, Scheme(scheme)
        s = self.scheme
        if s.bits == 8:
            self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8))
            self.register_buffer("scale", torch.ones(out_features, dtype=torch.float16))
        elif s.group_size is not None:
            g = s.group_size
            check_group_size(in_features, g, bits=s.bits)
            self.register_buffer("qweight", torch.zeros(out_features, s.packed_cols(in_features), dtype=torch.uint8))
            self.register_buffer("scale", torch.ones(out_features, in_features // g, dtype=torch.float16))
            if s.stores_zero:
                self.register_buffer("zero", torch.zeros((out_features, in_features // g), dtype=torch.uint8))
            if s.stores_min:
                self.register_buffer("min", torch.zeros((out_features, in_features // g), dtype=torch.float16))
        else:
            raise ValueError("QuantLinear needs an int8 or a group (int4 / int3 / int2) scheme")
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    @classmethod
    def from_codes(cls, scheme: str, codes, bias: torch.Tensor | None = None) -> QuantLinear:
        """From `(int8 codes, scale)` or a `GroupWeight`."""
        if isinstance(codes, GroupWeight):
            m = cls(codes.in_features, codes.packed.shape[0], scheme, bias is not None)
            m.load_codes(codes)
        else:
            q, scale = codes
            m = cls(q.shape[1], q.shape[0], scheme, bias is not None)
            m.load_codes(codes)
        if bias is not None:
            m.bias.data.copy_(bias)
        return m

    def load_codes(self, codes) -> None:
        """Copy `(int8 codes, scale)` or a `GroupWeight` into this module's buffers."""
        if isinstance(codes, GroupWeight):
            if codes.bits != self.scheme.bits:
                raise ValueError(f"{codes.bits}-bit codes for a {self.scheme.name} layer")
            self.qweight.copy_(codes.packed)
            self.scale.copy_(codes.scale)
            if self.scheme.stores_zero:
                self.zero.copy_(codes.zero)
            if self.scheme.stores_min:
                if codes.min is None:
                    raise ValueError(f"codes without mins for a {self.scheme.name} layer")
                self.min.copy_(codes.min)
        else:
            self.qweight.copy_(codes[0])
            self.scale.copy_(codes[1])

    def dequantized_weight(self) -> torch.Tensor:
        """The float32 weight `[out, in]`."""
        return dequantize(self.scheme, self.qweight, self.scale, getattr(self, "zero", None),
                          getattr(self, "min", None))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.dequantized_weight().to(x.dtype)
        return F.linear(x, w, self.bias.to(x.dtype) if self.bias is not None else None)

    def storage_bits(self) -> int:
        return sum(b.numel() * b.element_size() * 8 for b in self.buffers())

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, scheme={self.scheme.name}"


class QuantEmbedding(QuantLinear):
    """An embedding table in a quantized layout (int8 rows or groups along each row): a `QuantLinear` whose
    outputs are the tokens. Lookups dequantize only the rows they read; a tied output head (`unembed`) computes
    with the same quantized matrix, so the table is stored once, as llama.cpp keeps one `token_embd`."""

    def __init__(self, num_embeddings: int, embedding_dim: int, scheme: str = "int8"):
        super().__init__(embedding_dim, num_embeddings, scheme)
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        rows = dequantize(self.scheme, self.qweight[flat], self.scale[flat],
                          self.zero[flat] if self.scheme.stores_zero else None,
                          self.min[flat] if self.scheme.stores_min else None)
        return rows.reshape(*ids.shape, self.embedding_dim)

    def unembed(self, hidden: torch.Tensor) -> torch.Tensor:
        """The tied head: `hidden @ table^T` through the quantized table."""
        return QuantLinear.forward(self, hidden)

    def extra_repr(self) -> str:
        return f"num_embeddings={self.num_embeddings}, embedding_dim={self.embedding_dim}, scheme={self.scheme.name}"


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
    # a QuantEmbedding is a QuantLinear (rows = tokens): counted once, by its logical shape
    return n + sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, QuantLinear))
