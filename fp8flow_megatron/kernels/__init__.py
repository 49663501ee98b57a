"""GPU kernels, one family per module, each the twin of a ``fp8flow_megatron.numerics`` function: same arguments,
defaults and results, bit-identical wherever the twin is exact. The backend is the name's suffix.

| kernel | twin | backend |
|---|---|---|
| scaling_aware_transpose_cuda (+ scale_layout="gemm_ready") | numerics.scaling_aware_transpose | CUDA (csrc/) |
| quantize_1x128_triton | numerics.quantize_1x128 | Triton |
| permute_pad_rows_triton, unpermute_unpad_rows_triton | numerics.permute_pad_rows, unpermute_unpad_rows | Triton |
| weighted_swiglu_quant_triton, weighted_swiglu_quant_backward_triton | numerics.weighted_swiglu_quant(_backward) | Triton |
| fp8_grouped_gemm_nt_triton, fp8_grouped_wgrad_triton | numerics.gemm.fp8_grouped_gemm_nt, fp8_grouped_wgrad | Triton |
| fp8_varlen_gemm_nt_triton, fp8_varlen_wgrad_triton (row groups on the device) | numerics.gemm.fp8_varlen_gemm_nt, fp8_varlen_wgrad | Triton (+ CUDA transposes) |
| quantize_weight_stack_triton | numerics.gemm.quantize_weight_stack | Triton |
| zero_tail_rows_triton | numerics.groups.zero_tail_rows | Triton |

Importing this package needs neither a GPU nor Triton; calling a kernel without them raises with the reason.
"""

from .grouped_gemm import (
    fp8_grouped_gemm_nt_triton,
    fp8_grouped_wgrad_triton,
    fp8_varlen_gemm_nt_triton,
    fp8_varlen_wgrad_triton,
)
from .permute import permute_pad_rows_triton, unpermute_unpad_rows_triton
from .quantize import quantize_1x128_triton
from .swiglu import weighted_swiglu_quant_backward_triton, weighted_swiglu_quant_triton
from .tail_rows import zero_tail_rows_triton
from .transpose import ColumnwiseGemmReady, scaling_aware_transpose_cuda
from .weight_quant import quantize_weight_stack_triton

__all__ = [
    "ColumnwiseGemmReady",
    "fp8_grouped_gemm_nt_triton",
    "fp8_grouped_wgrad_triton",
    "fp8_varlen_gemm_nt_triton",
    "fp8_varlen_wgrad_triton",
    "permute_pad_rows_triton",
    "quantize_1x128_triton",
    "quantize_weight_stack_triton",
    "scaling_aware_transpose_cuda",
    "unpermute_unpad_rows_triton",
    "weighted_swiglu_quant_backward_triton",
    "weighted_swiglu_quant_triton",
    "zero_tail_rows_triton",
]
