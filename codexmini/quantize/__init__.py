"""Quantization. So far: the int8 / int4 numerics and the portable packed layout (round-to-nearest)."""

from .numerics import (Int4Weight, bits_per_weight, check_group_size, dequantize_int4, dequantize_int8, pack_int4,
                       quantize_int4, quantize_int8, unpack_int4)

__all__ = ["Int4Weight", "bits_per_weight", "check_group_size", "dequantize_int4", "dequantize_int8", "pack_int4",
           "quantize_int4", "quantize_int8", "unpack_int4"]
