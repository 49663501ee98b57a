"""Fused permute+pad and unpermute+unpad on the GPU (Triton); twins of ``fp8flow_megatron.numerics.permute``.

permute_pad_rows_triton     one launch moves, per output row, the FP8 codes, the row's 1x128 scales and its prob (or
                            the bytes of a plain tensor's row), writing zero rows (scale_inv 1, prob 0) where the
                            index is -1. Rows are moved as bytes, so the result is bit-identical for every dtype.
unpermute_unpad_rows_triton one launch sums, per token, its rows in slot order in fp32 (times its probs if given),
                            then rounds once; padding rows are never read. Bit-identical to the twin: the kernel is
                            compiled without FMA contraction, so row * prob and the add round separately as in torch.
The index maps come from ``numerics.permute.routing_rows`` / ``chunk_sort_pad_rows`` (bookkeeping, built once per
step). Indices are not range-checked on the device (that would cost a host sync): src_rows < N_in, dst_rows < N_pad.
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch

from ..numerics.format import ROWWISE_1X128, Fp8Blockwise
from ._triton import jit, next_power_of_2, require_cuda, require_triton, tl

# One program per output row; up to 4 KiB of a row per loop step, 16 bytes per thread per access.
_MAX_ROW_CHUNK_BYTES = 4096
# Unpermute: tokens' slots are unrolled when there are few of them (top-k maps), looped otherwise ([T, E] maps).
_MAX_UNROLLED_SLOTS = 16


@jit
def _permute_pad_rows_kernel(
    # inputs
    src_rows_ptr,
    x_ptr,
    scale_ptr,
    probs_ptr,
    prob_src_ptr,
    # outputs
    out_ptr,
    out_scale_ptr,
    out_probs_ptr,
    # sizes
    ROW_BYTES,
    NUM_SCALES,
    # constexpr
    HAS_SCALES: tl.constexpr,
    HAS_PROBS: tl.constexpr,
    HAS_PROB_SRC: tl.constexpr,
    CHUNK: tl.constexpr,
    SCALE_CHUNK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    src = tl.load(src_rows_ptr + row)
    valid = src >= 0
    src = tl.where(valid, src, 0)
    for start in range(0, ROW_BYTES, CHUNK):
        offs = start + tl.arange(0, CHUNK)
        in_row = offs < ROW_BYTES
        v = tl.load(x_ptr + src * ROW_BYTES + offs, mask=in_row & valid, other=0)
        tl.store(out_ptr + row * ROW_BYTES + offs, v, mask=in_row)
    if HAS_SCALES:
        offs = tl.arange(0, SCALE_CHUNK)
        in_row = offs < NUM_SCALES
        s = tl.load(scale_ptr + src * NUM_SCALES + offs, mask=in_row & valid, other=1.0)
        tl.store(out_scale_ptr + row * NUM_SCALES + offs, s, mask=in_row)
    if HAS_PROBS:
        if HAS_PROB_SRC:
            p_src = tl.load(prob_src_ptr + row)
        else:
            p_src = tl.load(src_rows_ptr + row)
        p_valid = p_src >= 0
        p = tl.load(probs_ptr + tl.where(p_valid, p_src, 0), mask=p_valid, other=0.0)
        tl.store(out_probs_ptr + row, p)


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    """[N, H] of any dtype -> contiguous uint8 [N, H * itemsize] sharing the bits."""
    return t.contiguous().view(torch.uint8)


def permute_pad_rows_triton(
    x: Union[Fp8Blockwise, torch.Tensor],
    src_rows: torch.Tensor,
    probs: Optional[torch.Tensor] = None,
    prob_src: Optional[torch.Tensor] = None,
) -> Tuple[Union[Fp8Blockwise, torch.Tensor], Optional[torch.Tensor]]:
    """Gather rows (FP8 codes and their 1x128 scales together, or a plain tensor) with zero padding rows, one launch.

    x:        Fp8Blockwise (1x128) with data [N_in, H] and compact scale_inv [N_in, ceil(H/128)], or a CUDA tensor
              [N_in, H] of any dtype.
    src_rows: int64 (or int32) [N_out]; source row of each output row, -1 for a padding row (zero codes, scale_inv 1,
              prob 0).
    probs:    optional 1-D tensor (any shape, read flattened); probs_out[i] = probs[prob_src[i]] (prob_src defaults to
              src_rows).
    prob_src: optional int64 [N_out] index into probs.reshape(-1) (-1 where src_rows is -1).
    Returns (x_out [N_out, H] of x's kind, contiguous; probs_out [N_out] of probs' dtype, or None).
    """
    if isinstance(x, Fp8Blockwise):
        if x.block != ROWWISE_1X128:
            raise ValueError(f"permute_pad_rows_triton needs 1x128 row-wise FP8, got block {x.block}")
        data, scale_inv = x.data, x.scale_inv.contiguous()
    else:
        data, scale_inv = x, None
    if data.dim() != 2:
        raise ValueError(f"permute_pad_rows_triton: x must be [N_in, H], got shape {tuple(data.shape)}")
    require_cuda("permute_pad_rows_triton", data, src_rows, probs, prob_src)
    src_rows = src_rows.reshape(-1).to(torch.int64).contiguous()
    n_out, hidden = src_rows.numel(), data.shape[1]
    out = torch.empty((n_out, hidden), dtype=data.dtype, device=data.device)
    out_scale = None if scale_inv is None else torch.empty((n_out, scale_inv.shape[1]), dtype=torch.float32,
                                                           device=data.device)  # fmt: skip
    probs_flat = None if probs is None else probs.reshape(-1).contiguous()
    out_probs = None if probs_flat is None else torch.empty(n_out, dtype=probs_flat.dtype, device=data.device)
    if prob_src is not None:
        prob_src = prob_src.reshape(-1).to(torch.int64).contiguous()
        if prob_src.numel() != n_out:
            raise ValueError(f"permute_pad_rows_triton: prob_src has {prob_src.numel()} entries, src_rows {n_out}")

    if n_out > 0:
        require_triton("permute_pad_rows_triton")
        row_bytes = hidden * data.element_size()
        num_scales = 0 if scale_inv is None else scale_inv.shape[1]
        if data.shape[0] > 0:
            src_bytes, scale_in, probs_in = _as_bytes(data), scale_inv, probs_flat
        else:  # every row is padding, nothing is read; Triton still wants valid pointers of the right dtypes
            src_bytes = torch.zeros(1, max(row_bytes, 1), dtype=torch.uint8, device=data.device)
            scale_in = torch.ones(1, max(num_scales, 1), dtype=torch.float32, device=data.device)
            probs_in = None if probs_flat is None else torch.zeros(1, dtype=probs_flat.dtype, device=data.device)
        if probs_in is not None and probs_in.numel() == 0:
            probs_in = torch.zeros(1, dtype=probs_in.dtype, device=data.device)
        dummy = src_rows  # stands in for absent optional pointers; never dereferenced
        _permute_pad_rows_kernel[(n_out,)](
            src_rows, src_bytes,
            scale_in if scale_in is not None else dummy,
            probs_in if probs_in is not None else dummy,
            prob_src if prob_src is not None else dummy,
            _as_bytes(out) if row_bytes > 0 else dummy,
            out_scale if out_scale is not None else dummy,
            out_probs if out_probs is not None else dummy,
            row_bytes, num_scales,
            HAS_SCALES=num_scales > 0,
            HAS_PROBS=probs is not None,
            HAS_PROB_SRC=prob_src is not None,
            CHUNK=min(next_power_of_2(max(row_bytes, 16)), _MAX_ROW_CHUNK_BYTES),
            SCALE_CHUNK=next_power_of_2(max(num_scales, 1)),
            num_warps=4,
        )  # fmt: skip
    if scale_inv is not None:
        return Fp8Blockwise(out, out_scale, ROWWISE_1X128), out_probs
    return out, out_probs


@jit
def _unpermute_unpad_rows_kernel(
    # inputs
    y_ptr,
    dst_rows_ptr,
    probs_ptr,
    # outputs
    out_ptr,
    # sizes
    HIDDEN,
    # strides
    stride_y,
    # constexpr
    SLOTS: tl.constexpr,
    HAS_PROBS: tl.constexpr,
    UNROLL: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    in_row = offs < HIDDEN
    acc = tl.zeros((BLOCK_H,), dtype=tl.float32)
    if UNROLL:
        for s in tl.static_range(SLOTS):
            idx = tl.load(dst_rows_ptr + token * SLOTS + s)
            valid = idx >= 0
            row = tl.load(y_ptr + tl.where(valid, idx, 0) * stride_y + offs, mask=in_row & valid, other=0.0)
            row = row.to(tl.float32)
            if HAS_PROBS:
                row = row * tl.load(probs_ptr + token * SLOTS + s).to(tl.float32)
            acc += tl.where(valid, row, 0.0)
    else:
        for s in range(SLOTS):
            idx = tl.load(dst_rows_ptr + token * SLOTS + s)
            valid = idx >= 0
            row = tl.load(y_ptr + tl.where(valid, idx, 0) * stride_y + offs, mask=in_row & valid, other=0.0)
            row = row.to(tl.float32)
            if HAS_PROBS:
                row = row * tl.load(probs_ptr + token * SLOTS + s).to(tl.float32)
            acc += tl.where(valid, row, 0.0)
    tl.store(out_ptr + token * HIDDEN + offs, acc.to(out_ptr.dtype.element_ty), mask=in_row)


def unpermute_unpad_rows_triton(
    y: torch.Tensor, dst_rows: torch.Tensor, probs: Optional[torch.Tensor] = None, out_dtype: Optional[torch.dtype] = None
) -> torch.Tensor:
    """Reduce permuted rows back to tokens, skipping padding rows, one launch.

    y:        CUDA [N_pad, H] bf16 or fp32 with unit column stride (expert outputs, or dgrad of the permuted input).
    dst_rows: int64 (or int32) [T, S]; the rows of y that belong to token t (S = experts or top-k slots), -1 for none.
    probs:    optional [T, S] weights applied to each row before summing (rows of -1 slots are never weighted).
    Returns a contiguous [T, H] tensor of out_dtype (default y.dtype): fp32 sum over s = 0..S-1 in order, one rounding.
    """
    if y.dim() != 2:
        raise ValueError(f"unpermute_unpad_rows_triton: y must be [N_pad, H], got shape {tuple(y.shape)}")
    if dst_rows.dim() != 2:
        raise ValueError(f"unpermute_unpad_rows_triton: dst_rows must be [T, S], got shape {tuple(dst_rows.shape)}")
    if probs is not None and tuple(probs.shape) != tuple(dst_rows.shape):
        raise ValueError(
            f"unpermute_unpad_rows_triton: probs has shape {tuple(probs.shape)}, dst_rows {tuple(dst_rows.shape)}"
        )
    require_cuda("unpermute_unpad_rows_triton", y, dst_rows, probs)
    tokens, slots = dst_rows.shape
    hidden = y.shape[1]
    out = torch.empty(tokens, hidden, dtype=out_dtype or y.dtype, device=y.device)
    if tokens == 0 or hidden == 0:
        return out
    if slots == 0:
        return out.zero_()
    require_triton("unpermute_unpad_rows_triton")
    if y.stride(1) != 1:
        y = y.contiguous()
    dst_rows = dst_rows.to(torch.int64).contiguous()
    if probs is not None:
        probs = probs.contiguous()
    if y.shape[0] == 0:  # every slot is -1; Triton still wants a valid pointer
        y = torch.zeros(1, hidden, dtype=y.dtype, device=y.device)
    block_h = min(next_power_of_2(hidden), 2048 if y.element_size() == 2 else 1024)
    grid = (tokens, -(-hidden // block_h))
    _unpermute_unpad_rows_kernel[grid](
        y, dst_rows, probs if probs is not None else dst_rows, out, hidden, y.stride(0),
        SLOTS=slots, HAS_PROBS=probs is not None, UNROLL=slots <= _MAX_UNROLLED_SLOTS, BLOCK_H=block_h,
        num_warps=4,
        enable_fp_fusion=False,  # row * prob and the add must round separately, as in the twin
    )  # fmt: skip
    return out
