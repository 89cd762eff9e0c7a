"""The quantize stage's numerics: the layouts are `codexmini.ops.layouts` (tested in tests/ops/test_layouts.py);
what is the stage's own is the storage accounting."""

import pytest
import torch

import codexmini.ops.layouts as layouts
import codexmini.quantize.numerics as numerics
from codexmini.quantize import bits_per_weight, quantize_int4


def test_the_stage_uses_the_one_implementation_in_ops():
    for name in ("Int4Weight", "check_group_size", "dequantize_int4", "dequantize_int8", "fake_quant", "pack_int4",
                 "quantize_int4", "quantize_int8", "quantize_rtn", "unpack_int4"):
        assert getattr(numerics, name) is getattr(layouts, name), name


def test_bits_per_weight_counts_scales_and_zeros():
    q = quantize_int4(torch.randn(8, 128), 32)
    assert bits_per_weight(q) == pytest.approx(4 + 16 / 32)  # fp16 scales, the symmetric zero implied
    assert bits_per_weight(q, symmetric=False) == pytest.approx(4 + (16 + 8) / 32)
