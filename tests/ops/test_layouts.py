"""The portable int layouts: scheme names, int4 / int3 / int2 packing, fp16 scales, the grid search, and
dequantize(quantize(w)) error bounds per scheme."""

import pytest
import torch

from codexmini.ops.layouts import (GroupWeight, Int4Weight, Scheme, dequantize, dequantize_group, dequantize_int4,
                                   dequantize_int8, fake_quant, grid, pack_bits, pack_int4, quantize_group,
                                   quantize_int4, quantize_int8, quantize_rtn, search_grid, unpack_bits, unpack_int4)


@pytest.mark.parametrize("name, bits, group, mode, bpw", [
    ("int8", 8, None, "sym", 8.0), ("int4_g32", 4, 32, "sym", 4.5), ("int4_g128_asym", 4, 128, "asym", 4.1875),
    ("int3_g32", 3, 32, "sym", 3.5), ("int2_g16_asym", 2, 16, "asym", 3.5), ("none", 32, None, "sym", 32.0),
    ("int4_g32_min", 4, 32, "min", 5.0), ("int3_g64_min", 3, 64, "min", 3.5)])
def test_scheme_names_parse(name, bits, group, mode, bpw):
    s = Scheme(name)
    assert (s.bits, s.group_size, s.mode, s.bits_per_weight()) == (bits, group, mode, bpw)
    assert s.symmetric == (mode == "sym")
    assert s.stores_zero == (mode == "asym") and s.stores_min == (mode == "min")


@pytest.mark.parametrize("name", ["int4", "int3", "int4_g", "int4_g32_sym", "INT8", "fp8", "int5_g32", "int1_g8", "",
                                  "int8_min", "int4_g32_asym_min"])
def test_unknown_scheme_names_are_refused_with_the_choices(name):
    with pytest.raises(ValueError, match="is not one of int8, int<bits>_g<group>"):
        Scheme(name)


