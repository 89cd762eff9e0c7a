"""Weight quantization numerics for the quantize stage.

The schemes, the portable layout and the round-to-nearest math (quantize / dequantize, pack / unpack, fake
quantization) have one home, `codexmini.ops.layouts`, shared with the model's `QuantLinear`, the exporter and the
runtime; they are re-exported here for the stage's modules and callers. What is the stage's own is the storage
accounting.
"""

from __future__ import annotations

from ..ops.layouts import (Int4Weight, check_group_size, dequantize_int4, dequantize_int8, fake_quant, pack_int4,
                           quantize_int4, quantize_int8, quantize_rtn, unpack_int4)

__all__ = ["Int4Weight", "bits_per_weight", "check_group_size", "dequantize_int4", "dequantize_int8", "fake_quant",
           "pack_int4", "quantize_int4", "quantize_int8", "quantize_rtn", "unpack_int4"]


def bits_per_weight(q: Int4Weight, symmetric: bool = True) -> float:
    """Storage cost of a group-quantized weight per weight: codes, fp16 scales and (asymmetric schemes only) one
    byte per zero point, or (a `_min` scheme's weight, which holds `min`) an fp16 min."""
    n = q.packed.shape[0] * q.in_features
    offsets = q.min.numel() * 16 if q.min is not None else 0 if symmetric else q.zero.numel() * 8
    total_bits = q.packed.numel() * 8 + q.scale.numel() * 16 + offsets
    return total_bits / n
