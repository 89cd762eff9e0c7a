import pytest
import torch

from codexmini.quantize import (bits_per_weight, dequantize_int4, dequantize_int8, pack_int4, quantize_int4,
                                quantize_int8, unpack_int4)


def test_pack_unpack_round_trips_exactly_with_the_documented_nibble_order():
    codes = torch.randint(0, 16, (7, 64), dtype=torch.uint8)
    packed = pack_int4(codes)
    assert packed.shape == (7, 32) and packed.dtype == torch.uint8
    assert torch.equal(unpack_int4(packed), codes)
    assert int(packed[0, 0]) == int(codes[0, 0]) | (int(codes[0, 1]) << 4)


def test_pack_refuses_bad_input():
    with pytest.raises(ValueError, match="even number of columns"):
        pack_int4(torch.zeros(2, 3, dtype=torch.uint8))
    with pytest.raises(ValueError, match="0..15"):
        pack_int4(torch.full((2, 2), 16, dtype=torch.uint8))


def test_int8_error_is_within_half_a_step():
    w = torch.randn(32, 48) * torch.logspace(-2, 1, 32)[:, None]
    codes, scale = quantize_int8(w)
    err = (dequantize_int8(codes, scale) - w).abs()
    assert (err <= scale[:, None] / 2 + 1e-7).all()
    assert codes.dtype == torch.int8 and codes.abs().max() <= 127


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_int4_error_is_within_half_a_step_per_group(symmetric, group_size):
    w = torch.randn(16, 256) + (0 if symmetric else 0.7)
    q = quantize_int4(w, group_size, symmetric)
    err = (dequantize_int4(q) - w).abs().reshape(16, -1, group_size)
    assert (err <= q.scale[..., None] / 2 + 1e-6).all()
    if symmetric:
        assert torch.all(q.zero == 8)


def test_asymmetric_beats_symmetric_on_shifted_weights():
    w = torch.rand(64, 128) + 1.0  # all positive: symmetric wastes half its grid
    sym = (dequantize_int4(quantize_int4(w, 32, True)) - w).pow(2).mean()
    asym = (dequantize_int4(quantize_int4(w, 32, False)) - w).pow(2).mean()
    assert asym < sym / 2


def test_group_size_that_does_not_divide_is_refused_with_a_clear_message():
    with pytest.raises(ValueError, match="group_size 32 does not divide its input width 48"):
        quantize_int4(torch.randn(4, 48), 32)


def test_bits_per_weight_counts_scales_and_zeros():
    q = quantize_int4(torch.randn(8, 128), 32)
    assert bits_per_weight(q) == pytest.approx(4 + (32 + 8) / 32)
