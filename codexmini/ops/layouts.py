"""Quantization schemes and the portable int layouts: pack, unpack, quantize (round to nearest), dequantize.

This is what a checkpoint and a `.cmx` file store, and the reference every kernel is tested against (a runtime
repacks for its kernel at load time; the layout in the file stays this one):

- `int8`: `qweight [out, in] int8`, `scale [out] float32`; `w ~= qweight * scale` (symmetric, per output channel,
  codes -127..127).
- `int4_g<G>`: `qweight [out, in/2] uint8` with element 2j in the low nibble and 2j+1 in the high nibble,
  `scale [out, in/G] float32`, `zero [out, in/G] uint8`; `w ~= (code - zero) * scale` for each group of G inputs.
  Symmetric int4 uses zero = 8 and codes 1..15 (so the grid is -7..7 and 0 is exact); `int4_g<G>_asym` uses the
  full 0..15 range with a per-group zero point.
- `none`: a float layer (a rule's way of saying "leave this one").

The scheme is named in the checkpoint's config / the file's manifest, never recovered from a file name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

SCHEME_RE = re.compile(r"^(?:int8|int4_g(\d+)(_asym)?|none)$")
SCHEME_CHOICES = "int8, int4_g<group> (e.g. int4_g32), int4_g<group>_asym, none"


@dataclass(frozen=True)
class Scheme:
    """A parsed scheme name: `int8`, `int4_g<group>` (symmetric), `int4_g<group>_asym`, or `none`.

    Raises:
        ValueError: the name is not one of those.
    """

    name: str

    def __post_init__(self):
        if not SCHEME_RE.match(str(self.name)):
            raise ValueError(f"quantization scheme {self.name!r} is not one of {SCHEME_CHOICES}")

    @property
    def bits(self) -> int:
        """8, 4, or 32 for `none` (a float layer)."""
        return {"int8": 8, "none": 32}.get(self.name, 4)

    @property
    def group_size(self) -> int | None:
        """Inputs per (scale, zero) group of an int4 scheme; None for int8 / none."""
        m = SCHEME_RE.match(self.name)
        return int(m.group(1)) if m.group(1) else None

    @property
    def symmetric(self) -> bool:
        return not self.name.endswith("_asym")


@dataclass
class Int4Weight:
    """An int4 weight in the portable layout (see the module docstring)."""

    packed: torch.Tensor  # [out, in/2] uint8
    scale: torch.Tensor  # [out, in/group] float32
    zero: torch.Tensor  # [out, in/group] uint8
    group_size: int
    in_features: int


# --------------------------------------------------------------------------- int4 packing
def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Two int4 codes per byte, element 2j in the low nibble.

    Args:
        codes: `[..., in]` integer codes 0..15, `in` even.

    Returns:
        `[..., in/2]` uint8.
    """
    if codes.shape[-1] % 2:
        raise ValueError(f"int4 packing needs an even number of columns, got {codes.shape[-1]}")
    if codes.numel() and int(codes.max()) > 15:
        raise ValueError("int4 codes must be in 0..15")
    c = codes.to(torch.uint8)
    return c[..., 0::2] | (c[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_int4`: `[..., in/2]` uint8 -> `[..., in]` uint8 codes 0..15."""
    low, high = packed & 0x0F, packed >> 4
    return torch.stack([low, high], dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)


# --------------------------------------------------------------------------- int8
def grid(w: torch.Tensor, bits: int, symmetric: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The round-to-nearest grid of each row of values: scale and zero point over the last dimension.

    Args:
        w: `[..., n]` float values sharing one grid per row (an int8 output channel, an int4 group).
        bits: 8 (symmetric, codes -127..127, zero 0) or 4 (codes 0..15).
        symmetric: int4 only: zero = 8 and codes 1..15 (0 exact), else a per-row zero point over 0..15.

    Returns:
        scale `[...]` and zero `[...]` (float32; the zero point is a whole number).
    """
    if bits == 8:
        return w.abs().amax(dim=-1).clamp(min=1e-12) / 127.0, torch.zeros(w.shape[:-1])
    if symmetric:
        scale = w.abs().amax(dim=-1).clamp(min=1e-12) / 7.0
        return scale, torch.full_like(scale, 8.0)
    # The grid keeps 0 representable (integer zero point in 0..15), so the range is widened to include it.
    lo, hi = w.amin(dim=-1).clamp(max=0), w.amax(dim=-1).clamp(min=0)
    scale = ((hi - lo) / 15.0).clamp(min=1e-12)
    return scale, torch.clamp(torch.round(-lo / scale), 0, 15)


def to_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Round `w` onto the grid (scale, zero broadcast against it): float codes, -127..127 (int8) or 0..15 (int4)."""
    if bits == 8:
        return torch.clamp(torch.round(w / scale), -127, 127)
    return torch.clamp(torch.round(w / scale) + zero, 0, 15)


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8, round to nearest.

    Args:
        w: `[out, in]` float weight.

    Returns:
        codes `[out, in]` int8 in -127..127, scale `[out]` float32.
    """
    scale, zero = grid(w.float(), 8)
    return to_codes(w.float(), scale[:, None], zero[:, None], 8).to(torch.int8), scale


def dequantize_int8(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """`codes * scale` per row, in float32.

    Args:
        codes: `[..., out, in]` int8 (or the rows an embedding lookup picked, `[..., in]` with `scale [...]`).
        scale: `[..., out]`, one per row of `codes`.

    Returns:
        float32, the shape of `codes`.
    """
    return codes.float() * scale.float()[..., None]


# --------------------------------------------------------------------------- int4
def check_group_size(in_features: int, group_size: int, name: str = "weight") -> None:
    """Raise a ValueError naming `name` unless `group_size` is even, >= 2 and divides `in_features`."""
    if group_size < 2 or group_size % 2:
        raise ValueError(f"int4 group_size must be an even number >= 2, got {group_size}")
    if in_features % group_size:
        raise ValueError(f"{name}: int4 group_size {group_size} does not divide its input width {in_features}; "
                         "choose a group size that divides it or keep this layer at int8")


def quantize_int4(w: torch.Tensor, group_size: int = 32, symmetric: bool = True) -> Int4Weight:
    """Round-to-nearest int4 per group of `group_size` input columns.

    Args:
        w: `[out, in]` float weight, `in` divisible by `group_size`.
        group_size: inputs sharing one (scale, zero) pair.
        symmetric: zero = 8 and codes 1..15 (0 exact), else a per-group zero point over the full 0..15 range.
    """
    out_features, in_features = w.shape
    check_group_size(in_features, group_size)
    g = w.float().reshape(out_features, in_features // group_size, group_size)
    scale, zero = grid(g, 4, symmetric)
    codes = to_codes(g, scale[..., None], zero[..., None], 4).to(torch.uint8)
    return Int4Weight(pack_int4(codes.reshape(out_features, in_features)), scale, zero.to(torch.uint8),
                      group_size, in_features)


def dequantize_int4(q: Int4Weight) -> torch.Tensor:
    """`(code - zero) * scale` per group: the float32 weight `[out, in]`."""
    codes = unpack_int4(q.packed).float()
    out_features = codes.shape[0]
    g = codes.reshape(out_features, -1, q.group_size)
    return ((g - q.zero.float()[..., None]) * q.scale.float()[..., None]).reshape(out_features, q.in_features)


# --------------------------------------------------------------------------- by scheme
def quantize_rtn(w: torch.Tensor, scheme: str | Scheme):
    """Round to nearest in a scheme: int8 `(codes, scale)` or an `Int4Weight` (w `[out, in]`)."""
    s = scheme if isinstance(scheme, Scheme) else Scheme(scheme)
    if s.bits == 8:
        return quantize_int8(w)
    if s.bits == 4:
        return quantize_int4(w, s.group_size, s.symmetric)
    raise ValueError(f"scheme {s.name!r} does not quantize")


def dequantize(scheme: str | Scheme, qweight: torch.Tensor, scale: torch.Tensor,
               zero: torch.Tensor | None = None) -> torch.Tensor:
    """The float32 weight `[out, in]` of a layer stored in `scheme` (its `qweight`, `scale` and, for int4, `zero`)."""
    s = scheme if isinstance(scheme, Scheme) else Scheme(scheme)
    if s.bits == 8:
        return dequantize_int8(qweight, scale)
    if s.bits == 4:
        if zero is None:
            raise ValueError(f"scheme {s.name!r} needs the zero points")
        return dequantize_int4(Int4Weight(qweight, scale, zero, s.group_size, qweight.shape[-1] * 2))
    raise ValueError(f"scheme {s.name!r} has no quantized layout")


def fake_quant(w: torch.Tensor, scheme: str | Scheme) -> torch.Tensor:
    """`dequantize(quantize(w))` on the scheme's round-to-nearest grid (w `[out, in]`, float32 result)."""
    codes = quantize_rtn(w, scheme)
    return dequantize_int4(codes) if isinstance(codes, Int4Weight) else dequantize_int8(*codes)