@pytest.mark.parametrize("shape", [(7, 64), (3, 5, 2), (1, 2)])
def test_pack_unpack_round_trips_exactly(shape):
    codes = torch.randint(0, 16, shape, dtype=torch.uint8)
    packed = pack_int4(codes)
    assert packed.shape == (*shape[:-1], shape[-1] // 2) and packed.dtype == torch.uint8
    assert torch.equal(unpack_int4(packed), codes)
    # element 2j in the low nibble, 2j + 1 in the high one
    flat = codes.reshape(-1, shape[-1])
    assert int(packed.reshape(-1, shape[-1] // 2)[0, 0]) == int(flat[0, 0]) | (int(flat[0, 1]) << 4)
    every_byte = torch.arange(256, dtype=torch.uint8)[None]
    assert torch.equal(pack_int4(unpack_int4(every_byte)), every_byte)


def test_int8_round_trip_is_within_half_a_step_and_exact_on_the_grid():
    w = torch.randn(32, 48) * torch.logspace(-3, 1, 32)[:, None]
    codes, scale = quantize_int8(w)
    assert codes.dtype == torch.int8 and int(codes.abs().max()) <= 127 and scale.shape == (32,)
    w_hat = dequantize_int8(codes, scale)
    assert ((w_hat - w).abs() <= scale[:, None] / 2 + 1e-7).all()
    # each row's largest weight lands exactly on code +-127
    assert (codes.abs().amax(1) == 127).all()
    # values already on the grid come back (up to rounding of the scale)
    torch.testing.assert_close(fake_quant(w_hat, "int8"), w_hat, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size", [2, 32, 64, 128])
def test_int4_round_trip_is_within_half_a_step_per_group(symmetric, group_size):
    w = torch.randn(16, 256) * 0.1 + (0 if symmetric else 0.05)
    q = quantize_int4(w, group_size, symmetric)
    assert q.packed.shape == (16, 128) and q.scale.shape == q.zero.shape == (16, 256 // group_size)
    codes = unpack_int4(q.packed)
    assert int(codes.max()) <= 15
    if symmetric:
        # 16 levels -8..7 (Q4_0's grid): each group's largest-magnitude weight lands exactly on code 0
        assert torch.all(q.zero == 8)
        g = w.reshape(16, -1, group_size)
        extreme = g.gather(-1, g.abs().argmax(-1, keepdim=True)).squeeze(-1)
        torch.testing.assert_close(-8 * q.scale.float(), extreme, rtol=1e-3, atol=0)
    assert q.scale.dtype == torch.float16
    w_hat = dequantize_int4(q)
    err = (w_hat - w).abs().reshape(16, -1, group_size)
    step = q.scale.float().abs()[..., None] * 1.002 + 1e-6
    # within half a step, but for values beyond the grid's short end (symmetric: up to one step, as in Q4_0)
    assert (err <= step / 2).all() if not symmetric else (err <= step).all() and (err <= step / 2).float().mean() > .9
    # a zero weight is exactly representable in either mode
    z = w.clone()
    z[:, 0] = 0
    assert torch.all(dequantize_int4(quantize_int4(z, group_size, symmetric))[:, 0] == 0)


def test_dequantize_by_scheme_equals_the_per_layout_functions():
    w = torch.randn(8, 64)
    codes, scale = quantize_rtn(w, "int8")
    torch.testing.assert_close(dequantize("int8", codes, scale), dequantize_int8(codes, scale), atol=0, rtol=0)
    for name in ("int4_g32", "int4_g16_asym"):
        q = quantize_rtn(w, name)
        assert isinstance(q, Int4Weight) and q.group_size == Scheme(name).group_size
        torch.testing.assert_close(dequantize(Scheme(name), q.packed, q.scale, q.zero), dequantize_int4(q),
                                   atol=0, rtol=0)
        torch.testing.assert_close(fake_quant(w, name), dequantize_int4(q), atol=0, rtol=0)
    with pytest.raises(ValueError, match="needs the zero points"):
        dequantize("int4_g16_asym", q.packed, q.scale)
    q = quantize_rtn(w, "int4_g32")  # symmetric: the zero is implied
    torch.testing.assert_close(dequantize("int4_g32", q.packed, q.scale), dequantize_int4(q), atol=0, rtol=0)
    with pytest.raises(ValueError, match="does not quantize"):
        quantize_rtn(w, "none")


def test_int8_rows_dequantize_like_the_whole_table():
    """An embedding lookup dequantizes only the rows it reads, with the same function."""
    table = torch.randn(50, 16)
    codes, scale = quantize_int8(table)
    ids = torch.tensor([[3, 7, 3], [49, 0, 1]])
    torch.testing.assert_close(dequantize_int8(codes[ids], scale[ids]), dequantize_int8(codes, scale)[ids],
                               atol=0, rtol=0)


def test_bad_int4_inputs_are_refused():
    with pytest.raises(ValueError, match="even number of columns"):
        pack_int4(torch.zeros(2, 3, dtype=torch.uint8))
    with pytest.raises(ValueError, match="0..15"):
        pack_int4(torch.full((2, 2), 16, dtype=torch.uint8))
    with pytest.raises(ValueError, match="group_size 32 does not divide its input width 48"):
        quantize_int4(torch.randn(4, 48), 32)
    with pytest.raises(ValueError, match="multiple of 2"):
        quantize_int4(torch.randn(4, 48), 3)
    with pytest.raises(ValueError, match="int3 group_size must be a multiple of 8"):
        quantize_group(torch.randn(4, 48), 3, 12)
    with pytest.raises(ValueError, match="multiple of 8"):
        pack_bits(torch.zeros(2, 12, dtype=torch.uint8), 3)
    with pytest.raises(ValueError, match="0..3"):
        pack_bits(torch.full((2, 8), 4, dtype=torch.uint8), 2)
    with pytest.raises(ValueError, match="float16's range"):
        quantize_int8(torch.full((2, 4), 1e8))


def test_asymmetric_beats_symmetric_on_shifted_weights():
    w = torch.rand(64, 128) + 1.0  # all positive: symmetric wastes half its grid
    sym = (dequantize_int4(quantize_int4(w, 32, True)) - w).pow(2).mean()
    asym = (dequantize_int4(quantize_int4(w, 32, False)) - w).pow(2).mean()
    assert asym < sym / 2


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_low_bit_packing_round_trips_and_follows_the_documented_layout(bits):
    codes = torch.randint(0, 1 << bits, (5, 64), dtype=torch.uint8)
    packed = pack_bits(codes, bits)
    assert packed.shape == (5, 64 * bits // 8) and packed.dtype == torch.uint8
    assert torch.equal(unpack_bits(packed, bits), codes)
    c = [int(v) for v in codes[0, :8]]
    if bits == 2:  # element 4j+k in bits 2k..2k+1
        assert int(packed[0, 0]) == c[0] | c[1] << 2 | c[2] << 4 | c[3] << 6
    if bits == 3:  # low two bits as int2 (16 bytes for 64 columns), then the high bit of each element
        assert int(packed[0, 0]) == (c[0] & 3) | (c[1] & 3) << 2 | (c[2] & 3) << 4 | (c[3] & 3) << 6
        assert int(packed[0, 16]) == sum((v >> 2) << k for k, v in enumerate(c))


def test_min_grid_recovers_weights_that_sit_on_a_q4_1_grid_exactly():
    """Weights dequantized from a Q4_1-style file (per group of 32: an fp16 scale d and min m, codes 0..15 with the
    group's least and greatest weight on codes 0 and 15) come back bit for bit from int4_g32_min; the integer zero
    point of _asym cannot hold such an offset."""
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (48, 4, 32), generator=g)
    codes[..., 0], codes[..., 1] = 0, 15
    d = (torch.rand(48, 4, 1, generator=g) * 0.01 + 1e-3).half().float()
    m = (torch.randn(48, 4, 1, generator=g) * 0.05).half().float()
    w = (codes * d + m).reshape(48, 128)
    q = quantize_rtn(w, "int4_g32_min")
    assert q.min is not None and q.min.dtype == torch.float16
    assert torch.equal(dequantize_group(q), w)
    assert torch.equal(fake_quant(w, "int4_g32_min"), w)
    assert torch.equal(fake_quant(w, "int4_g32_min", torch.rand(128), search=True), w)  # the search keeps it
    assert (fake_quant(w, "int4_g32_asym") - w).abs().max() > 1e-4


def test_min_grid_beats_the_zero_point_one_and_refits_under_the_search():
    torch.manual_seed(1)
    w = torch.randn(64, 256) * 0.02 + torch.randn(64, 1) * 0.02  # groups off centre
    err = {s: float((fake_quant(w, s) - w).pow(2).mean()) for s in ("int4_g32", "int4_g32_asym", "int4_g32_min")}
    assert err["int4_g32_min"] < err["int4_g32_asym"] < err["int4_g32"]
    searched = float((fake_quant(w, "int4_g32_min", search=True) - w).pow(2).mean())
    assert searched < err["int4_g32_min"] * 0.97


@pytest.mark.parametrize("scheme", ["int4_g32", "int4_g32_asym", "int3_g32", "int3_g16_asym", "int2_g32_asym",
                                    "int2_g8", "int4_g32_min", "int2_g16_min"])
def test_group_schemes_round_trip_within_half_a_step(scheme):
    s = Scheme(scheme)
    w = torch.randn(24, 128) * 0.02 + (0 if s.symmetric else 0.01)
    q = quantize_rtn(w, scheme)
    assert isinstance(q, GroupWeight) and q.bits == s.bits and q.packed.shape == (24, s.packed_cols(128))
    err = (dequantize_group(q) - w).abs().reshape(24, -1, s.group_size)
    step = q.scale.float().abs()[..., None] * 1.002 + 1e-7
    if s.symmetric:  # the grid's short end clips by up to one step
        assert (err <= step).all() and (err <= step / 2).float().mean() > 0.8
    elif s.stores_min:  # the fp16 rounding of the min and scale may shift the grid by a hair
        assert (err <= step / 2 + 1e-4).all() and (err <= step / 2).float().mean() > 0.95
    else:
        assert (err <= step / 2).all()
    if not s.stores_min:  # (a min grid keeps each group's ends exact instead of 0)
        z = w.clone()
        z[:, 5] = 0
        assert torch.all(fake_quant(z, scheme)[:, 5] == 0)  # 0 stays exact
    torch.testing.assert_close(dequantize(scheme, q.packed, q.scale, q.zero if s.stores_zero else None, q.min),
                               dequantize_group(q), atol=0, rtol=0)


@pytest.mark.parametrize("bits, symmetric", [(4, True), (4, False), (3, True), (2, False), (4, "min"), (3, "min")])
def test_grid_search_never_loses_to_round_to_nearest_and_follows_the_importance(bits, symmetric):
    torch.manual_seed(0)
    w = torch.randn(64, 8, 32)
    imp = torch.rand(8, 32) ** 4  # a few columns matter most
    err = {}
    for name, (scale, zero) in {"rtn": grid(w, bits, symmetric),
                                "plain": search_grid(w, bits, symmetric),
                                "weighted": search_grid(w, bits, symmetric, imp)}.items():
        from codexmini.ops.layouts import from_codes, to_codes
        codes = to_codes(w, scale[..., None], zero[..., None], bits, symmetric)
        d = (w - from_codes(codes, scale[..., None], zero[..., None], bits, symmetric)).pow(2)
        err[name] = (float(d.sum()), float((d * imp).sum()))
        assert torch.equal(scale, scale.half().float())  # fp16-exact scales
    assert err["plain"][0] <= err["rtn"][0] * 0.97  # a real gain in plain squared error
    assert err["weighted"][1] < err["plain"][1]  # and the weights steer it
    assert err["weighted"][1] <= err["rtn"][1]
