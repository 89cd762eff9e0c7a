"""The portable int layouts: scheme names, int4 packing, and dequantize(quantize(w)) error bounds per scheme."""

import pytest
import torch

from codexmini.ops.layouts import (Int4Weight, Scheme, dequantize, dequantize_int4, dequantize_int8, fake_quant,
                                   pack_int4, quantize_int4, quantize_int8, quantize_rtn, unpack_int4)


@pytest.mark.parametrize("name, bits, group, symmetric", [("int8", 8, None, True), ("int4_g32", 4, 32, True),
                                                          ("int4_g128_asym", 4, 128, False), ("none", 32, None, True)])
def test_scheme_names_parse(name, bits, group, symmetric):
    s = Scheme(name)
    assert (s.bits, s.group_size, s.symmetric) == (bits, group, symmetric)


@pytest.mark.parametrize("name", ["int4", "int3", "int4_g", "int4_g32_sym", "INT8", "fp8", ""])
def test_unknown_scheme_names_are_refused_with_the_choices(name):
    with pytest.raises(ValueError, match="is not one of int8, int4_g<group>"):
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
        assert torch.all(q.zero == 8) and int(codes.min()) >= 1  # grid -7..7: 0 is never used
    w_hat = dequantize_int4(q)
    err = (w_hat - w).abs().reshape(16, -1, group_size)
    assert (err <= q.scale[..., None] / 2 + 1e-6).all()
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
        dequantize("int4_g32", q.packed, q.scale)
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
    with pytest.raises(ValueError, match="even number >= 2"):
        quantize_int4(torch.randn(4, 48), 3)


def test_asymmetric_beats_symmetric_on_shifted_weights():
    w = torch.rand(64, 128) + 1.0  # all positive: symmetric wastes half its grid
    sym = (dequantize_int4(quantize_int4(w, 32, True)) - w).pow(2).mean()
    asym = (dequantize_int4(quantize_int4(w, 32, False)) - w).pow(2).mean()
    assert asym < sym / 2
