"""Blockwise E4M3 quantize / dequantize: the executable spec (pure torch, CPU or GPU, slow and obviously right)."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .format import (
    BLOCK,
    BLOCK_128X128,
    ROWWISE_1X128,
    Fp8Blockwise,
    ceil_div,
    check_nonfinite_flag,
    mark_nonfinite,
    saturating_cast_e4m3,
    scale_from_amax,
)


def _check_input(x: torch.Tensor, name: str) -> None:
    if x.dtype not in (torch.float32, torch.bfloat16):
        raise TypeError(f"{name}: x must be torch.float32 or torch.bfloat16, got {x.dtype}")
    if x.dim() != 2:
        raise ValueError(f"{name}: x must be 2-D [M, K], got shape {tuple(x.shape)}")
    if x.shape[1] < 1:
        raise ValueError(f"{name}: K must be >= 1, got shape {tuple(x.shape)}")


def quantize_1x128(x: torch.Tensor, nonfinite_flag: Optional[torch.Tensor] = None) -> Fp8Blockwise:
    """Row-wise 1x128 blockwise quantization (activations and gradients).

    x: [M, K] fp32 or bf16, M >= 0, K >= 1; the last block of a row may be partial (K % 128 != 0).
    nonfinite_flag: None, or a 1-element int32 tensor on x's device, set to 1 (never cleared) when x holds an inf or
        NaN -- which the codes cannot show: inf saturates to ±448 and NaN is encoded like any value.
    Returns Fp8Blockwise(data [M, K] e4m3, scale_inv [M, ceil(K/128)] fp32, block (1, 128)).
    """
    _check_input(x, "quantize_1x128")
    check_nonfinite_flag(nonfinite_flag, x.device, "quantize_1x128")
    m, k = x.shape
    nb = ceil_div(k, BLOCK)
    x32 = x.to(torch.float32)
    # Zero padding of a partial last block cannot change its amax (amax >= 0), and is dropped afterwards.
    blocks = F.pad(x32, (0, nb * BLOCK - k)).view(m, nb, BLOCK)
    amax = blocks.abs().amax(dim=2) if m > 0 else x32.new_zeros(0, nb)
    mark_nonfinite(nonfinite_flag, amax)
    scale = scale_from_amax(amax) if m > 0 else x32.new_ones(0, nb)
    data = saturating_cast_e4m3(blocks * scale.unsqueeze(2)).view(m, nb * BLOCK)[:, :k].contiguous()
    return Fp8Blockwise(data=data, scale_inv=1.0 / scale, block=ROWWISE_1X128)


def quantize_128x128(x: torch.Tensor, nonfinite_flag: Optional[torch.Tensor] = None) -> Fp8Blockwise:
    """128x128 blockwise quantization (weights).

    x: [M, K] fp32 or bf16, M >= 0, K >= 1; edge blocks may be partial in either dimension.
    nonfinite_flag: None, or a 1-element int32 tensor on x's device, set to 1 when x holds an inf or NaN.
    Returns Fp8Blockwise(data [M, K] e4m3, scale_inv [ceil(M/128), ceil(K/128)] fp32, block (128, 128)).
    """
    _check_input(x, "quantize_128x128")
    check_nonfinite_flag(nonfinite_flag, x.device, "quantize_128x128")
    m, k = x.shape
    mb, nb = ceil_div(m, BLOCK), ceil_div(k, BLOCK)
    x32 = x.to(torch.float32)
    blocks = F.pad(x32, (0, nb * BLOCK - k, 0, mb * BLOCK - m)).view(mb, BLOCK, nb, BLOCK)
    amax = blocks.abs().amax(dim=(1, 3)) if m > 0 else x32.new_zeros(0, nb)
    mark_nonfinite(nonfinite_flag, amax)
    scale = scale_from_amax(amax) if m > 0 else x32.new_ones(0, nb)
    data = saturating_cast_e4m3(blocks * scale[:, None, :, None]).view(mb * BLOCK, nb * BLOCK)[:m, :k].contiguous()
    return Fp8Blockwise(data=data, scale_inv=1.0 / scale, block=BLOCK_128X128)


def expand_scale_inv(q: Fp8Blockwise) -> torch.Tensor:
    """fp32 [M, K]: the scale_inv of each element's block."""
    m, k = q.data.shape
    bm, bk = q.block
    return q.scale_inv.repeat_interleave(bm, dim=0)[:m].repeat_interleave(bk, dim=1)[:, :k]


def dequantize(q: Fp8Blockwise) -> torch.Tensor:
    """fp32 tensor of q's shape: each code times the scale_inv of its block (exact: scales are powers of two)."""
    return q.data.to(torch.float32) * expand_scale_inv(q)
