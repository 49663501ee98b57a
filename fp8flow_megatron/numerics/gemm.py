"""FP8 GEMM reference: what TE's blockwise GEMMs compute, emulated as dequantize -> fp32 matmul.

Both operands are K-major (the GEMM reduces over their last dimension), matching TE's "TN" layout:
    out[M, N] = dequantize(a)[M, K] @ dequantize(b)[N, K]^T
fprop:  a = x (1x128), b = w (128x128)             -> y
dgrad:  a = dy (1x128), b = transpose_128x128(w)   -> dx
wgrad:  a = dy^T (1x128 of the transpose), b = x^T -> dw, both from scaling_aware_transpose
"""

from __future__ import annotations

from typing import List, Sequence

import torch

from .format import BLOCK_128X128, Fp8Blockwise
from .quantize import dequantize


def fp8_gemm_nt(a: Fp8Blockwise, b: Fp8Blockwise, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """out [M, N] = dequantize(a) @ dequantize(b).T in fp32, rounded once to out_dtype."""
    if a.data.shape[1] != b.data.shape[1]:
        raise ValueError(f"fp8_gemm_nt: K differs: a {tuple(a.data.shape)}, b {tuple(b.data.shape)}")
    return (dequantize(a) @ dequantize(b).t()).to(out_dtype)


def fp8_grouped_gemm_nt(
    a: Fp8Blockwise, b: Sequence[Fp8Blockwise], m_splits: Sequence[int], out_dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Grouped: a [sum(m_splits), K] split by rows; expert i computes a_i @ b[i].T -> [sum(m), N]."""
    if len(b) != len(m_splits):
        raise ValueError(f"fp8_grouped_gemm_nt: {len(b)} weights for {len(m_splits)} splits")
    a_dq = dequantize(a)
    outs: List[torch.Tensor] = []
    start = 0
    for w, m in zip(b, m_splits):
        outs.append(a_dq[start : start + m] @ dequantize(w).t())
        start += m
    n = b[0].data.shape[0] if b else 0
    out = torch.cat(outs, dim=0) if outs else a_dq.new_zeros(0, n)
    return out.to(out_dtype)


def transpose_128x128(w: Fp8Blockwise) -> Fp8Blockwise:
    """Exact transpose of a 128x128-scaled tensor: a block keeps its scale, so codes and the scale grid transpose."""
    if w.block != BLOCK_128X128:
        raise ValueError(f"transpose_128x128 needs a 128x128 tensor, got block {w.block}")
    return Fp8Blockwise(w.data.t().contiguous(), w.scale_inv.t().contiguous(), BLOCK_128X128)
