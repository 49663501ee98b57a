"""Scaling-aware transpose on the GPU (CUDA, csrc/scaling_aware_transpose.cu); twin of
``fp8flow_megatron.numerics.transpose.scaling_aware_transpose``.

Row-wise 1x128 FP8 -> column-wise FP8 from the codes and their power-of-two scales, every expert split in one launch,
bit-identical to the twin (= quantize_1x128(dequantize(q_split).t()) per split). The column-wise scales come either in
the twin's compact layout or GEMM-ready: the layout of TE's 1x128 column-wise ``scale_inv`` ([ceil(m/128), pad4(K)],
the compact one transposed, K padded to a multiple of 4), so TE's blockwise GEMM reads them with no scale-transpose
kernel in between (wgrad: ``Float8BlockwiseQTensorStorage(columnwise_data=data, columnwise_scale_inv=scale_inv)``).
"""

from __future__ import annotations

from typing import List, NamedTuple, Optional, Sequence, Union

import torch

from ..numerics.format import BLOCK, FP8_DTYPE, ROWWISE_1X128, Fp8Blockwise, ceil_div
from ._extension import cuda_extension
from ._triton import require_cuda

SCALE_LAYOUTS = ("compact", "gemm_ready")


class ColumnwiseGemmReady(NamedTuple):
    """Column-wise 1x128 FP8 of one split of m rows, laid out as TE's blockwise GEMM reads it.

    data:      float8_e4m3fn [K, m], row-major: the codes of the transpose (TE's ``columnwise_data`` of the [m, K]
               tensor; also what the twin's Fp8Blockwise.data holds).
    scale_inv: float32 [ceil(m/128), pad4(K)]: scale_inv[b, k] scales data[k, 128b : 128b + 128] (TE's
               ``columnwise_scale_inv``); columns K .. pad4(K) - 1 are 0.
    """

    data: torch.Tensor
    scale_inv: torch.Tensor


def scaling_aware_transpose_cuda(
    q: Fp8Blockwise, m_splits: Optional[Sequence[int]] = None, *, scale_layout: str = "compact"
) -> Union[Fp8Blockwise, ColumnwiseGemmReady, List[Fp8Blockwise], List[ColumnwiseGemmReady]]:
    """Column-wise FP8 form of a row-wise 1x128 tensor, every split in one kernel launch.

    q:            Fp8Blockwise with block (1, 128) on a CUDA device: data [M, K], compact scale_inv [M, ceil(K/128)]
                  (powers of two, as every quantizer here produces).
    m_splits:     optional per-expert row counts (ints >= 0, zeros allowed) summing to M; no 128-block crosses a split.
    scale_layout: "compact" (default): Fp8Blockwise(data [K, m], scale_inv [K, ceil(m/128)]), the twin's result;
                  "gemm_ready": ColumnwiseGemmReady(data [K, m], scale_inv [ceil(m/128), pad4(K)]).
    Returns one result without m_splits (m = M), else a list with one result per split. All results are contiguous
    views into one codes buffer and one scales buffer.
    """
    out_codes, out_scale_inv, splits, blocks, scale_row_len = scaling_aware_transpose_buffers(q, m_splits, scale_layout)
    gemm_ready = scale_layout == "gemm_ready"
    k = q.data.shape[1]
    results = []
    row, blk = 0, 0
    for s, nb in zip(splits, blocks):
        data = out_codes[row * k : (row + s) * k].view(k, s).view(FP8_DTYPE)
        if gemm_ready:
            scale = out_scale_inv[blk * scale_row_len : (blk + nb) * scale_row_len].view(nb, scale_row_len)
            results.append(ColumnwiseGemmReady(data, scale))
        else:
            scale = out_scale_inv[blk * k : (blk + nb) * k].view(k, nb)
            results.append(Fp8Blockwise(data=data, scale_inv=scale, block=ROWWISE_1X128))
        row, blk = row + s, blk + nb
    return results[0] if m_splits is None else results


