"""Quantization schemes and the portable int layouts: pack, unpack, quantize, dequantize.

This is what a checkpoint and a `.cmx` file store, and the reference every kernel is tested against (a runtime
may repack for its kernel at load time; the layout in the file stays this one). Scales are float16 (their values
are fp16-exact wherever they are computed, so storing them loses nothing):

- `int8`: `qweight [out, in] int8`, `scale [out]`; `w ~= qweight * scale` (symmetric, per output channel, codes
  -127..127).
- `int<b>_g<G>` for b = 4, 3, 2: `qweight [out, in*b/8] uint8` (see "packing" below), `scale [out, in/G]`;
  `w ~= (code - 2^(b-1)) * scale` for each group of G inputs, codes 0..2^b-1. Symmetric: the zero point is the
  middle code, implied (not stored), and the scale is signed so the group's largest-magnitude weight lands exactly
  on the end code -2^(b-1) (llama.cpp's Q4_0 grid: 16 levels at 4 bits, 0 exact).
- `int<b>_g<G>_asym`: as above plus `zero [out, in/G] uint8`; `w ~= (code - zero) * scale`, a per-group integer
  zero point over the full code range (0 stays exact).
- `none`: a float layer (a rule's way of saying "leave this one").

Packing, per row: int4 two codes per byte, element 2j in the low nibble; int2 four per byte, element 4j+k in bits
2k..2k+1; int3 in two planes, the low two bits of every element as int2 (`in/4` bytes) followed by the high bit
of every element (`in/8` bytes, element 8j+k in bit k).

Rounding: `grid` is round-to-nearest on each group's range; `search_grid` tries a set of scales (or clipped
ranges) per group and keeps the one with the least importance-weighted squared error, refitting the scale by least
squares for the codes it chose (llama.cpp's make_qx_quants idea); the importance of an input column is the mean
square of the activations it multiplies (an "importance matrix"), uniform without calibration data.

The scheme is named in the checkpoint's config / the file's manifest, never recovered from a file name.
Files of `.cmx` version 2 and older stored fp32 scales and a zero tensor for symmetric int4 too (codes 1..15);
they read with the same formula.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

SCHEME_RE = re.compile(r"^(?:int8|int([234])_g(\d+)(_asym)?|none)$")
SCHEME_CHOICES = "int8, int<bits>_g<group> for bits 4/3/2 (e.g. int4_g32), int<bits>_g<group>_asym, none"
LOW_BITS = (2, 3, 4)
FP16_TINY = 2.0 ** -24  # the smallest fp16 (subnormal): a scale floor that survives the cast
FP16_MAX = 65504.0


@dataclass(frozen=True)
class Scheme:
    """A parsed scheme name: `int8`, `int<b>_g<group>` (symmetric), `int<b>_g<group>_asym`, or `none`.

    Raises:
        ValueError: the name is not one of those.
    """

    name: str

    def __post_init__(self):
        if not SCHEME_RE.match(str(self.name)):
            raise ValueError(f"quantization scheme {self.name!r} is not one of {SCHEME_CHOICES}")

    @property
    def bits(self) -> int:
        """8, 4, 3, 2, or 32 for `none` (a float layer)."""
        m = SCHEME_RE.match(self.name)
        return int(m.group(1)) if m.group(1) else {"int8": 8, "none": 32}[self.name]

    @property
    def group_size(self) -> int | None:
        """Inputs per (scale, zero) group of a group scheme; None for int8 / none."""
        m = SCHEME_RE.match(self.name)
        return int(m.group(2)) if m.group(2) else None

    @property
    def symmetric(self) -> bool:
        return not self.name.endswith("_asym")

    @property
    def stores_zero(self) -> bool:
        """Whether the layout holds a `zero` tensor (asymmetric group schemes)."""
        return self.group_size is not None and not self.symmetric

    def packed_cols(self, in_features: int) -> int:
        """Bytes (int8: codes) per row of `qweight` for `in_features` inputs."""
        return in_features if self.bits == 8 else in_features * self.bits // 8

    def bits_per_weight(self, in_features: int | None = None) -> float:
        """Stored bits per weight: codes plus fp16 scales (and zero points); int8's per-row scale is counted over
        `in_features` inputs when given."""
        if self.bits == 32:
            return 32.0
        if self.bits == 8:
            return 8.0 + (16.0 / in_features if in_features else 0.0)
        return self.bits + (16 + (8 if self.stores_zero else 0)) / self.group_size


@dataclass
class GroupWeight:
    """A group-quantized weight in the portable layout (see the module docstring). `zero` is always a full tensor
    here (the implied middle code for symmetric schemes); the file and `QuantLinear` store it only when asymmetric."""

    packed: torch.Tensor  # [out, in*bits/8] uint8
    scale: torch.Tensor  # [out, in/group] float16
    zero: torch.Tensor  # [out, in/group] uint8
    group_size: int
    in_features: int
    bits: int = 4


Int4Weight = GroupWeight  # the int4 case's historical name


# --------------------------------------------------------------------------- packing
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


def _pack_fields(c: torch.Tensor, width: int) -> torch.Tensor:
    """`8/width` fields of `width` bits per byte, element k of each run in bits k*width.. (c uint8, fitting)."""
    per = 8 // width
    c = c.reshape(*c.shape[:-1], -1, per)
    out = torch.zeros(c.shape[:-1], dtype=torch.uint8)
    for k in range(per):
        out |= c[..., k] << (k * width)
    return out


def _unpack_fields(packed: torch.Tensor, width: int) -> torch.Tensor:
    per, mask = 8 // width, (1 << width) - 1
    parts = [(packed >> (k * width)) & mask for k in range(per)]
    return torch.stack(parts, dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * per)


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes `[..., in]` (0..2^bits-1) in the packed layout of `bits` = 4, 3 or 2 (module docstring):
    `[..., in*bits/8]` uint8."""
    if bits == 4:
        return pack_int4(codes)
    if bits not in LOW_BITS:
        raise ValueError(f"no packed layout for {bits}-bit codes (known: {LOW_BITS})")
    n = codes.shape[-1]
    if n % (4 if bits == 2 else 8):
        raise ValueError(f"int{bits} packing needs the number of columns to be a multiple of "
                         f"{4 if bits == 2 else 8}, got {n}")
    if codes.numel() and int(codes.max()) >= 1 << bits:
        raise ValueError(f"int{bits} codes must be in 0..{(1 << bits) - 1}")
    c = codes.to(torch.uint8)
    if bits == 2:
        return _pack_fields(c, 2)
    return torch.cat([_pack_fields(c & 3, 2), _pack_fields(c >> 2, 1)], dim=-1)


