"""Grouped blockwise-FP8 GEMMs for all experts in one launch each (Triton); twins of
``fp8flow_megatron.numerics.gemm.fp8_grouped_gemm_nt`` and ``fp8_grouped_wgrad``.

Why: TE's grouped GEMM on released TE issues one cuBLASLt call per expert (64 per GEMM, ~1.2-1.5 ms of host time per
grouped GEMM on an H100 host), which makes the MoE layer host-bound; its single-launch grouped path needs cuBLAS >=
13.4. These kernels take the whole expert batch in one launch.

Numerics (the DeepGEMM-style "promotion"): for every 128-wide K block the tensor cores compute the FP8 x FP8 partial
product in fp32, which is then scaled by the two blocks' scales and added to an fp32 accumulator -- the same sum as
the twin's dequantize -> fp32 matmul up to fp32 summation order. Output is rounded once to the output dtype.

fp8_grouped_gemm_nt_triton  out[M, N] = A[M, K] (1x128 per row) . B[e][N, K]^T (128x128), rows grouped by expert
                            (fprop: A = x, B = W; dgrad: A = dy, B = W^T as an exact 128x128 block transpose)
fp8_grouped_wgrad_triton    dw[e][N, K] = T(g_e) . T(x_e)^T over expert e's rows, T the scaling-aware transpose
fp8_varlen_gemm_nt_triton, fp8_varlen_wgrad_triton
                            the same with the row groups read from device memory (numerics.groups.RowGroups: offsets
                            and 128-row tile starts computed on the device, and a tile -> group table built there by
                            one searchsorted): worst-case grids, every program reads its expert and rows from device
                            memory, tail rows past the last group are written as zeros by the GEMM and never read by
                            the wgrad.
                            No host read, no sync: the sync-free MoE layer's engine (twins: numerics.gemm.fp8_varlen_*).
The host-split functions build a RowGroups from their m_splits (one small pinned copy) and run the same kernels.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from ..numerics.format import BLOCK, ROWWISE_1X128, Fp8Blockwise, ceil_div
from ..numerics.gemm import Fp8BlockwiseStack, check_wgrad_out
from ..numerics.groups import RowGroups
from ._tables import cached_int64_table
from ._triton import HAVE_TRITON, jit, require_cuda, require_triton, tl, triton

try:  # host-side TMA descriptors (Triton >= 3.4)
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:
    TensorDescriptor = None

TILE_M = 128  # rows per program along M: RowGroups.tiles count 128-row tiles (= the transposes' blocks), not tuned


# Candidate launch configs (BLOCK_N, num_warps, num_stages), from scripts/tune_grouped_gemm.py on an H200 at the
# DeepSeek-V2-Lite expert shapes (BENCHMARKS.md, issue 15): fprop/dgrad peak at 128/8/3-4 (~48-50% of the dense
# cuBLAS FP8 ceiling; BLOCK_N 256 spills, 4 warps on 128 columns halves the rate); the wgrad GEMM peaks at a 64-column
# tile on one warpgroup, 64/4/3 (1.4-1.7x its old 128/8/3: 601 vs 427 TFLOP/s at 64 x 1,536 rows, 2048->2816).
# Every config gives bit-identical outputs (same per-128-K-block promotion order); only the speed differs.
_NT_CONFIGS = ((128, 8, 3), (128, 8, 4), (64, 4, 3), (64, 4, 4))
# The TMA form (.gpu-bundle experiment, BENCHMARKS.md "TMA loads"): fprop peaks at 64/4/3 (824-831 TFLOP/s at the
# fc1 shapes), dgrad at 128/8/4 (856-866); BLOCK_N stays <= 128 so a tile reads one 128x128 weight scale per K block.
_NT_TMA_CONFIGS = ((64, 4, 3), (128, 8, 4), (128, 8, 3), (64, 4, 4))
_WGRAD_CONFIGS = ((64, 4, 3), (64, 4, 4), (128, 8, 3), (128, 8, 4))


def _configs(block_names, candidates):
    if not HAVE_TRITON:
        return []
    return [triton.Config({block_names[0]: bn}, num_warps=warps, num_stages=stages) for bn, warps, stages in candidates]


def _autotune(configs, key):
    if not HAVE_TRITON:
        return lambda fn: fn
    return triton.autotune(configs=configs, key=key)


@jit
def _nt_tile(offsets_ptr, tiles_ptr, tile_groups_ptr, num_groups, num_rows, num_kb, pid_m, BLOCK_M: tl.constexpr):
    # M tile pid_m < tiles[E] is tile pid_m - tiles[e] of group e = tile_groups[pid_m] (all read from device memory);
    # the programs after them write the tail rows offsets[E] .. num_rows - 1 as zeros (no K loop), the rest of the
    # worst-case grid stores nothing. Returns (expert, first row, row end, number of K blocks to run).
    real_tiles = tl.load(tiles_ptr + num_groups)
    in_group = pid_m < real_tiles
    expert = tl.load(tile_groups_ptr + pid_m).to(tl.int64)
    group_row0 = tl.load(offsets_ptr + expert) + (pid_m - tl.load(tiles_ptr + expert)) * BLOCK_M
    tail_row0 = tl.load(offsets_ptr + num_groups) + (pid_m - real_tiles) * BLOCK_M
    row0 = tl.where(in_group, group_row0, tail_row0).to(tl.int64)
    row_end = tl.where(in_group, tl.load(offsets_ptr + expert + 1), num_rows).to(tl.int64)
    k_blocks = tl.where(in_group, num_kb, 0)
    return expert, row0, row_end, k_blocks


@_autotune(_configs(["BLOCK_N"], _NT_CONFIGS), key=["N", "K"])
@jit
def _grouped_gemm_nt_kernel(
    a_ptr, a_scale_ptr, b_ptr, b_scale_ptr, c_ptr, offsets_ptr, tiles_ptr, tile_groups_ptr, num_groups, num_rows,
    N, K, num_kb, num_nb,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
):  # fmt: skip
    # The pointer-load form (any K, any alignment, any GPU Triton runs on); _grouped_gemm_nt_tma_kernel is the same
    # product with TMA loads. grid (N tiles, max_tiles): consecutive programs share one A tile (L2), and one expert's
    # B stays hot across its tiles.
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    expert, row0, row_end, k_blocks = _nt_tile(
        offsets_ptr, tiles_ptr, tile_groups_ptr, num_groups, num_rows, num_kb, pid_m, BLOCK_M
    )
    offs_m = row0 + tl.arange(0, BLOCK_M)
    mask_m = offs_m < row_end
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    a_rows = a_ptr + offs_m[:, None] * K
    b_rows = b_ptr + expert * N * K + offs_n[:, None] * K
    sa_rows = a_scale_ptr + offs_m * num_kb
    sb_rows = b_scale_ptr + expert * num_nb * num_kb + (offs_n // BLOCK_K) * num_kb
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(0, k_blocks):
        k = kb * BLOCK_K + offs_k
        if EVEN_K:  # K % 128 == 0 (every V2-Lite linear): no K predicate on the loads, +3-4% (tune_grouped_gemm.py)
            a = tl.load(a_rows + k[None, :], mask=mask_m[:, None], other=0.0)
            b = tl.load(b_rows + k[None, :], mask=mask_n[:, None], other=0.0)
        else:
            mask_k = k < K
            a = tl.load(a_rows + k[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            b = tl.load(b_rows + k[None, :], mask=mask_n[:, None] & mask_k[None, :], other=0.0)
        sa = tl.load(sa_rows + kb, mask=mask_m, other=0.0)
        sb = tl.load(sb_rows + kb, mask=mask_n, other=0.0)
        acc += tl.dot(a, tl.trans(b)) * sa[:, None] * sb[None, :]
    c = c_ptr + offs_m[:, None] * N + offs_n[None, :]
    tl.store(c, acc.to(c_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def _set_tma_blocks(nargs):
    # autotuner pre-hook: the host descriptors' box sizes follow the config being launched
    nargs["a_desc"].block_shape = [nargs["BLOCK_M"], nargs["BLOCK_K"]]
    nargs["b_desc"].block_shape = [nargs["BLOCK_N"], nargs["BLOCK_K"]]


def _tma_configs():
    if not HAVE_TRITON:
        return []
    return [
        triton.Config({"BLOCK_N": bn}, num_warps=warps, num_stages=stages, pre_hook=_set_tma_blocks)
        for bn, warps, stages in _NT_TMA_CONFIGS
    ]


@_autotune(_tma_configs(), key=["N", "K"])
@jit
def _grouped_gemm_nt_tma_kernel(
    a_desc, a_scale_ptr, b_desc, b_scale_ptr, c_ptr, offsets_ptr, tiles_ptr, tile_groups_ptr, num_groups, num_rows,
    N, K, num_kb, num_nb,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    # _grouped_gemm_nt_kernel with A and B read through TMA descriptors (Hopper): a_desc over A [num_rows, K], b_desc
    # over the weight stack as one [E * N, K] matrix. The boxes may run past a group's rows into the next group's, or
    # past N into the next expert's rows: those rows / columns only feed outputs that the masked store drops (every
    # output row depends on its own A row only). Past the tensor's edges (K tail, last rows) TMA fills zeros, which is
    # what the pointer form's masked loads give. Same tl.dot per 128-K block and the same promotion, so the outputs
    # are bit-identical to the pointer form's (tested); 1.2-1.4x faster at the V2-Lite shapes (BENCHMARKS.md).
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    expert, row0, row_end, k_blocks = _nt_tile(
        offsets_ptr, tiles_ptr, tile_groups_ptr, num_groups, num_rows, num_kb, pid_m, BLOCK_M
    )
    offs_m = row0 + tl.arange(0, BLOCK_M)
    mask_m = offs_m < row_end
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    sa_rows = a_scale_ptr + offs_m * num_kb
    sb_ptr = b_scale_ptr + (expert * num_nb + (pid_n * BLOCK_N) // BLOCK_K) * num_kb  # BLOCK_N <= 128: one scale
    a_row = row0.to(tl.int32)  # TMA coordinates are 32-bit; the host checks num_rows and E * N fit
    b_row = (expert * N + pid_n * BLOCK_N).to(tl.int32)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(0, k_blocks):
        a = a_desc.load([a_row, kb * BLOCK_K])
        b = b_desc.load([b_row, kb * BLOCK_K])
        sa = tl.load(sa_rows + kb, mask=mask_m, other=0.0)
        sb = tl.load(sb_ptr + kb)
        acc += tl.dot(a, b.T) * (sa[:, None] * sb)
    c = c_ptr + offs_m[:, None] * N + offs_n[None, :]
    tl.store(c, acc.to(c_ptr.dtype.element_ty), mask=mask_m[:, None] & (offs_n < N)[None, :])


@jit
def _grouped_wgrad_body(
    g_ptr, g_scale_ptr, x_ptr, x_scale_ptr, c_ptr, out_ptrs, offsets_ptr, tiles_ptr,
    N, K,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr, ROWS_ALIGNED_16: tl.constexpr,
    OUT_TABLE: tl.constexpr, OUT_ALIGNED_16: tl.constexpr, ACCUMULATE: tl.constexpr, TMA: tl.constexpr,
):  # fmt: skip
    # g_ptr / x_ptr: the scaling-aware transposes in the compact layout -- split e is [N, m_e] (resp. [K, m_e]) at
    # row offset offsets[e], its scales [N, ceil(m_e/128)] at block offset tiles[e] (both read from device memory).
    # Output: OUT_TABLE False -- c_ptr is one contiguous [E, N, K] tensor (out_ptrs unused); OUT_TABLE True -- out_ptrs
    # is an int64 [E] table of the addresses of E contiguous [N, K] tensors of c_ptr's dtype (c_ptr is the first).
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    expert = tl.program_id(2)
    m0 = tl.load(offsets_ptr + expert).to(tl.int64)
    me = tl.load(offsets_ptr + expert + 1).to(tl.int64) - m0
    if ROWS_ALIGNED_16:
        # The row length m_e is read from memory, so Triton cannot know it; without this hint every FP8 row load is
        # split into single bytes (measured 4x slower). The dispatcher pads every expert to 16 rows (the caller's
        # RowGroups.align says so; the offsets are then multiples of 16 too).
        m0 = tl.multiple_of(m0, 16)
        me = tl.multiple_of(me, 16)
    blk0 = tl.load(tiles_ptr + expert).to(tl.int64)
    nb = (me + BLOCK_M - 1) // BLOCK_M
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_n = offs_n < N
    mask_k = offs_k < K
    gs_rows = g_scale_ptr + N * blk0 + offs_n * nb
    xs_rows = x_scale_ptr + K * blk0 + offs_k * nb
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    if TMA:
        # Hopper: expert e's two operands read through TMA descriptors made here on the device, [N, m_e] and
        # [K, m_e] at its row offset (the host allows this only with ROWS_ALIGNED_16, so bases and the row stride m_e
        # are 16-byte multiples, and installs Triton's scratch allocator for the descriptors). Boxes past N, K or m_e
        # are zero-filled, as the pointer form's masked loads give: the same tl.dot per 128-row block and the same
        # promotion, so the outputs are bit-identical (tested). GEMM alone at 64/4/3 (BENCHMARKS.md, 2026-12-03):
        # 698 vs 601 TFLOP/s at ep1-fc1, even (524 vs 527) at ep8-fc1, where 4 stages reach 607.
        if me > 0:
            me32 = me.to(tl.int32)
            g_desc = tl.make_tensor_descriptor(
                g_ptr + N * m0, shape=[N, me32], strides=[me32, 1], block_shape=[BLOCK_N, BLOCK_M]
            )
            x_desc = tl.make_tensor_descriptor(
                x_ptr + K * m0, shape=[K, me32], strides=[me32, 1], block_shape=[BLOCK_K, BLOCK_M]
            )
            for b in range(0, nb.to(tl.int32)):
                g = g_desc.load([pid_n * BLOCK_N, b * BLOCK_M])
                x = x_desc.load([pid_k * BLOCK_K, b * BLOCK_M])
                sg = tl.load(gs_rows + b, mask=mask_n, other=0.0)
                sx = tl.load(xs_rows + b, mask=mask_k, other=0.0)
                acc += tl.dot(g, tl.trans(x)) * sg[:, None] * sx[None, :]
    else:
        offs_m = tl.arange(0, BLOCK_M)
        g_rows = g_ptr + N * m0 + offs_n[:, None] * me
        x_rows = x_ptr + K * m0 + offs_k[:, None] * me
        for b in range(0, nb):
            m = b * BLOCK_M + offs_m
            mask_m = m < me
            g = tl.load(g_rows + m[None, :], mask=mask_n[:, None] & mask_m[None, :], other=0.0)
            x = tl.load(x_rows + m[None, :], mask=mask_k[:, None] & mask_m[None, :], other=0.0)
            sg = tl.load(gs_rows + b, mask=mask_n, other=0.0)
            sx = tl.load(xs_rows + b, mask=mask_k, other=0.0)
            acc += tl.dot(g, tl.trans(x)) * sg[:, None] * sx[None, :]
    if OUT_TABLE:
        # expert e's output is its own tensor anywhere in memory (megatron's main_grad: views into the DDP grad buffer)
        c_base = tl.load(out_ptrs + expert).to(c_ptr.dtype)
        if OUT_ALIGNED_16:
            c_base = tl.multiple_of(c_base, 16)  # an address read from memory has no known alignment; checked on host
    else:
        c_base = c_ptr + expert.to(tl.int64) * N * K
    c = c_base + offs_n[:, None] * K + offs_k[None, :]
    mask_c = mask_n[:, None] & mask_k[None, :]
    if ACCUMULATE:
        # an empty expert's buffer is left untouched, not rewritten as itself + 0 (which would turn -0 into +0)
        mask_c = mask_c & (me > 0)
        acc += tl.load(c, mask=mask_c, other=0.0).to(tl.float32)
    tl.store(c, acc.to(c_ptr.dtype.element_ty), mask=mask_c)


# Autotuned for the one-tensor output only: the autotuner times each config by running the kernel on the real
# arguments, which would add the gradient into the out= buffers once per trial. The out= path (main_grad
# accumulation, what training runs) launches the body with the config that won the sweep at every measured shape.
_grouped_wgrad_kernel = _autotune(_configs(["BLOCK_N"], _WGRAD_CONFIGS), key=["N", "K", "ROWS_ALIGNED_16", "TMA"])(
    _grouped_wgrad_body
)
_WGRAD_OUT_CONFIG = dict(BLOCK_N=64, num_warps=4, num_stages=3)
# Long per-expert reductions (EP=8's 12,288 rows) keep a 4th TMA stage busy: 607 vs 524 TFLOP/s at ep8-fc1, while
# at ep1-fc1's 1,536 rows 4 stages lose (600 vs 698). The split sits between the two measured shapes.
_WGRAD_OUT_DEEP_ROWS = 4096


def _wgrad_out_config(num_rows: int, num_experts: int, tma: bool) -> dict:
    if tma and num_rows >= _WGRAD_OUT_DEEP_ROWS * num_experts:
        return dict(_WGRAD_OUT_CONFIG, num_stages=4)
    return _WGRAD_OUT_CONFIG


def _stack(b: Union[Fp8BlockwiseStack, Sequence[Fp8Blockwise]]) -> Fp8BlockwiseStack:
    if isinstance(b, Fp8BlockwiseStack):
        return b
    return Fp8BlockwiseStack(torch.stack([w.data for w in b]), torch.stack([w.scale_inv for w in b]))


def _tma_ok(a_codes: torch.Tensor, w_codes: torch.Tensor) -> bool:
    """Whether the TMA form can read these operands: Hopper or newer, Triton with host descriptors, 16-byte aligned
    bases and row strides (K % 16 == 0), 32-bit coordinates. Otherwise the pointer form runs (same bits)."""
    if TensorDescriptor is None or _capability(a_codes.device) < 9:
        return False
    k = a_codes.shape[1]
    return (
        k % 16 == 0
        and w_codes.is_contiguous()
        and a_codes.data_ptr() % 16 == 0
        and w_codes.data_ptr() % 16 == 0
        and a_codes.shape[0] < 2**31
        and w_codes.shape[0] * w_codes.shape[1] < 2**31
    )


def _wgrad_tma_ok(rows_aligned: bool, *codes: torch.Tensor) -> bool:
    """Whether the wgrad can read its transposed operands through device-made TMA descriptors: Hopper or newer, a
    Triton with tl.make_tensor_descriptor, every expert's rows a multiple of 16 (16-byte row strides and bases) and
    16-byte aligned buffers. Otherwise the pointer form runs (same bits)."""
    if not rows_aligned or not hasattr(tl, "make_tensor_descriptor") or _capability(codes[0].device) < 9:
        return False
    return all(c.data_ptr() % 16 == 0 for c in codes)


def _scratch(size: int, alignment: int, stream: Optional[int]) -> torch.Tensor:
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _ensure_scratch_allocator() -> None:
    # Device-made descriptors live in a global scratch buffer that Triton asks its allocator for at launch (128
    # bytes per program). The allocator is a context variable: unset in each new thread (autograd's backward thread
    # included), so this runs before every such launch. One the user installed is kept.
    from triton.runtime import _allocation

    if isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
        triton.set_allocator(_scratch)


_CAPABILITY = {}


def _capability(device: torch.device) -> int:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _CAPABILITY:
        _CAPABILITY[index] = torch.cuda.get_device_capability(index)[0]
    return _CAPABILITY[index]


def _gemm(
    a: Fp8Blockwise, w: Fp8BlockwiseStack, groups: RowGroups, out_dtype: torch.dtype, tma: Optional[bool] = None
) -> torch.Tensor:
    """tma: None picks the TMA form where _tma_ok allows it; True / False force a form (tests compare the two)."""
    m_total, k = a.data.shape
    num_experts, n, _ = w.data.shape
    out = torch.empty(m_total, n, dtype=out_dtype, device=a.data.device)
    if m_total == 0 or n == 0:
        return out
    if num_experts == 0:
        return out.zero_()
    kb, nb = ceil_div(k, BLOCK), ceil_div(n, BLOCK)
    a_codes, a_scales = a.data.contiguous(), a.scale_inv.contiguous()

    def grid(meta):
        return (triton.cdiv(n, meta["BLOCK_N"]), groups.max_tiles)

    if tma is None:
        tma = _tma_ok(a_codes, w.data)
    if tma:
        # box sizes are placeholders: the autotuner's pre-hook sets them per config
        a_desc = TensorDescriptor.from_tensor(a_codes, [TILE_M, BLOCK])
        b_desc = TensorDescriptor.from_tensor(w.data.view(num_experts * n, k), [BLOCK, BLOCK])
        _grouped_gemm_nt_tma_kernel[grid](
            a_desc, a_scales, b_desc, w.scale_inv, out, groups.offsets, groups.tiles, groups.tile_groups,
            num_experts, m_total, n, k, kb, nb,
            BLOCK_M=TILE_M, BLOCK_K=BLOCK,
        )  # fmt: skip
        return out
    _grouped_gemm_nt_kernel[grid](
        a_codes, a_scales, w.data, w.scale_inv, out, groups.offsets, groups.tiles,
        groups.tile_groups, num_experts, m_total, n, k, kb, nb,
        BLOCK_M=TILE_M, BLOCK_K=BLOCK, EVEN_K=k % BLOCK == 0,
    )  # fmt: skip
    return out


def _check_gemm(a: Fp8Blockwise, op: str) -> None:
    require_triton(op)
    require_cuda(op, a.data)
    if tuple(a.block) != ROWWISE_1X128:
        raise ValueError(f"{op}: a must be 1x128 row-wise, got block {a.block}")


def fp8_grouped_gemm_nt_triton(
    a: Fp8Blockwise,
    b: Union[Fp8BlockwiseStack, Sequence[Fp8Blockwise]],
    m_splits: Sequence[int],
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Twin of numerics.fp8_grouped_gemm_nt, one launch for all experts.

    a:        Fp8Blockwise [M, K], block (1, 128), rows grouped by expert (compact scale_inv [M, ceil(K/128)]).
    b:        E weights [N, K] 128x128 (an Fp8BlockwiseStack, or a list that is stacked here).
    m_splits: E row counts summing to M (zeros allowed), on the host; they reach the kernel as a RowGroups (one small
              pinned non-blocking copy). fp8_varlen_gemm_nt_triton takes the groups on the device instead.
    Returns [M, N] in out_dtype.
    """
    _check_gemm(a, "fp8_grouped_gemm_nt_triton")
    w = _stack(b)
    splits = [int(s) for s in m_splits]
    m_total, k = a.data.shape
    num_experts, n, k_w = w.data.shape
    if len(splits) != num_experts or sum(splits) != m_total or k_w != k or any(s < 0 for s in splits):
        raise ValueError(f"fp8_grouped_gemm_nt_triton: m_splits {splits} / weights {tuple(w.data.shape)} do not fit a {tuple(a.data.shape)}")
    if m_total == 0 or n == 0:
        return torch.empty(m_total, n, dtype=out_dtype, device=a.data.device)
    return _gemm(a, w, RowGroups.from_splits(splits, a.data.device), out_dtype)


