"""Quantization: int8 / int4 numerics and the portable packed layout, quantized modules, RTN / GPTQ / AWQ."""

from .apply import QuantizeConfig, quantize_model
from ..models.quantized import QuantLinear, Scheme, install_quant_linears
from ..models.qat import resolve_schemes
from .numerics import (Int4Weight, bits_per_weight, check_group_size, dequantize_int4, dequantize_int8, pack_int4,
                       quantize_int4, quantize_int8, unpack_int4)

__all__ = ["Int4Weight", "QuantLinear", "QuantizeConfig", "Scheme", "bits_per_weight", "check_group_size",
           "dequantize_int4", "dequantize_int8", "install_quant_linears", "pack_int4", "quantize_int4",
           "quantize_int8", "quantize_model", "resolve_schemes", "unpack_int4"]
