"""Quantized linear layers and the portable packed weight layout they hold.

Part of the model definition (a config's `quantization_scheme` makes `from_pretrained` rebuild these modules), so
it lives with the models; finding the codes (RTN, GPTQ, AWQ) is the `quantize` package's work.

Layouts (what a checkpoint stores; a runtime repacks for its kernel at load time):
- int8: `qweight [out, in] int8`, `scale [out] float32`;  w ~= qweight * scale  (symmetric, per output channel).
- int4: `qweight [out, in/2] uint8` with element 2j in the low nibble and 2j+1 in the high nibble,
  `scale [out, in/g] float32`, `zero [out, in/g] uint8`;  w ~= (code - zero) * scale for each group of g inputs.
  Symmetric int4 uses zero = 8 and codes 1..15 (so the grid is -7..7 and 0 is exact); asymmetric uses the full
  0..15 range with a per-group zero point.

`QuantLinear` computes with the dequantized weight: the reference every faster kernel is tested against.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class Int4Weight:
    packed: torch.Tensor  # [out, in/2] uint8
    scale: torch.Tensor  # [out, in/group] float32
    zero: torch.Tensor  # [out, in/group] uint8
    group_size: int
    in_features: int


def dequantize_int8(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return codes.float() * scale[:, None]


def dequantize_int4(q: Int4Weight) -> torch.Tensor:
    codes = unpack_int4(q.packed).float()
    out_features = codes.shape[0]
    g = codes.reshape(out_features, -1, q.group_size)
    return ((g - q.zero.float()[..., None]) * q.scale[..., None]).reshape(out_features, q.in_features)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """`[out, in]` codes 0..15 -> `[out, in/2]` bytes, element 2j in the low nibble."""
    if codes.shape[-1] % 2:
        raise ValueError(f"int4 packing needs an even number of columns, got {codes.shape[-1]}")
    if codes.numel() and int(codes.max()) > 15:
        raise ValueError("int4 codes must be in 0..15")
    c = codes.to(torch.uint8)
    return c[..., 0::2] | (c[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_int4`: `[out, in/2]` bytes -> `[out, in]` codes 0..15 (uint8)."""
    low, high = packed & 0x0F, packed >> 4
    return torch.stack([low, high], dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)


SCHEME_RE = re.compile(r"^(?:int8|int4_g(\d+)(_asym)?|none)$")


@dataclass(frozen=True)
class Scheme:
    """`int8` (per output channel, symmetric), `int4_g<group>` (symmetric) or `int4_g<group>_asym`; `none`."""

    name: str

    def __post_init__(self):
        if not SCHEME_RE.match(self.name):
            raise ValueError(f"quantization scheme {self.name!r} is not one of int8, int4_g<group> (e.g. int4_g32), "
                             "int4_g<group>_asym, none")

    @property
    def bits(self) -> int:
        return {"int8": 8, "none": 32}.get(self.name, 4)

    @property
    def group_size(self) -> int | None:
        m = SCHEME_RE.match(self.name)
        return int(m.group(1)) if m.group(1) else None

    @property
    def symmetric(self) -> bool:
        return not self.name.endswith("_asym")


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
            if g < 2 or g % 2 or in_features % g:
                raise ValueError(f"int4 group size {g} does not divide in_features {in_features}")
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
        if self.scheme.bits == 8:
            return dequantize_int8(self.qweight, self.scale)
        return dequantize_int4(Int4Weight(self.qweight, self.scale, self.zero, self.scheme.group_size,
                                          self.in_features))

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
        return F.embedding(ids, self.qweight).float() * self.scale[ids][..., None]

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