def fp8_varlen_gemm_nt_triton(
    a: Fp8Blockwise,
    b: Union[Fp8BlockwiseStack, Sequence[Fp8Blockwise]],
    groups: RowGroups,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Twin of numerics.gemm.fp8_varlen_gemm_nt: the grouped GEMM with the row groups read from device memory, one
    launch over a worst-case grid (groups.max_tiles M tiles); nothing is read on the host, no sync.

    a:      Fp8Blockwise [num_rows, K] (1x128), group e at rows groups.offsets[e] .. offsets[e + 1].
    b:      E weights [N, K] 128x128 (an Fp8BlockwiseStack, or a list that is stacked here).
    groups: numerics.groups.RowGroups on a's device, E groups, num_rows == a's rows (sum of counts <= num_rows,
            not checked on the device).
    Returns [num_rows, N] in out_dtype; rows offsets[E] .. num_rows - 1 (the tail) are written as zeros.
    """
    op = "fp8_varlen_gemm_nt_triton"
    _check_gemm(a, op)
    require_cuda(op, groups.offsets)
    w = _stack(b)
    m_total, k = a.data.shape
    num_experts, _, k_w = w.data.shape
    if groups.num_groups != num_experts or groups.num_rows != m_total or k_w != k:
        raise ValueError(
            f"{op}: {groups.num_groups} row groups over {groups.num_rows} rows / weights {tuple(w.data.shape)} do not "
            f"fit a {tuple(a.data.shape)}"
        )
    return _gemm(a, w, groups, out_dtype)


def _wgrad(
    g_q: Fp8Blockwise, x_q: Fp8Blockwise, groups: RowGroups, out_dtype, out, accumulate, op: str,
    tma: Optional[bool] = None,
):  # fmt: skip
    """tma: None picks the TMA form where _wgrad_tma_ok allows it; True / False force a form (tests compare the two)."""
    from .transpose import scaling_aware_transpose_buffers_grouped

    n, k = g_q.data.shape[1], x_q.data.shape[1]
    num_experts = groups.num_groups
    if out is None:
        if accumulate:
            raise ValueError(f"{op}: accumulate=True needs out= (the buffers to add the gradients into)")
        result = torch.empty(num_experts, n, k, dtype=out_dtype, device=g_q.data.device)
    else:
        check_wgrad_out(out, num_experts, n, k, out_dtype, g_q.data.device, op)
        result = out
    if num_experts == 0 or n == 0 or k == 0:
        return result
    if g_q.data.shape[0] == 0:  # no rows at all: every expert is empty
        if out is None:
            result.zero_()
        elif not accumulate:
            for o in out:
                o.zero_()
        return result
    g_codes, g_scales, _ = scaling_aware_transpose_buffers_grouped(g_q, groups, "compact")
    x_codes, x_scales, _ = scaling_aware_transpose_buffers_grouped(x_q, groups, "compact")
    args = (g_codes.view(g_q.data.dtype), g_scales, x_codes.view(x_q.data.dtype), x_scales)
    rows_aligned = groups.align % 16 == 0
    if tma is None:
        tma = _wgrad_tma_ok(rows_aligned, g_codes, x_codes)
    elif tma and not rows_aligned:
        raise ValueError(f"{op}: the TMA form needs every expert's rows to be a multiple of 16 (RowGroups.align)")
    if tma:
        _ensure_scratch_allocator()

    if out is None:

        def grid(meta):
            return (triton.cdiv(n, meta["BLOCK_N"]), triton.cdiv(k, BLOCK), num_experts)

        _grouped_wgrad_kernel[grid](
            *args, result, result, groups.offsets, groups.tiles, n, k,
            BLOCK_K=BLOCK, BLOCK_M=BLOCK, ROWS_ALIGNED_16=rows_aligned,
            OUT_TABLE=False, OUT_ALIGNED_16=False, ACCUMULATE=False, TMA=tma,
        )  # fmt: skip
        return result
    addresses = [o.data_ptr() for o in out]
    out_ptrs = cached_int64_table(addresses, g_q.data.device)  # main_grad addresses: made once, reused
    config = _wgrad_out_config(g_q.data.shape[0], num_experts, tma)
    grid = (triton.cdiv(n, config["BLOCK_N"]), triton.cdiv(k, BLOCK), num_experts)
    _grouped_wgrad_body[grid](
        *args, out[0], out_ptrs, groups.offsets, groups.tiles, n, k,
        BLOCK_K=BLOCK, BLOCK_M=BLOCK, ROWS_ALIGNED_16=rows_aligned,
        OUT_TABLE=True, OUT_ALIGNED_16=all(a % 16 == 0 for a in addresses), ACCUMULATE=bool(accumulate),
        TMA=tma, **config,
    )  # fmt: skip
    return out


def fp8_grouped_wgrad_triton(
    g_q: Fp8Blockwise,
    x_q: Fp8Blockwise,
    m_splits: Sequence[int],
    out_dtype: torch.dtype = torch.float32,
    out: Optional[Sequence[torch.Tensor]] = None,
    accumulate: bool = False,
):
    """Twin of numerics.fp8_grouped_wgrad: weight gradients from row-wise g_q [M, N] and x_q [M, K] (1x128), via two
    scaling-aware transposes (one launch each, all experts) and one grouped GEMM launch. m_splits: host row counts
    summing to M (they reach the kernels as a RowGroups: one small pinned non-blocking copy);
    fp8_varlen_wgrad_triton takes the groups on the device instead.

    out=None: returns [E, N, K] in out_dtype (an empty expert's gradient is zero).
    out:      E contiguous CUDA [N, K] tensors of out_dtype at any addresses (megatron's per-expert fp32 main_grad);
              expert e's gradient is written into out[e] through a device table of their addresses (made once per
              set of addresses and reused, no stream sync), still one launch. accumulate=True: out[e] =
              out_dtype(fp32(out[e]) + dw[e]), an empty expert's out[e] untouched; accumulate=False: overwritten, an
              empty expert's zeroed. Returns `out`.
    """
    op = "fp8_grouped_wgrad_triton"
    require_triton(op)
    require_cuda(op, g_q.data, x_q.data)
    splits = [int(s) for s in m_splits]
    m_total = g_q.data.shape[0]
    if any(s < 0 for s in splits) or sum(splits) != m_total or x_q.data.shape[0] != m_total:
        raise ValueError(f"m_splits must be non-negative and sum to M={m_total}, got {splits}")
    groups = RowGroups.from_splits(splits, g_q.data.device)
    return _wgrad(g_q, x_q, groups, out_dtype, out, accumulate, op)


def fp8_varlen_wgrad_triton(
    g_q: Fp8Blockwise,
    x_q: Fp8Blockwise,
    groups: RowGroups,
    out_dtype: torch.dtype = torch.float32,
    out: Optional[Sequence[torch.Tensor]] = None,
    accumulate: bool = False,
):
    """Twin of numerics.gemm.fp8_varlen_wgrad: fp8_grouped_wgrad_triton with the row groups read from device memory
    (g_q [num_rows, N], x_q [num_rows, K], group e at rows groups.offsets[e] .. offsets[e + 1]; the tail rows are
    never read). Both transposes and the GEMM launch worst-case grids; nothing is read on the host, no sync.
    groups.align % 16 == 0 selects the aligned-rows fast path (the caller guarantees every count is a multiple of
    16). out / accumulate and the result as fp8_grouped_wgrad_triton's."""
    op = "fp8_varlen_wgrad_triton"
    require_triton(op)
    require_cuda(op, g_q.data, x_q.data, groups.offsets)
    if g_q.data.shape[0] != groups.num_rows or x_q.data.shape[0] != groups.num_rows:
        raise ValueError(
            f"{op}: g_q has {g_q.data.shape[0]} rows and x_q {x_q.data.shape[0]}, the row groups describe {groups.num_rows}"
        )
    return _wgrad(g_q, x_q, groups, out_dtype, out, accumulate, op)
