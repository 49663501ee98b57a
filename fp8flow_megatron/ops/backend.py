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
    scaling_aware_transpose=numerics.scaling_aware_transpose,
    permute_pad_rows=_permute.permute_pad_rows,
    unpermute_unpad_rows=_permute.unpermute_unpad_rows,
    weighted_swiglu_quant=_swiglu.weighted_swiglu_quant,
    weighted_swiglu_quant_backward=_swiglu.weighted_swiglu_quant_backward,
    fp8_grouped_gemm_nt=_gemm.fp8_grouped_gemm_nt,
    fp8_gemm_nt=_gemm.fp8_gemm_nt,
)


@functools.lru_cache(maxsize=None)
def _cuda_backend():
    """Kernels for CUDA tensors: every op the kernels package provides replaces its reference twin."""
    try:
        from .. import kernels
    except Exception as exc:  # pragma: no cover - depends on the GPU stack
        log.warning("fp8flow: GPU kernels unavailable (%s); CUDA tensors use the pure-torch reference", exc)
        return _REFERENCE
    ops = dict(vars(_REFERENCE))
    provided = getattr(kernels, "KERNELS", {})
    ops.update(provided)
    ops["name"] = "cuda" if provided else "reference"
    if not provided:
        log.warning("fp8flow: no GPU kernels registered; CUDA tensors use the pure-torch reference")
    return SimpleNamespace(**ops)


def backend_for(device: torch.device) -> SimpleNamespace:
    return _cuda_backend() if torch.device(device).type == "cuda" else _REFERENCE
