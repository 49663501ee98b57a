"""FP8 GEMM reference: what TE's blockwise GEMMs compute, emulated as dequantize -> fp32 matmul.

Both operands are K-major (the GEMM reduces over their last dimension), matching TE's "TN" layout:
    out[M, N] = dequantize(a)[M, K] @ dequantize(b)[N, K]^T
fprop:  a = x (1x128), b = w (128x128)             -> y
dgrad:  a = dy (1x128), b = transpose_128x128(w)   -> dx
wgrad:  a = dy^T (1x128 of the transpose), b = x^T -> dw, both from scaling_aware_transpose
"""

from __future__ import annotations

import functools
from typing import List, Optional, Sequence, Tuple

import torch

from .format import BLOCK, BLOCK_128X128, Fp8Blockwise
from .quantize import dequantize, quantize_128x128


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


def check_weight_stack(weights: Sequence[torch.Tensor], op: str) -> Tuple[int, int, int]:
    """(E, N, K) of the expert weights of one linear, or the error that says what to fix: E >= 1 tensors, each 2-D
    [N, K] with K >= 1, all of one shape, one dtype (torch.bfloat16 or torch.float32) and one device. Shared by
    quantize_weight_stack and its kernel so both refuse the same inputs with the same words."""
    if len(weights) == 0:
        raise ValueError(f"{op}: got no weights; pass the E >= 1 expert weights of one linear, each [N, K]")
    first = weights[0]
    for i, w in enumerate(weights):
        if not isinstance(w, torch.Tensor):
            raise TypeError(f"{op}: weights[{i}] is a {type(w).__name__}, not a torch.Tensor")
        if w.dtype not in (torch.bfloat16, torch.float32):
            raise TypeError(f"{op}: weights[{i}] is {w.dtype}; expert weights must be torch.bfloat16 or torch.float32")
        if w.dim() != 2:
            raise ValueError(f"{op}: weights[{i}] must be 2-D [N, K], got shape {tuple(w.shape)}")
        if w.shape != first.shape:
            raise ValueError(
                f"{op}: weights[{i}] has shape {tuple(w.shape)} but weights[0] has {tuple(first.shape)}; the experts "
                f"of one linear must share [N, K] (quantize fc1 and fc2 as separate stacks)"
            )
        if w.dtype != first.dtype:
            raise TypeError(f"{op}: weights[{i}] is {w.dtype} but weights[0] is {first.dtype}; use one dtype")
        if w.device != first.device:
            raise ValueError(f"{op}: weights[{i}] is on {w.device} but weights[0] on {first.device}; use one device")
    n, k = first.shape
    if k < 1:
        raise ValueError(f"{op}: K must be >= 1, got weights of shape {tuple(first.shape)}")
    return len(weights), n, k


def quantize_weight_stack(
    weights: Sequence[torch.Tensor],
    nonfinite_flag: Optional[torch.Tensor] = None,
    out: Optional[Tuple[Optional[Fp8BlockwiseStack], Optional[Fp8BlockwiseStack]]] = None,
    rowwise: bool = True,
    columnwise: bool = True,
) -> Tuple[Optional[Fp8BlockwiseStack], Optional[Fp8BlockwiseStack]]:
    """128x128 quantization of all E experts of one linear, in the usages the grouped GEMMs read (both by default).

    weights: E >= 1 separate [N, K] tensors of one shape, dtype (fp32 or bf16) and device, each anywhere in memory
             (in training: nn.Parameters inside megatron's DDP parameter buffer, or .detach()ed views of them); any
             strides. Partial edge blocks (N or K not multiples of 128) are allowed.
    nonfinite_flag: None, or a 1-element int32 tensor on the weights' device, set to 1 when any expert's weight holds
             an inf or NaN.
    Returns (stack, stack_t):
        stack:   data [E, N, K] e4m3 row-major, scale_inv [E, ceil(N/128), ceil(K/128)] fp32 -- expert e is exactly
                 quantize_128x128(weights[e]) (fprop's B operand);
        stack_t: data [E, K, N] e4m3, scale_inv [E, ceil(K/128), ceil(N/128)] -- exactly transpose_128x128 of it
                 (dgrad's B operand; a block keeps its scale, so no requantization).
    rowwise / columnwise: which of the two to make (TE's quantizer usages); the other comes back as None. At least
             one. columnwise alone re-makes a dgrad operand in backward from the weights the forward quantized (the
             same codes: a block's scale does not depend on the direction it is read in), so that no transposed
             copy is held from forward to backward (--disable-parameter-transpose-cache).
    out:     None, or a (stack, stack_t) pair of exactly those shapes and dtypes (an earlier result of the same
             usages, None where not made): written in place and returned, so that a consumer holding their addresses
             (a captured CUDA graph) reads the new codes.
    """
    op = "quantize_weight_stack"
    num_experts, n, k = check_weight_stack(weights, op)
    check_weight_stack_usages(rowwise, columnwise, op)
    if out is not None:
        check_weight_stack_out(out, num_experts, n, k, weights[0].device, op, rowwise, columnwise)
    stack = Fp8BlockwiseStack.quantize(weights, functools.partial(quantize_128x128, nonfinite_flag=nonfinite_flag))
    made = (stack if rowwise else None, stack.t() if columnwise else None)
    if out is None:
        return made
    for dst, src in zip(out, made):
        if src is not None:
            dst.data.copy_(src.data)
            dst.scale_inv.copy_(src.scale_inv)
    return out


