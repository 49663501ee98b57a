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


class Fp8BlockwiseStack:
    """Same-shape 128x128-scaled weights of E experts in one buffer: data [E, N, K] e4m3, scale_inv
    [E, ceil(N/128), ceil(K/128)] fp32. A sequence of per-expert Fp8Blockwise views, so every function that takes a
    list of weights (fp8_grouped_gemm_nt) takes a stack too; grouped kernels read the one buffer instead."""

    def __init__(self, data: torch.Tensor, scale_inv: torch.Tensor) -> None:
        if data.dim() != 3 or scale_inv.dim() != 3 or data.shape[0] != scale_inv.shape[0]:
            raise ValueError(f"Fp8BlockwiseStack needs data [E, N, K] and scale_inv [E, nb, kb]; got {tuple(data.shape)}, {tuple(scale_inv.shape)}")
        self.data, self.scale_inv = data, scale_inv

    @classmethod
    def quantize(cls, weights: Sequence[torch.Tensor], quantize_128x128) -> "Fp8BlockwiseStack":
        """Quantize each [N, K] weight 128x128 (with the given implementation) into one preallocated stack (no
        transient bf16 copy of all experts)."""
        first = quantize_128x128(weights[0].detach())
        data = first.data.new_empty((len(weights), *first.data.shape))
        scale_inv = first.scale_inv.new_empty((len(weights), *first.scale_inv.shape))
        data[0], scale_inv[0] = first.data, first.scale_inv
        for i, w in enumerate(weights[1:], start=1):
            q = quantize_128x128(w.detach())
            data[i], scale_inv[i] = q.data, q.scale_inv
        return cls(data, scale_inv)

    def t(self) -> "Fp8BlockwiseStack":
        """Every expert's exact 128x128 block transpose (transpose_128x128 of each)."""
        return Fp8BlockwiseStack(self.data.transpose(1, 2).contiguous(), self.scale_inv.transpose(1, 2).contiguous())

    def __len__(self) -> int:
        return self.data.shape[0]

    def __getitem__(self, i: int) -> Fp8Blockwise:
        return Fp8Blockwise(self.data[i], self.scale_inv[i], BLOCK_128X128)

    def __iter__(self):
        return (self[i] for i in range(len(self)))


def fp8_grouped_wgrad(
    g_q: Fp8Blockwise, x_q: Fp8Blockwise, m_splits: Sequence[int], out_dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Weight gradients of all experts: dw[e] = dequantize(T(g_e)) @ dequantize(T(x_e)).T, T the scaling-aware
    transpose of expert e's rows (the column-wise FP8 the wgrad reads; never a requantized BF16 copy).

    g_q: [M, N] 1x128 (output gradients), x_q: [M, K] 1x128 (inputs), both split by rows per m_splits.
    Returns [E, N, K] in out_dtype; an empty expert's gradient is zero.
    """
    from .transpose import scaling_aware_transpose

    n, k = g_q.data.shape[1], x_q.data.shape[1]
    out = torch.zeros(len(m_splits), n, k, dtype=out_dtype, device=g_q.data.device)
    g_t = scaling_aware_transpose(g_q, m_splits)
    x_t = scaling_aware_transpose(x_q, m_splits)
    for e, (gt, xt) in enumerate(zip(g_t, x_t)):
        if m_splits[e]:
            out[e] = fp8_gemm_nt(gt, xt, torch.float32).to(out_dtype)
    return out