def unpack_bits(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of `pack_bits`: `[..., in*bits/8]` uint8 -> `[..., in]` uint8 codes."""
    if bits == 4:
        return unpack_int4(packed)
    if bits == 2:
        return _unpack_fields(packed, 2)
    if bits != 3:
        raise ValueError(f"no packed layout for {bits}-bit codes (known: {LOW_BITS})")
    if packed.shape[-1] % 3:
        raise ValueError(f"an int3 row holds a multiple of 3 bytes, got {packed.shape[-1]}")
    n = packed.shape[-1] * 8 // 3
    low, high = packed[..., : n // 4], packed[..., n // 4:]
    return _unpack_fields(low, 2) | (_unpack_fields(high, 1) << 2)


# --------------------------------------------------------------------------- grids
def _fp16_scale(scale: torch.Tensor) -> torch.Tensor:
    """`scale` rounded to float16 values (kept in float32 for the arithmetic), its magnitude floored at fp16's
    smallest; a scale beyond fp16's range is refused (no real weight needs one)."""
    mag = scale.abs()
    if scale.numel() and float(mag.max()) > FP16_MAX:
        raise ValueError(f"a quantization scale of {float(mag.max()):.3g} exceeds float16's range: the weights "
                         "are not finite or far outside any trained model's")
    sign = torch.where(scale < 0, -1.0, 1.0)
    return (sign * mag.clamp(min=FP16_TINY)).half().float()


def grid(w: torch.Tensor, bits: int, symmetric: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The round-to-nearest grid of each row of values: scale and zero point over the last dimension.

    Args:
        w: `[..., n]` float values sharing one grid per row (an int8 output channel, a group).
        bits: 8 (symmetric, codes -127..127, zero 0) or 4 / 3 / 2 (codes 0..2^bits-1).
        symmetric: group schemes only: zero = 2^(bits-1) and a signed scale that puts the largest-magnitude value
            on the end code, else a per-row zero point over the full code range.

    Returns:
        scale `[...]` (fp16-exact values) and zero `[...]` (float32; the zero point is a whole number).
    """
    if bits == 8:
        return _fp16_scale(w.abs().amax(dim=-1) / 127.0), torch.zeros(w.shape[:-1])
    half = float(1 << (bits - 1))
    if symmetric:
        # the signed extreme on code 0: (0 - half) * scale == w_extreme
        extreme = w.gather(-1, w.abs().argmax(dim=-1, keepdim=True)).squeeze(-1)
        return _fp16_scale(extreme / -half), torch.full(w.shape[:-1], half)
    return _asym_grid(w.amin(dim=-1), w.amax(dim=-1), bits)


def _asym_grid(lo: torch.Tensor, hi: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and integer zero point covering [lo, hi] widened to include 0 (so 0 stays representable)."""
    top = float((1 << bits) - 1)
    lo, hi = lo.clamp(max=0), hi.clamp(min=0)
    exact = (hi - lo) / top
    scale = _fp16_scale(exact)
    # rounded up to the next fp16 where rounding went down, so the grid still spans the whole range
    up = torch.nextafter(scale.half(), torch.tensor(float("inf"), dtype=torch.float16)).float()
    scale = torch.where(scale < exact, up, scale)
    return scale, torch.clamp(torch.round(-lo / scale), 0, top)


def to_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Round `w` onto the grid (scale, zero broadcast against it): float codes, -127..127 (int8) or
    0..2^bits-1."""
    if bits == 8:
        return torch.clamp(torch.round(w / scale), -127, 127)
    return torch.clamp(torch.round(w / scale) + zero, 0, float((1 << bits) - 1))


SEARCH_STEPS = 16  # candidate grids per group tried by `search_grid`


def search_grid(w: torch.Tensor, bits: int, symmetric: bool = True, importance: torch.Tensor | None = None,
                steps: int = SEARCH_STEPS) -> tuple[torch.Tensor, torch.Tensor]:
    """Like `grid`, but the grid of each row with the least weighted squared error among `steps` candidates.

    Symmetric: the divisor of the extreme value is varied around 2^(bits-1) and, for the codes each candidate
    gives, the scale is refitted by weighted least squares. Asymmetric: the range is clipped from either end.

    Args:
        w: `[..., n]` rows sharing one grid each.
        importance: `[n]` or broadcastable to `w`: weight of each value's squared error (mean squared activation
            of its input column); None weighs all alike.

    Returns:
        scale and zero as `grid` does (the round-to-nearest grid is always among the candidates).
    """
    w = w.float()
    q = torch.ones_like(w) if importance is None else importance.float().expand_as(w).clamp(min=0)
    q = q + 1e-12  # no all-zero weights: a group nobody reads still gets a sensible grid
    half = float(1 << (bits - 1))
    best_scale, best_zero = grid(w, bits, symmetric)
    best_err = _weighted_error(w, q, best_scale, best_zero, bits)
    if bits == 8 or steps < 2:
        return best_scale, best_zero
    if symmetric:
        extreme = w.gather(-1, w.abs().argmax(dim=-1, keepdim=True)).squeeze(-1)
        for k in range(steps):
            divisor = half - 0.5 + 1.5 * k / (steps - 1)  # half-0.5 .. half+1 (clipping the extreme)
            scale = _fp16_scale(extreme / -divisor)
            signed = to_codes(w, scale[..., None], best_zero[..., None], bits) - half
            # least-squares scale for these codes: sum(q w c) / sum(q c^2)
            num, den = (q * w * signed).sum(-1), (q * signed * signed).sum(-1)
            refit = _fp16_scale(torch.where(den > 0, num / den.clamp(min=1e-30), scale))
            for cand in (scale, refit):
                err = _weighted_error(w, q, cand, best_zero, bits)
                better = err < best_err
                best_scale, best_err = torch.where(better, cand, best_scale), torch.where(better, err, best_err)
        return best_scale, best_zero
    lo, hi = w.amin(dim=-1), w.amax(dim=-1)
    shrink = torch.linspace(1.0, 0.7, max(2, int(steps ** 0.5) + 1))
    for a in shrink:
        for b in shrink:
            scale, zero = _asym_grid(lo * a, hi * b, bits)
            err = _weighted_error(w, q, scale, zero, bits)
            better = err < best_err
            best_scale, best_zero = torch.where(better, scale, best_scale), torch.where(better, zero, best_zero)
            best_err = torch.where(better, err, best_err)
    return best_scale, best_zero


def _weighted_error(w, q, scale, zero, bits):
    codes = to_codes(w, scale[..., None], zero[..., None], bits)
    return (q * (w - (codes - zero[..., None]) * scale[..., None]).pow(2)).sum(-1)


# --------------------------------------------------------------------------- int8
def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8, round to nearest.

    Args:
        w: `[out, in]` float weight.

    Returns:
        codes `[out, in]` int8 in -127..127, scale `[out]` float16.
    """
    scale, zero = grid(w.float(), 8)
    return to_codes(w.float(), scale[:, None], zero[:, None], 8).to(torch.int8), scale.half()


def dequantize_int8(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """`codes * scale` per row, in float32.

    Args:
        codes: `[..., out, in]` int8 (or the rows an embedding lookup picked, `[..., in]` with `scale [...]`).
        scale: `[..., out]`, one per row of `codes`.

    Returns:
        float32, the shape of `codes`.
    """
    return codes.float() * scale.float()[..., None]


# --------------------------------------------------------------------------- group schemes
def check_group_size(in_features: int, group_size: int, name: str = "weight", bits: int = 4) -> None:
    """Raise a ValueError naming `name` unless `group_size` suits `bits` (int4: even >= 2; int3 / int2: a
    multiple of 8) and divides `in_features`."""
    step = 2 if bits == 4 else 8
    if group_size < step or group_size % step:
        raise ValueError(f"int{bits} group_size must be a multiple of {step}"
                         f"{' (and >= 2)' if step == 2 else ''}, got {group_size}")
    if in_features % group_size:
        raise ValueError(f"{name}: int{bits} group_size {group_size} does not divide its input width "
                         f"{in_features}; choose a group size that divides it or keep this layer at int8")


def group_codes(w: torch.Tensor, bits: int, group_size: int, symmetric: bool = True,
                importance: torch.Tensor | None = None, search: bool = False):
    """The groups of `w [out, in]` on their grids: (groups `[out, in/G, G]`, float codes, scale, zero), the grid
    from `grid` or (with `search`) `search_grid` weighted by `importance [in]`."""
    out_features, in_features = w.shape
    check_group_size(in_features, group_size, bits=bits)
    g = w.float().reshape(out_features, in_features // group_size, group_size)
    if search:
        imp = None if importance is None else importance.float().reshape(1, in_features // group_size, group_size)
        scale, zero = search_grid(g, bits, symmetric, imp)
    else:
        scale, zero = grid(g, bits, symmetric)
    return g, to_codes(g, scale[..., None], zero[..., None], bits), scale, zero


def quantize_group(w: torch.Tensor, bits: int = 4, group_size: int = 32, symmetric: bool = True,
                   importance: torch.Tensor | None = None, search: bool = False) -> GroupWeight:
    """Group quantization of `w [out, in]` to `bits` (4, 3, 2): round to nearest on each group's grid, found by
    `grid` or (with `search`) by `search_grid` weighted by `importance [in]`."""
    out_features, in_features = w.shape
    _, codes, scale, zero = group_codes(w, bits, group_size, symmetric, importance, search)
    return GroupWeight(pack_bits(codes.to(torch.uint8).reshape(out_features, in_features), bits), scale.half(),
                       zero.to(torch.uint8), group_size, in_features, bits)


def quantize_int4(w: torch.Tensor, group_size: int = 32, symmetric: bool = True) -> GroupWeight:
    """Round-to-nearest int4 per group of `group_size` input columns (`quantize_group` at 4 bits)."""
    return quantize_group(w, 4, group_size, symmetric)


def dequantize_group(q: GroupWeight) -> torch.Tensor:
    """`(code - zero) * scale` per group: the float32 weight `[out, in]`."""
    codes = unpack_bits(q.packed, q.bits).float()
    out_features = codes.shape[0]
    g = codes.reshape(out_features, -1, q.group_size)
    return ((g - q.zero.float()[..., None]) * q.scale.float()[..., None]).reshape(out_features, q.in_features)


dequantize_int4 = dequantize_group  # the int4 case's historical name


def implied_zero(scheme: Scheme, scale: torch.Tensor) -> torch.Tensor:
    """The zero tensor of a symmetric group scheme (its middle code everywhere), shaped like `scale`."""
    return torch.full(scale.shape, 1 << (scheme.bits - 1), dtype=torch.uint8)


# --------------------------------------------------------------------------- by scheme
def quantize_rtn(w: torch.Tensor, scheme: str | Scheme, importance: torch.Tensor | None = None,
                 search: bool = False):
    """Round to nearest in a scheme: int8 `(codes, scale)` or a `GroupWeight` (w `[out, in]`); `search` picks
    each group's grid by `search_grid` (weighted by `importance [in]` when given)."""
    s = scheme if isinstance(scheme, Scheme) else Scheme(scheme)
    if s.bits == 8:
        return quantize_int8(w)
    if s.bits in LOW_BITS:
        return quantize_group(w, s.bits, s.group_size, s.symmetric, importance, search)
    raise ValueError(f"scheme {s.name!r} does not quantize")


def dequantize(scheme: str | Scheme, qweight: torch.Tensor, scale: torch.Tensor,
               zero: torch.Tensor | None = None) -> torch.Tensor:
    """The float32 weight `[out, in]` of a layer stored in `scheme` (its `qweight`, `scale` and, for asymmetric
    group schemes, `zero`; a symmetric one's zero is implied, or given as stored by older files)."""
    s = scheme if isinstance(scheme, Scheme) else Scheme(scheme)
    if s.bits == 8:
        return dequantize_int8(qweight, scale)
    if s.bits in LOW_BITS:
        if zero is None:
            if s.stores_zero:
                raise ValueError(f"scheme {s.name!r} needs the zero points")
            zero = implied_zero(s, scale)
        cols = qweight.shape[-1] * 8 // s.bits
        return dequantize_group(GroupWeight(qweight, scale, zero, cols // scale.shape[-1], cols, s.bits))
    raise ValueError(f"scheme {s.name!r} has no quantized layout")


def fake_quant(w: torch.Tensor, scheme: str | Scheme, importance: torch.Tensor | None = None,
               search: bool = False) -> torch.Tensor:
    """`dequantize(quantize(w))` in a scheme (w `[out, in]`, float32 result), computed on the grid without packing:
    round to nearest, or (`search`) on `search_grid`'s grid weighted by `importance [in]`."""
    s = scheme if isinstance(scheme, Scheme) else Scheme(scheme)
    if s.bits == 8:
        return dequantize_int8(*quantize_int8(w))
    if s.bits not in LOW_BITS:
        raise ValueError(f"scheme {s.name!r} does not quantize")
    _, codes, scale, zero = group_codes(w, s.bits, s.group_size, s.symmetric, importance, search)
    return ((codes - zero[..., None]) * scale[..., None]).reshape(w.shape)