def check_weight_stack_usages(rowwise: bool, columnwise: bool, op: str) -> None:
    if not (rowwise or columnwise):
        raise ValueError(f"{op}: rowwise=False and columnwise=False make nothing; ask for at least one usage")


def check_weight_stack_out(
    out, num_experts: int, n: int, k: int, device, op: str, rowwise: bool = True, columnwise: bool = True
) -> None:
    """The error that says what is wrong with the `out` pair of a weight-stack quantization (shared with the kernel):
    (stack, stack_t) with data [E, N, K] / [E, K, N] e4m3 and scale_inv [E, ceil(N/128), ceil(K/128)] /
    [E, ceil(K/128), ceil(N/128)] fp32, contiguous, on the weights' device; None for a usage not asked for."""
    if len(out) != 2:
        raise ValueError(f"{op}: out must be a (stack, stack_t) pair, got {len(out)} items")
    for name, item, wanted in (("stack", out[0], rowwise), ("stack_t", out[1], columnwise)):
        if (item is not None) != wanted:
            raise ValueError(
                f"{op}: out's {name} is {'None' if item is None else 'a stack'} but {'rowwise' if name == 'stack' else 'columnwise'}="
                f"{wanted}; pass the pair an earlier call with the same rowwise= / columnwise= returned"
            )
    nb, kb = -(-n // BLOCK), -(-k // BLOCK)
    expected = ()
    if rowwise:
        expected += (
            ("stack.data", out[0].data, (num_experts, n, k), torch.float8_e4m3fn),
            ("stack.scale_inv", out[0].scale_inv, (num_experts, nb, kb), torch.float32),
        )
    if columnwise:
        expected += (
            ("stack_t.data", out[1].data, (num_experts, k, n), torch.float8_e4m3fn),
            ("stack_t.scale_inv", out[1].scale_inv, (num_experts, kb, nb), torch.float32),
        )
    for name, t, shape, dtype in expected:
        if tuple(t.shape) != shape or t.dtype != dtype or t.device != torch.device(device) or not t.is_contiguous():
            raise ValueError(
                f"{op}: out {name} is {tuple(t.shape)} {t.dtype} on {t.device}; expected a contiguous {shape} {dtype} "
                f"on {device} (pass the pair an earlier call returned)"
            )


def check_wgrad_out(
    out: Sequence[torch.Tensor], num_experts: int, n: int, k: int, out_dtype: torch.dtype, device: torch.device, op: str
) -> None:
    """The error that says what is wrong with the `out` buffers of a grouped wgrad: E tensors, each contiguous
    [N, K] of out_dtype on the gradients' device. Shared by fp8_grouped_wgrad and its kernel."""
    if len(out) != num_experts:
        raise ValueError(f"{op}: {len(out)} out tensors for {num_experts} experts (m_splits); pass one per expert")
    for e, o in enumerate(out):
        if tuple(o.shape) != (n, k):
            raise ValueError(f"{op}: out[{e}] has shape {tuple(o.shape)}, expected [N, K] = {(n, k)}")
        if o.dtype != out_dtype:
            raise TypeError(f"{op}: out[{e}] is {o.dtype} but out_dtype is {out_dtype}; pass out_dtype=out[0].dtype")
        if o.device != torch.device(device):
            raise ValueError(f"{op}: out[{e}] is on {o.device}, the gradients on {device}")
        if not o.is_contiguous():
            raise ValueError(f"{op}: out[{e}] must be a contiguous [N, K] (it has strides {o.stride()})")


def fp8_grouped_wgrad(
    g_q: Fp8Blockwise,
    x_q: Fp8Blockwise,
    m_splits: Sequence[int],
    out_dtype: torch.dtype = torch.float32,
    out: Optional[Sequence[torch.Tensor]] = None,
    accumulate: bool = False,
):
    """Weight gradients of all experts: dw[e] = dequantize(T(g_e)) @ dequantize(T(x_e)).T, T the scaling-aware
    transpose of expert e's rows (the column-wise FP8 the wgrad reads; never a requantized BF16 copy).

    g_q: [M, N] 1x128 (output gradients), x_q: [M, K] 1x128 (inputs), both split by rows per m_splits.
    out: None, or E contiguous [N, K] tensors of out_dtype at any addresses (megatron's per-expert fp32 main_grad,
         views into the DDP grad buffer), written in place.
    accumulate: with out only: out[e] = out_dtype(fp32(out[e]) + dw[e]), the sum taken in fp32 (TE's
         gradient_accumulation_fusion); False overwrites out[e] with out_dtype(dw[e]).
    Returns [E, N, K] in out_dtype (out=None; an empty expert's gradient is zero), else `out`, where an empty expert
    (m_e = 0) leaves out[e] untouched when accumulating and zeroes it otherwise.
    """
    from .transpose import scaling_aware_transpose

    n, k = g_q.data.shape[1], x_q.data.shape[1]
    if out is None:
        if accumulate:
            raise ValueError("fp8_grouped_wgrad: accumulate=True needs out= (the buffers to add the gradients into)")
        result = torch.zeros(len(m_splits), n, k, dtype=out_dtype, device=g_q.data.device)
    else:
        check_wgrad_out(out, len(m_splits), n, k, out_dtype, g_q.data.device, "fp8_grouped_wgrad")
        result = out
    g_t = scaling_aware_transpose(g_q, m_splits)
    x_t = scaling_aware_transpose(x_q, m_splits)
    for e, (gt, xt) in enumerate(zip(g_t, x_t)):
        if m_splits[e]:
            dw = fp8_gemm_nt(gt, xt, torch.float32)
            if accumulate:
                dw = result[e].to(torch.float32) + dw
            result[e].copy_(dw)  # rounded once to out_dtype
        elif out is not None and not accumulate:
            result[e].zero_()
    return result


# ---------------------------------------------------------------------------------------------------------------------
# Varlen forms: the groups are described by device tensors (RowGroups) over a worst-case buffer; the twins of the
# sync-free kernels. They read the counts on the host (they are the spec) and compute exactly what the host-split
# functions above compute on the groups' rows.


def _real_rows(q: Fp8Blockwise, end: int) -> Fp8Blockwise:
    return q if q.data.shape[0] == end else Fp8Blockwise(q.data[:end], q.scale_inv[:end], q.block)


def _check_groups(q: Fp8Blockwise, groups, op: str) -> List[int]:
    if q.data.shape[0] != groups.num_rows:
        raise ValueError(f"{op}: the operand has {q.data.shape[0]} rows, the row groups describe {groups.num_rows}")
    return groups.host_splits(op)


def fp8_varlen_gemm_nt(
    a: Fp8Blockwise, b: Sequence[Fp8Blockwise], groups, out_dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """fp8_grouped_gemm_nt over row groups given on the device.

    a:      Fp8Blockwise [num_rows, K] (1x128), group e at rows groups.offsets[e] .. offsets[e + 1].
    b:      E weights [N, K] 128x128 (a list or an Fp8BlockwiseStack).
    groups: numerics.groups.RowGroups with len(b) groups and groups.num_rows == a's rows.
    Returns [num_rows, N] in out_dtype: the groups' rows exactly as fp8_grouped_gemm_nt(a[:end], b, counts) (end =
    offsets[E]), the tail rows end .. num_rows - 1 zero.
    """
    splits = _check_groups(a, groups, "fp8_varlen_gemm_nt")
    end = sum(splits)
    y = fp8_grouped_gemm_nt(_real_rows(a, end), b, splits, out_dtype)
    tail = groups.num_rows - end
    return torch.cat([y, y.new_zeros(tail, y.shape[1])]) if tail else y


def fp8_varlen_wgrad(
    g_q: Fp8Blockwise,
    x_q: Fp8Blockwise,
    groups,
    out_dtype: torch.dtype = torch.float32,
    out: Optional[Sequence[torch.Tensor]] = None,
    accumulate: bool = False,
):
    """fp8_grouped_wgrad over row groups given on the device: g_q [num_rows, N] and x_q [num_rows, K] (1x128), group
    e at rows groups.offsets[e] .. offsets[e + 1]; the tail rows are never read. out / accumulate and the result as
    fp8_grouped_wgrad's."""
    splits = _check_groups(g_q, groups, "fp8_varlen_wgrad")
    _check_groups(x_q, groups, "fp8_varlen_wgrad")
    end = sum(splits)
    return fp8_grouped_wgrad(_real_rows(g_q, end), _real_rows(x_q, end), splits, out_dtype, out=out, accumulate=accumulate)
