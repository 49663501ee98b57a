"""Exact FP8 blockwise numerics: the executable spec every kernel and layer is tested against (pure torch)."""

from .format import E4M3_MAX, FP8_DTYPE, Fp8Blockwise
from .health import fp8_health
from .quantize import dequantize, quantize_1x128, quantize_128x128
from .transpose import scaling_aware_transpose

__all__ = [
    "E4M3_MAX",
    "FP8_DTYPE",
    "Fp8Blockwise",
    "dequantize",
    "fp8_health",
    "quantize_128x128",
    "quantize_1x128",
    "scaling_aware_transpose",
]
