"""Zero the tail rows of a varlen GEMM output on the GPU (Triton); twin of
``fp8flow_megatron.numerics.groups.zero_tail_rows``.

A GEMM that writes only its groups' rows (TE's grouped-tensor GEMM) leaves rows offsets[E] .. num_rows of a
worst-case buffer unwritten; the varlen contract (numerics/groups.py) wants them zero. The end row is read on the
device: a worst-case grid whose programs before the end store nothing (all masked; no host read, no sync).
"""

from __future__ import annotations

import torch

from ._triton import jit, require_cuda, require_triton, tl

_BLOCK_M, _BLOCK_N = 32, 128


@jit
def _zero_tail_rows_kernel(
    # outputs
    y_ptr,
    # inputs
    offsets_ptr,
    # sizes
    num_rows,
    num_cols,
    num_groups,
    # strides
    stride_y,
    # constexpr
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    end = tl.load(offsets_ptr + num_groups)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = (rows >= end) & (rows < num_rows)
    zeros = tl.zeros((BLOCK_M, BLOCK_N), dtype=y_ptr.dtype.element_ty)
    for n0 in range(0, num_cols, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        mask = row_mask[:, None] & (cols[None, :] < num_cols)
        tl.store(y_ptr + rows[:, None].to(tl.int64) * stride_y + cols[None, :], zeros, mask=mask)


def zero_tail_rows_triton(y: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """y [num_rows, N] (row-major, any float dtype) with rows offsets[-1] .. num_rows - 1 set to zero, in place;
    offsets: int64 [E + 1] on y's device (RowGroups.offsets). Returns y."""
    require_triton("zero_tail_rows_triton")
    require_cuda("zero_tail_rows_triton", y, offsets)
    if y.dim() != 2 or y.stride(1) != 1:
        raise ValueError(f"zero_tail_rows_triton: y must be 2-D with unit column stride, got {tuple(y.shape)}")
    rows, cols = y.shape
    if rows and cols:
        grid = (-(-rows // _BLOCK_M),)
        _zero_tail_rows_kernel[grid](y, offsets, rows, cols, offsets.numel() - 1, y.stride(0),
                                     BLOCK_M=_BLOCK_M, BLOCK_N=_BLOCK_N)  # fmt: skip
    return y