def scaling_aware_transpose_buffers(q: Fp8Blockwise, m_splits: Optional[Sequence[int]], scale_layout: str):
    """The one launch behind scaling_aware_transpose_cuda, returning its flat output buffers without per-split views
    (callers that wrap every split themselves, like the TE GEMM engine, save 64 x 3 view calls of host time).

    Returns (codes uint8 [M * K]: split i is [K, m_i] row-major at offset K * (m_0 + ... + m_{i-1}),
             scale_inv fp32 [sum_i ceil(m_i/128) * R]: split i is [ceil(m_i/128), R] (compact: [K, ceil(m_i/128)]),
             splits (ints), blocks (ceil(m_i/128) per split), R = pad4(K) for "gemm_ready", else K).
    """
    if tuple(q.block) != ROWWISE_1X128:
        raise ValueError(f"scaling_aware_transpose needs a 1x128 row-wise tensor, got block {q.block}")
    if scale_layout not in SCALE_LAYOUTS:
        raise ValueError(f"scale_layout must be one of {SCALE_LAYOUTS}, got {scale_layout!r}")
    require_cuda("scaling_aware_transpose_cuda", q.data)
    m_total, k = q.data.shape
    splits = [m_total] if m_splits is None else [int(s) for s in m_splits]
    if any(s < 0 for s in splits) or sum(splits) != m_total:
        raise ValueError(f"m_splits must be non-negative and sum to M={m_total}, got {splits}")
    gemm_ready = scale_layout == "gemm_ready"
    scale_row_len = ceil_div(k, 4) * 4 if gemm_ready else k
    blocks = [ceil_div(s, BLOCK) for s in splits]
    device = q.data.device
    out_codes = torch.empty(m_total * k, dtype=torch.uint8, device=device)
    out_scale_inv = torch.empty(sum(blocks) * scale_row_len, dtype=torch.float32, device=device)
    if m_total > 0 and k > 0:
        cuda_extension().scaling_aware_transpose(
            q.data.contiguous().view(torch.uint8), q.scale_inv.contiguous(), splits, gemm_ready,
            out_codes, out_scale_inv,
        )  # fmt: skip
    return out_codes, out_scale_inv, splits, blocks, scale_row_len


def scaling_aware_transpose_buffers_grouped(q: Fp8Blockwise, groups, scale_layout: str = "compact"):
    """scaling_aware_transpose_buffers with the splits read from device memory (the sync-free path): the groups of
    a numerics.groups.RowGroups over q's rows, one launch over a worst-case grid; nothing is read on the host.

    Returns (codes uint8 [num_rows * K]: group e is [K, m_e] row-major at offset K * offsets[e];
             scale_inv fp32 [max_tiles * R]: group e is [K, ceil(m_e/128)] (compact) at offset K * tiles[e], or
             [ceil(m_e/128), R] (gemm_ready, R = pad4(K)) at offset R * tiles[e]; R).
    Each group's result is bit-identical to scaling_aware_transpose_buffers' for the same rows. The entries past the
    groups (the tail rows' codes, the blocks past tiles[E]) are left unwritten.
    """
    if tuple(q.block) != ROWWISE_1X128:
        raise ValueError(f"scaling_aware_transpose needs a 1x128 row-wise tensor, got block {q.block}")
    if scale_layout not in SCALE_LAYOUTS:
        raise ValueError(f"scale_layout must be one of {SCALE_LAYOUTS}, got {scale_layout!r}")
    require_cuda("scaling_aware_transpose_buffers_grouped", q.data, groups.offsets)
    m_total, k = q.data.shape
    if m_total != groups.num_rows:
        raise ValueError(f"scaling_aware_transpose_buffers_grouped: q has {m_total} rows, the groups {groups.num_rows}")
    gemm_ready = scale_layout == "gemm_ready"
    scale_row_len = ceil_div(k, 4) * 4 if gemm_ready else k
    device = q.data.device
    out_codes = torch.empty(m_total * k, dtype=torch.uint8, device=device)
    out_scale_inv = torch.empty(groups.max_tiles * scale_row_len, dtype=torch.float32, device=device)
    if m_total > 0 and k > 0 and groups.num_groups > 0:
        cuda_extension().scaling_aware_transpose_grouped(
            q.data.contiguous().view(torch.uint8), q.scale_inv.contiguous(), groups.offsets, groups.tiles,
            groups.max_tiles, gemm_ready, out_codes, out_scale_inv,
        )  # fmt: skip
    return out_codes, out_scale_inv, scale_row_len
