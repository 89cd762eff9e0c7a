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
- `int<b>_g<G>_min`: as above but with a float offset instead of a zero point, `min [out, in/G] float16`;
  `w ~= code * scale + min`, the codes spanning each group's [min, max] (llama.cpp's Q4_1 grid at 4 bits and
  G = 32: weights that came from such a file requantize onto it exactly).
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

SCHEME_RE = re.compile(r"^(?:int8|int([234])_g(\d+)(_asym|_min)?|none)$")
SCHEME_CHOICES = ("int8, int<bits>_g<group> for bits 4/3/2 (e.g. int4_g32), int<bits>_g<group>_asym, "
                  "int<bits>_g<group>_min, none")
MODES = ("sym", "asym", "min")  # a group grid's kind: symmetric, integer zero point, float offset (min)
LOW_BITS = (2, 3, 4)
FP16_TINY = 2.0 ** -24  # the smallest fp16 (subnormal): a scale floor that survives the cast
FP16_MAX = 65504.0


@dataclass(frozen=True)
class Scheme:
    """A parsed scheme name: `int8`, `int<b>_g<group>` (symmetric), `int<b>_g<group>_asym` (integer zero point),
    `int<b>_g<group>_min` (float offset), or `none`.

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
    def mode(self) -> str:
        """The group grid's kind (`MODES`): "sym", "asym" or "min"; "sym" for int8 / none."""
        return "asym" if self.name.endswith("_asym") else "min" if self.name.endswith("_min") else "sym"

    @property
    def symmetric(self) -> bool:
        return self.mode == "sym"

    @property
    def stores_zero(self) -> bool:
        """Whether the layout holds a `zero` tensor (asymmetric group schemes)."""
        return self.group_size is not None and self.mode == "asym"

    @property
    def stores_min(self) -> bool:
        """Whether the layout holds a `min` tensor (the `_min` group schemes)."""
        return self.group_size is not None and self.mode == "min"

    def packed_cols(self, in_features: int) -> int:
        """Bytes (int8: codes) per row of `qweight` for `in_features` inputs."""
        return in_features if self.bits == 8 else in_features * self.bits // 8

    def bits_per_weight(self, in_features: int | None = None) -> float:
        """Stored bits per weight: codes plus fp16 scales (and zero points or mins); int8's per-row scale is counted
        over `in_features` inputs when given."""
        if self.bits == 32:
            return 32.0
        if self.bits == 8:
            return 8.0 + (16.0 / in_features if in_features else 0.0)
        return self.bits + (16 + (8 if self.stores_zero else 16 if self.stores_min else 0)) / self.group_size


@dataclass
class GroupWeight:
    """A group-quantized weight in the portable layout (see the module docstring). `zero` is always a full tensor
    here (the implied middle code for symmetric schemes); the file and `QuantLinear` store it only when asymmetric.
    A `_min` scheme's weight has `min` instead (its `zero` is then all zeros and unused)."""

    packed: torch.Tensor  # [out, in*bits/8] uint8
    scale: torch.Tensor  # [out, in/group] float16
    zero: torch.Tensor  # [out, in/group] uint8
    group_size: int
    in_features: int
    bits: int = 4
    min: torch.Tensor | None = None  # [out, in/group] float16: w = code * scale + min


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


def mode_of(symmetric: bool | str) -> str:
    """A grid kind from a `symmetric` flag (True: "sym", False: "asym") or a name in `MODES`."""
    if isinstance(symmetric, str):
        if symmetric not in MODES:
            raise ValueError(f"grid kind {symmetric!r} is not one of {MODES}")
        return symmetric
    return "sym" if symmetric else "asym"


