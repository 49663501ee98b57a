"""128x128 E4M3 quantization of all experts of one linear in one launch (Triton); twin of
``fp8flow_megatron.numerics.gemm.quantize_weight_stack``.

Why: weights are requantized every optimizer step, and the per-expert loop over the pure-torch spec costs ~30 ms per
linear at 64 experts x [2816, 2048] bf16 on an H200. Here one program quantizes one 128x128 block of one expert and
writes it twice: the [N, K] codes (fprop's operand) and the transposed [K, N] codes (dgrad's operand; a block keeps
its scale, so the transpose is exact), plus both scale grids -- the weights are read once. Either usage alone is
written when only it is asked for (rowwise= / columnwise=).

The experts' weights are separate tensors at arbitrary addresses (megatron keeps every expert's weight as its own
parameter inside the DDP parameter buffer), so the kernel reads a device table of their data pointers instead of one
stacked tensor: no [E, N, K] bf16 copy is made.

Scale rule: ``quantize_1x128_rows`` (kernels/quantize.py), the one GPU implementation of numerics/format.py's rule,
applied to the block flattened to one row of 128*128 values (its amax is the block amax). Codes and scales are
bit-identical to the twin, except that a NaN input encodes as 0x7F whatever its sign (hardware conversion) where the
twin keeps the sign. Given a `nonfinite_flag`, a program whose block holds an inf or NaN raises it (the block rule
knows already; no extra pass).
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch

from ..numerics.format import BLOCK, E4M3_MAX, FP8_DTYPE, ceil_div, check_nonfinite_flag
from ._tables import cached_int64_table
from ..numerics.gemm import Fp8BlockwiseStack, check_weight_stack, check_weight_stack_out, check_weight_stack_usages
from ._triton import jit, require_cuda, require_triton, tl
from .quantize import flag_arg, quantize_1x128_rows, raise_nonfinite_flag

# One 128x128 block per program, 8 warps: 64 values per thread (the tile is held in registers as fp32). Not swept yet.
_NUM_WARPS = 8


@jit
def _quantize_weight_stack_kernel(
    # inputs
    w_ptrs,  # int64 [E]: data_ptr of each expert's contiguous [N, K] weight
    w_like,  # weights[0]: only its pointer type is used, to type the addresses read from w_ptrs
    # outputs
    codes_ptr,  # e4m3 [E, N, K]
    codes_t_ptr,  # uint8 view of e4m3 [E, K, N]
    scale_inv_ptr,  # fp32 [E, NUM_N_BLOCKS, NUM_K_BLOCKS]
    scale_inv_t_ptr,  # fp32 [E, NUM_K_BLOCKS, NUM_N_BLOCKS]
    flag_ptr,  # int32 [1], raised on an inf or NaN weight (read only when HAS_FLAG)
    # sizes
    N,
    K,
    NUM_N_BLOCKS,
    NUM_K_BLOCKS,
    # constexpr
    BLOCK_SIZE: tl.constexpr,
    FP8_MAX: tl.constexpr,
    PTRS_ALIGNED_16: tl.constexpr,
    HAS_FLAG: tl.constexpr,
    ROWWISE: tl.constexpr,  # write the [N, K] codes and scales
    COLUMNWISE: tl.constexpr,  # write the transposed [K, N] codes and scales
):
    # grid (blocks of one expert, k-blocks fastest; experts): programs running together read the same 128 rows
    kb = tl.program_id(0) % NUM_K_BLOCKS
    nb = tl.program_id(0) // NUM_K_BLOCKS
    expert = tl.program_id(1).to(tl.int64)
    w = tl.load(w_ptrs + expert).to(w_like.dtype)
    if PTRS_ALIGNED_16:
        # An address read from memory has no known alignment, so without the hint every load is split into single
        # elements (the wgrad kernel measured 4x slower loads for a row length read from memory); the launcher
        # checked every address on the host.
        w = tl.multiple_of(w, 16)
    rows = nb * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    cols = kb * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = (rows < N)[:, None] & (cols < K)[None, :]
    rows64, cols64 = rows.to(tl.int64), cols.to(tl.int64)
    # masked-off entries of a partial edge block load as 0: they cannot raise the amax, and are never stored
    x = tl.load(w + rows64[:, None] * K + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    codes, scale_inv, nonfinite = quantize_1x128_rows(tl.reshape(x, (1, BLOCK_SIZE * BLOCK_SIZE)), FP8_MAX)
    if HAS_FLAG:
        raise_nonfinite_flag(flag_ptr, nonfinite)
    codes = tl.reshape(codes, (BLOCK_SIZE, BLOCK_SIZE))
    # The scale_inv of a block whose amax is below ~2.6e-36 (e.g. all fp32 subnormals) is the subnormal 2^-127. Where
    # div_rn is lowered to libdevice, which Triton links flush-to-zero, div_rn(1, 2^127) returns +0 instead; no
    # other scale_inv can be 0. 0x00400000 is 2^-127's bit pattern (a float literal that small would be typed fp64).
    scale_inv = tl.where(scale_inv == 0.0, tl.full(scale_inv.shape, 0x00400000, tl.int32).to(tl.float32, bitcast=True),
                         scale_inv)  # fmt: skip
    expert_elems = expert * N * K
    one = tl.arange(0, 1)  # scale_inv is a [1] tensor (one block)
    if ROWWISE:
        tl.store(codes_ptr + expert_elems + rows64[:, None] * K + cols[None, :], codes, mask=mask)
        tl.store(scale_inv_ptr + (expert * NUM_N_BLOCKS + nb) * NUM_K_BLOCKS + kb + one, scale_inv)
    if COLUMNWISE:
        # The transposed block moved as bytes (the transpose goes through shared memory; no fp8 conversion involved).
        codes_t = tl.trans(codes.to(tl.uint8, bitcast=True))
        mask_t = (cols < K)[:, None] & (rows < N)[None, :]
        tl.store(codes_t_ptr + expert_elems + cols64[:, None] * N + rows[None, :], codes_t, mask=mask_t)
        tl.store(scale_inv_t_ptr + (expert * NUM_K_BLOCKS + kb) * NUM_N_BLOCKS + nb + one, scale_inv)


def quantize_weight_stack_triton(
    weights: Sequence[torch.Tensor],
    nonfinite_flag: Optional[torch.Tensor] = None,
    out: Optional[Tuple[Optional[Fp8BlockwiseStack], Optional[Fp8BlockwiseStack]]] = None,
    rowwise: bool = True,
    columnwise: bool = True,
) -> Tuple[Optional[Fp8BlockwiseStack], Optional[Fp8BlockwiseStack]]:
    """128x128 quantization of all E experts of one linear in one launch; twin of numerics.gemm.quantize_weight_stack.

    weights: E >= 1 separate CUDA [N, K] tensors of one shape, dtype (fp32 or bf16) and device, each CONTIGUOUS
             (row-major, row stride K) but anywhere in memory: megatron's expert parameters (views into the DDP
             parameter buffer) or .detach()ed views of them. A non-contiguous weight is refused rather than copied
             (a hidden copy of every expert would double the traffic); call .contiguous() on it first. Partial edge
             blocks (N or K not multiples of 128) are allowed.
    nonfinite_flag: None, or a CUDA int32 [1] tensor on the weights' device, set to 1 (asynchronously) when any
             expert's weight holds an inf or NaN.
    Returns (stack, stack_t):
        stack:   data [E, N, K] e4m3 row-major, scale_inv [E, ceil(N/128), ceil(K/128)] fp32 (fprop's B operand);
        stack_t: data [E, K, N] e4m3, scale_inv [E, ceil(K/128), ceil(N/128)] (dgrad's B operand), the exact
                 128x128 block transpose of stack.
    rowwise / columnwise: which of the two to make and return (None for the other; at least one): the weights are
             read once either way, only the stores differ.
    out:     None, or a (stack, stack_t) pair of exactly those shapes and dtypes (an earlier result of the same usages,
             None where not made): the kernel writes into it (no allocation) and returns it, so that a captured CUDA
             graph reading those buffers sees the new codes.
    Host work: one pass over the weights (checks, addresses); the device table of the E addresses is copied once per
    set of addresses (pinned, non-blocking) and reused after that. The stream is never synchronized.
    """
    op = "quantize_weight_stack_triton"
    num_experts, n, k = check_weight_stack(weights, op)
    require_cuda(op, *weights)
    check_nonfinite_flag(nonfinite_flag, weights[0].device, op)
    check_weight_stack_usages(rowwise, columnwise, op)
    for i, w in enumerate(weights):
        if not w.is_contiguous():
            raise ValueError(
                f"{op}: weights[{i}] is not contiguous (shape {tuple(w.shape)}, strides {w.stride()}); the kernel "
                f"reads each weight as a dense row-major [N, K] block, so pass weights[{i}].contiguous()"
            )
    if num_experts > 65535:
        raise ValueError(f"{op}: {num_experts} experts exceed the launch grid's 65535 on its expert axis")
    device = weights[0].device
    nbn, nbk = ceil_div(n, BLOCK), ceil_div(k, BLOCK)
    if out is None:
        made = (
            Fp8BlockwiseStack(torch.empty(num_experts, n, k, dtype=FP8_DTYPE, device=device),
                              torch.empty(num_experts, nbn, nbk, dtype=torch.float32, device=device))
            if rowwise else None,
            Fp8BlockwiseStack(torch.empty(num_experts, k, n, dtype=FP8_DTYPE, device=device),
                              torch.empty(num_experts, nbk, nbn, dtype=torch.float32, device=device))
            if columnwise else None,
        )  # fmt: skip
    else:
        check_weight_stack_out(out, num_experts, n, k, device, op, rowwise, columnwise)
        made = tuple(out)
    # a usage not made passes the other's buffers, which the kernel then never stores to (ROWWISE / COLUMNWISE)
    rows_out = made[0] if rowwise else made[1]
    cols_out = made[1] if columnwise else made[0]
    if n > 0:
        require_triton(op)
        addresses = [w.data_ptr() for w in weights]
        table = cached_int64_table(addresses, device)  # made once per set of weight addresses, then reused
        _quantize_weight_stack_kernel[(nbn * nbk, num_experts)](
            table, weights[0], rows_out.data, cols_out.data.view(torch.uint8), rows_out.scale_inv, cols_out.scale_inv,
            flag_arg(nonfinite_flag, rows_out.scale_inv), n, k, nbn, nbk,
            BLOCK_SIZE=BLOCK, FP8_MAX=E4M3_MAX, PTRS_ALIGNED_16=all(a % 16 == 0 for a in addresses),
            HAS_FLAG=nonfinite_flag is not None, ROWWISE=rowwise, COLUMNWISE=columnwise, num_warps=_NUM_WARPS,
        )  # fmt: skip
    return out if out is not None else made

