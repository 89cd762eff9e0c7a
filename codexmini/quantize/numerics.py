"""Weight quantization numerics: int8 per output channel, int4 per group (round to nearest).

These functions turn float weights into integer codes plus scales, nothing else; the layout they produce and its
decoding live in `codexmini.models.quantized` (see its docstring for the byte layout).
"""

from __future__ import annotations

import torch

from ..models.quantized import Int4Weight, Scheme, dequantize_int4, dequantize_int8, pack_int4, unpack_int4

__all__ = ["Int4Weight", "bits_per_weight", "check_group_size", "dequantize_int4", "dequantize_int8", "fake_quant",
           "pack_int4", "quantize_int4", "quantize_int8", "quantize_rtn", "unpack_int4"]


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: returns (codes int8 [out, in], scale float32 [out])."""
    w = w.float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
    codes = torch.clamp(torch.round(w / scale[:, None]), -127, 127).to(torch.int8)
    return codes, scale


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


def bits_per_weight(q: Int4Weight) -> float:
    """Storage cost including scales (fp32) and zero points (one byte each)."""
    n = q.packed.shape[0] * q.in_features
    total_bits = q.packed.numel() * 8 + q.scale.numel() * 32 + q.zero.numel() * 8
    return total_bits / n


def quantize_rtn(w: torch.Tensor, scheme: str):
    """Round to nearest in a scheme by name: int8 `(codes, scale)` or an `Int4Weight`."""
    s = Scheme(scheme)
    if s.bits == 8:
        return quantize_int8(w)
    return quantize_int4(w, s.group_size, s.symmetric)


def fake_quant(w: torch.Tensor, scheme: str) -> torch.Tensor:
    """`dequantize(quantize(w))` on the scheme's round-to-nearest grid."""
    codes = quantize_rtn(w, scheme)
    return dequantize_int4(codes) if isinstance(codes, Int4Weight) else dequantize_int8(*codes)
