"""Weight quantization numerics: int8 per output channel, int4 per group; the portable packed layout.

Kept apart from module swapping (gpt-fast's split): these functions turn float weights into integer codes plus
scales and back, nothing else.

Layouts (what a checkpoint stores; a runtime repacks for its kernel at load time):
- int8: `codes [out, in] int8`, `scale [out] float32`;  w ~= codes * scale  (symmetric, per output channel).
- int4: `packed [out, in/2] uint8` with element 2j in the low nibble and 2j+1 in the high nibble,
  `scale [out, in/g] float32`, `zero [out, in/g] uint8`;  w ~= (code - zero) * scale for each group of g inputs.
  Symmetric int4 uses zero = 8 and codes 1..15 (so the grid is -7..7 and 0 is exact); asymmetric uses the full
  0..15 range with a per-group zero point.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Int4Weight:
    packed: torch.Tensor  # [out, in/2] uint8
    scale: torch.Tensor  # [out, in/group] float32
    zero: torch.Tensor  # [out, in/group] uint8
    group_size: int
    in_features: int


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: returns (codes int8 [out, in], scale float32 [out])."""
    w = w.float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
    codes = torch.clamp(torch.round(w / scale[:, None]), -127, 127).to(torch.int8)
    return codes, scale


def dequantize_int8(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return codes.float() * scale[:, None]


def check_group_size(in_features: int, group_size: int, name: str = "weight") -> None:
    if group_size < 2 or group_size % 2:
        raise ValueError(f"int4 group_size must be an even number >= 2, got {group_size}")
    if in_features % group_size:
        raise ValueError(f"{name}: int4 group_size {group_size} does not divide its input width {in_features}; "
                         "choose a group size that divides it or keep this layer at int8")


def quantize_int4(w: torch.Tensor, group_size: int = 32, symmetric: bool = True) -> Int4Weight:
    """Round-to-nearest int4 per group of `group_size` input columns."""
    out_features, in_features = w.shape
    check_group_size(in_features, group_size)
    g = w.float().reshape(out_features, in_features // group_size, group_size)
    if symmetric:
        scale = g.abs().amax(dim=-1).clamp(min=1e-12) / 7.0
        zero = torch.full_like(scale, 8.0)
    else:
        # The grid keeps 0 representable (integer zero point in 0..15), so the range is widened to include it.
        lo, hi = g.amin(dim=-1).clamp(max=0), g.amax(dim=-1).clamp(min=0)
        scale = ((hi - lo) / 15.0).clamp(min=1e-12)
        zero = torch.clamp(torch.round(-lo / scale), 0, 15)
    codes = torch.clamp(torch.round(g / scale[..., None]) + zero[..., None], 0, 15).to(torch.uint8)
    return Int4Weight(pack_int4(codes.reshape(out_features, in_features)), scale, zero.to(torch.uint8),
                      group_size, in_features)


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


def bits_per_weight(q: Int4Weight) -> float:
    """Storage cost including scales (fp32) and zero points (one byte each)."""
    n = q.packed.shape[0] * q.in_features
    total_bits = q.packed.numel() * 8 + q.scale.numel() * 32 + q.zero.numel() * 8
    return total_bits / n