def grid(w: torch.Tensor, bits: int, symmetric: bool | str = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The round-to-nearest grid of each row of values: scale and zero point (or min) over the last dimension.

    Args:
        w: `[..., n]` float values sharing one grid per row (an int8 output channel, a group).
        bits: 8 (symmetric, codes -127..127, zero 0) or 4 / 3 / 2 (codes 0..2^bits-1).
        symmetric: group schemes only, the grid's kind (`mode_of`): True / "sym": zero = 2^(bits-1) and a signed
            scale that puts the largest-magnitude value on the end code; False / "asym": a per-row integer zero
            point over the full code range; "min": codes 0..2^bits-1 spanning the row's [min, max].

    Returns:
        scale `[...]` (fp16-exact values) and zero `[...]` (float32; the zero point is a whole number; for "min"
        the row's offset, fp16-exact).
    """
    if bits == 8:
        return _fp16_scale(w.abs().amax(dim=-1) / 127.0), torch.zeros(w.shape[:-1])
    half = float(1 << (bits - 1))
    mode = mode_of(symmetric)
    if mode == "sym":
        # the signed extreme on code 0: (0 - half) * scale == w_extreme
        extreme = w.gather(-1, w.abs().argmax(dim=-1, keepdim=True)).squeeze(-1)
        return _fp16_scale(extreme / -half), torch.full(w.shape[:-1], half)
    if mode == "min":
        return _min_grid(w.amin(dim=-1), w.amax(dim=-1), bits)
    return _asym_grid(w.amin(dim=-1), w.amax(dim=-1), bits)


def _min_grid(lo: torch.Tensor, hi: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and offset whose codes 0..2^bits-1 span [lo, hi] (llama.cpp's Q4_1 grid): both fp16 values."""
    return _fp16_scale((hi - lo) / float((1 << bits) - 1)), _fp16_min(lo)


def _fp16_min(m: torch.Tensor) -> torch.Tensor:
    """An offset rounded to float16 values (kept in float32); one beyond fp16's range is refused."""
    if m.numel() and float(m.abs().max()) > FP16_MAX:
        raise ValueError(f"a quantization offset of {float(m.abs().max()):.3g} exceeds float16's range: the weights "
                         "are not finite or far outside any trained model's")
    return m.half().float()


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


def to_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int,
             symmetric: bool | str = True) -> torch.Tensor:
    """Round `w` onto the grid (scale, zero or min broadcast against it; `symmetric` the grid's kind, `mode_of`):
    float codes, -127..127 (int8) or 0..2^bits-1."""
    if bits == 8:
        return torch.clamp(torch.round(w / scale), -127, 127)
    if mode_of(symmetric) == "min":
        return torch.clamp(torch.round((w - zero) / scale), 0, float((1 << bits) - 1))
    return torch.clamp(torch.round(w / scale) + zero, 0, float((1 << bits) - 1))


def from_codes(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int,
               symmetric: bool | str = True) -> torch.Tensor:
    """The values of float `codes` on the grid (scale, zero or min broadcast against them): `codes * scale`
    (int8), `(codes - zero) * scale`, or `codes * scale + min` (the "min" kind)."""
    if bits == 8:
        return codes * scale
    if mode_of(symmetric) == "min":
        return codes * scale + zero
    return (codes - zero) * scale


SEARCH_STEPS = 16  # candidate grids per group tried by `search_grid`


def search_grid(w: torch.Tensor, bits: int, symmetric: bool | str = True, importance: torch.Tensor | None = None,
                steps: int = SEARCH_STEPS) -> tuple[torch.Tensor, torch.Tensor]:
    """Like `grid`, but the grid of each row with the least weighted squared error among `steps` candidates.

    Symmetric: the divisor of the extreme value is varied around 2^(bits-1) and, for the codes each candidate
    gives, the scale is refitted by weighted least squares. Asymmetric: the range is clipped from either end. Min:
    the same clipped ranges, each with the scale and offset refitted by weighted least squares for its codes.

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
    mode = mode_of(symmetric)
    best_scale, best_zero = grid(w, bits, mode)
    best_err = _weighted_error(w, q, best_scale, best_zero, bits, mode)
    if bits == 8 or steps < 2:
        return best_scale, best_zero

    def keep(scale, zero):
        nonlocal best_scale, best_zero, best_err
        err = _weighted_error(w, q, scale, zero, bits, mode)
        better = err < best_err
        best_scale, best_zero = torch.where(better, scale, best_scale), torch.where(better, zero, best_zero)
        best_err = torch.where(better, err, best_err)

    if mode == "sym":
        extreme = w.gather(-1, w.abs().argmax(dim=-1, keepdim=True)).squeeze(-1)
        for k in range(steps):
            divisor = half - 0.5 + 1.5 * k / (steps - 1)  # half-0.5 .. half+1 (clipping the extreme)
            scale = _fp16_scale(extreme / -divisor)
            signed = to_codes(w, scale[..., None], best_zero[..., None], bits) - half
            # least-squares scale for these codes: sum(q w c) / sum(q c^2)
            num, den = (q * w * signed).sum(-1), (q * signed * signed).sum(-1)
            refit = _fp16_scale(torch.where(den > 0, num / den.clamp(min=1e-30), scale))
            for cand in (scale, refit):
                keep(cand, best_zero)
        return best_scale, best_zero
    lo, hi = w.amin(dim=-1), w.amax(dim=-1)
    shrink = torch.linspace(1.0, 0.7, max(2, int(steps ** 0.5) + 1))
    for a in shrink:
        for b in shrink:
            if mode == "asym":
                keep(*_asym_grid(lo * a, hi * b, bits))
                continue
            # clipping toward the middle of the range (lo, hi may share a sign)
            mid = (lo + hi) / 2
            scale, low = _min_grid(mid + (lo - mid) * a, mid + (hi - mid) * b, bits)
            keep(scale, low)
            keep(*_refit_min(w, q, to_codes(w, scale[..., None], low[..., None], bits, "min"), scale, low))
    return best_scale, best_zero


def _refit_min(w, q, codes, scale, low):
    """The weighted least-squares scale and offset of each row for its `codes` (fp16 values; where the codes are
    all equal, the given `scale`, `low`)."""
    sq, sc, sw = q.sum(-1), (q * codes).sum(-1), (q * w).sum(-1)
    scc, scw = (q * codes * codes).sum(-1), (q * codes * w).sum(-1)
    det = sq * scc - sc * sc
    ok = det > 1e-12 * sq * scc.clamp(min=1e-30)
    fit_scale = (sq * scw - sc * sw) / torch.where(ok, det, torch.ones_like(det))
    ok &= fit_scale > 0
    fit_scale = torch.where(ok, fit_scale, scale)
    fit_low = torch.where(ok, (sw - fit_scale * sc) / sq, low)
    return _fp16_scale(fit_scale), _fp16_min(fit_low)


def _weighted_error(w, q, scale, zero, bits, mode="sym"):
    codes = to_codes(w, scale[..., None], zero[..., None], bits, mode)
    return (q * (w - from_codes(codes, scale[..., None], zero[..., None], bits, mode)).pow(2)).sum(-1)


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


def group_codes(w: torch.Tensor, bits: int, group_size: int, symmetric: bool | str = True,
                importance: torch.Tensor | None = None, search: bool = False):
    """The groups of `w [out, in]` on their grids: (groups `[out, in/G, G]`, float codes, scale, zero or min), the
    grid (of kind `symmetric`, see `mode_of`) from `grid` or (with `search`) `search_grid` weighted by
    `importance [in]`."""
    out_features, in_features = w.shape
    check_group_size(in_features, group_size, bits=bits)
    g = w.float().reshape(out_features, in_features // group_size, group_size)
    if search:
        imp = None if importance is None else importance.float().reshape(1, in_features // group_size, group_size)
        scale, zero = search_grid(g, bits, symmetric, imp)
    else:
        scale, zero = grid(g, bits, symmetric)
    return g, to_codes(g, scale[..., None], zero[..., None], bits, symmetric), scale, zero


def group_weight(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int, bits: int,
                 symmetric: bool | str = True) -> GroupWeight:
    """The packed `GroupWeight` of float `codes [out, in]` on a grid of kind `symmetric` (`mode_of`) with
    `scale` and `zero` (or min) `[out, in/G]` (codes may come as groups, `[out, in/G, G]`)."""
    codes = codes.reshape(codes.shape[0], -1)
    packed, in_features = pack_bits(codes.to(torch.uint8), bits), codes.shape[1]
    if mode_of(symmetric) == "min":
        return GroupWeight(packed, scale.half(), torch.zeros(scale.shape, dtype=torch.uint8), group_size,
                           in_features, bits, zero.half())
    return GroupWeight(packed, scale.half(), zero.to(torch.uint8), group_size, in_features, bits)


def quantize_group(w: torch.Tensor, bits: int = 4, group_size: int = 32, symmetric: bool | str = True,
                   importance: torch.Tensor | None = None, search: bool = False) -> GroupWeight:
    """Group quantization of `w [out, in]` to `bits` (4, 3, 2): round to nearest on each group's grid (of kind
    `symmetric`, see `mode_of`), found by `grid` or (with `search`) by `search_grid` weighted by
    `importance [in]`."""
    _, codes, scale, zero = group_codes(w, bits, group_size, symmetric, importance, search)
    return group_weight(codes, scale, zero, group_size, bits, symmetric)


def quantize_int4(w: torch.Tensor, group_size: int = 32, symmetric: bool | str = True) -> GroupWeight:
    """Round-to-nearest int4 per group of `group_size` input columns (`quantize_group` at 4 bits)."""
    return quantize_group(w, 4, group_size, symmetric)


def dequantize_group(q: GroupWeight) -> torch.Tensor:
    """`(code - zero) * scale` (or `code * scale + min`) per group: the float32 weight `[out, in]`."""
    codes = unpack_bits(q.packed, q.bits).float()
    out_features = codes.shape[0]
    g = codes.reshape(out_features, -1, q.group_size)
    offset, mode = (q.min, "min") if q.min is not None else (q.zero, "asym")
    return from_codes(g, q.scale.float()[..., None], offset.float()[..., None], q.bits,
                      mode).reshape(out_features, q.in_features)


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
        return quantize_group(w, s.bits, s.group_size, s.mode, importance, search)
    raise ValueError(f"scheme {s.name!r} does not quantize")


def dequantize(scheme: str | Scheme, qweight: torch.Tensor, scale: torch.Tensor,
               zero: torch.Tensor | None = None, min_: torch.Tensor | None = None) -> torch.Tensor:
    """The float32 weight `[out, in]` of a layer stored in `scheme` (its `qweight`, `scale` and, for asymmetric
    group schemes, `zero`, for `_min` ones `min_`; a symmetric one's zero is implied, or given as stored by older
    files)."""
    s = scheme if isinstance(scheme, Scheme) else Scheme(scheme)
    if s.bits == 8:
        return dequantize_int8(qweight, scale)
    if s.stores_min:
        if min_ is None:
            raise ValueError(f"scheme {s.name!r} needs the mins")
        cols = qweight.shape[-1] * 8 // s.bits
        return dequantize_group(GroupWeight(qweight, scale, torch.zeros(scale.shape, dtype=torch.uint8),
                                            cols // scale.shape[-1], cols, s.bits, min_))
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
    _, codes, scale, zero = group_codes(w, s.bits, s.group_size, s.mode, importance, search)
    return from_codes(codes, scale[..., None], zero[..., None], s.bits, s.mode).reshape(w.shape)
