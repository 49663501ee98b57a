"""The one place that picks an implementation for each FP8 op: the CUDA/Triton kernels on a GPU, the pure-torch
numerics (the spec) on CPU. Both have identical signatures, so callers never branch."""

from __future__ import annotations

import functools
import logging
from types import SimpleNamespace

import torch

from .. import numerics
from ..numerics import gemm as _gemm
from ..numerics import permute as _permute
from ..numerics import swiglu as _swiglu

log = logging.getLogger(__name__)

_REFERENCE = SimpleNamespace(
    name="reference",
    quantize_1x128=numerics.quantize_1x128,
    quantize_128x128=numerics.quantize_128x128,
    quantize_weight_stack=_gemm.quantize_weight_stack,
    scaling_aware_transpose=numerics.scaling_aware_transpose,
    permute_pad_rows=_permute.permute_pad_rows,
    unpermute_unpad_rows=_permute.unpermute_unpad_rows,
    weighted_swiglu_quant=_swiglu.weighted_swiglu_quant,
    weighted_swiglu_quant_backward=_swiglu.weighted_swiglu_quant_backward,
    fp8_grouped_gemm_nt=_gemm.fp8_grouped_gemm_nt,
    fp8_gemm_nt=_gemm.fp8_gemm_nt,
)


# twin name -> kernel name (fp8flow_megatron.kernels names carry their backend as a suffix)
_KERNEL_NAMES = {
    "quantize_1x128": "quantize_1x128_triton",
    "quantize_weight_stack": "quantize_weight_stack_triton",
    "scaling_aware_transpose": "scaling_aware_transpose_cuda",
    "permute_pad_rows": "permute_pad_rows_triton",
    "unpermute_unpad_rows": "unpermute_unpad_rows_triton",
    "weighted_swiglu_quant": "weighted_swiglu_quant_triton",
    "weighted_swiglu_quant_backward": "weighted_swiglu_quant_backward_triton",
}


@functools.lru_cache(maxsize=None)
def _cuda_backend():
    """Kernels for CUDA tensors: each kernel replaces its reference twin (same signature). The GEMMs stay the
    dequantize -> matmul reference until the TE grouped-GEMM recipe is wired in."""
    from .. import kernels

    ops = dict(vars(_REFERENCE))
    for twin, kernel in _KERNEL_NAMES.items():
        ops[twin] = getattr(kernels, kernel)
    ops["name"] = "cuda"
    return SimpleNamespace(**ops)


def backend_for(device: torch.device) -> SimpleNamespace:
    return _cuda_backend() if torch.device(device).type == "cuda" else _REFERENCE
