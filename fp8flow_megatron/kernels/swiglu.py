"""Weighted SwiGLU fused with 1x128 E4M3 quantization, forward and backward, on the GPU (Triton); twins of
``fp8flow_megatron.numerics.swiglu``.

Forward:  fc1_out [N, 2F] (gate | linear) and probs [N] -> FP8 [N, F] for fc2, one pass (no BF16 intermediate).
Backward: grad_out [N, F], fc1_out [N, 2F] (recomputed activation: nothing else is saved), probs [N] ->
          FP8 [N, 2F] (da | db, the fc1 dgrad/wgrad input) and grad_probs [N] fp32, one pass.
The fp32 formulas and their order are the twin's. The sigmoid is torch's, 1 / (1 + expf(-a)) with libdevice's expf
and a correctly rounded division, and the kernels are compiled without FMA contraction, so each product rounds as
in torch; CUDA's expf is not specified to be reproducible across implementations, so the tests allow one E4M3 step
and report the fraction of codes that differ. grad_probs sums over F in another order than torch's sum (1e-6 rel.).
Given a `nonfinite_flag`, each kernel raises it when the quantizer's fp32 input (h, or [da | db]) holds an inf or NaN,
as a side effect of the block rule (kernels/quantize.py); grad_probs is not checked (it is not quantized).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..numerics.format import BLOCK, E4M3_MAX, FP8_DTYPE, ROWWISE_1X128, Fp8Blockwise, ceil_div, check_nonfinite_flag
from ._triton import jit, libdevice, require_cuda, require_triton, tl, triton
from .quantize import flag_arg, quantize_1x128_rows, raise_nonfinite_flag

# Rows x 128 columns per program. Sweep on H100 at DeepSeek-V2-Lite 32k tokens (197k rows, F=1408): forward
# (BLOCK_M, warps) = (32, 4) 541 µs vs (16, 4) 547, (64, 8) 593; backward (16, 4) 902 µs vs (16, 8) 934, (8, 8) 1020.
_FWD_BLOCK_M, _FWD_WARPS = 32, 4
_BWD_BLOCK_M, _BWD_WARPS = 16, 4
# Both kernels: products round separately (as torch's separate ops do) and libdevice keeps subnormals.
_EXACT_FP32 = dict(enable_fp_fusion=False, enable_reflect_ftz=False)


@jit
def _sigmoid(a):
    return tl.math.div_rn(tl.full(a.shape, 1.0, tl.float32), 1.0 + libdevice.exp(-a))


@jit
def _weighted_swiglu_quant_kernel(
    # inputs
    x_ptr,
    probs_ptr,
    # outputs
    codes_ptr,
    scale_inv_ptr,
    flag_ptr,  # int32 [1], raised on an inf or NaN in h (read only when HAS_FLAG)
    # sizes
    N,
    F,
    NUM_F_BLOCKS,
    # strides
    stride_x,
    # constexpr
    BLOCK_M: tl.constexpr,
    BLOCK_F: tl.constexpr,
    FP8_MAX: tl.constexpr,
    HAS_FLAG: tl.constexpr,
):
    fb = tl.program_id(0) % NUM_F_BLOCKS  # column blocks fastest: programs running together read whole rows
    rows = (tl.program_id(0) // NUM_F_BLOCKS) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = fb * BLOCK_F + tl.arange(0, BLOCK_F)
    row_ok = rows < N
    mask = row_ok[:, None] & (cols < F)[None, :]
    rows64 = rows.to(tl.int64)
    x_row = x_ptr + rows64[:, None] * stride_x + cols[None, :]
    a = tl.load(x_row, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(x_row + F, mask=mask, other=0.0).to(tl.float32)
    p = tl.load(probs_ptr + rows64, mask=row_ok, other=0.0).to(tl.float32)
    h = a * _sigmoid(a) * b * p[:, None]
    h = tl.where(mask, h, 0.0)
    codes, scale_inv, nonfinite = quantize_1x128_rows(h, FP8_MAX)
    tl.store(codes_ptr + rows64[:, None] * F + cols[None, :], codes, mask=mask)
    tl.store(scale_inv_ptr + rows64 * NUM_F_BLOCKS + fb, scale_inv, mask=row_ok)
    if HAS_FLAG:
        raise_nonfinite_flag(flag_ptr, nonfinite)


@jit
def _weighted_swiglu_quant_bwd_kernel(
    # inputs
    g_ptr,
    x_ptr,
    probs_ptr,
    # outputs
    codes_ptr,
    scale_inv_ptr,
    dprobs_ptr,
    flag_ptr,  # int32 [1], raised on an inf or NaN in [da | db] (read only when HAS_FLAG)
    # sizes
    N,
    F,
    NUM_OUT_BLOCKS,
    # strides
    stride_g,
    stride_x,
    # constexpr
    BLOCK_M: tl.constexpr,
    BLOCK_F: tl.constexpr,
    FP8_MAX: tl.constexpr,
    F_ALIGNED: tl.constexpr,
    HAS_FLAG: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    rows64 = rows.to(tl.int64)
    p = tl.load(probs_ptr + rows64, mask=row_ok, other=0.0).to(tl.float32)[:, None]
    lanes = tl.arange(0, BLOCK_F)
    dp = tl.zeros((BLOCK_M, BLOCK_F), dtype=tl.float32)
    # rows that met an inf or NaN in any of their blocks; one flag write after the loop (dead code without HAS_FLAG)
    bad = tl.zeros((BLOCK_M,), dtype=tl.int32)
    out_row = codes_ptr + rows64[:, None] * (2 * F)
    if F_ALIGNED:
        # Output blocks never straddle da | db: block fb of da and block F/128 + fb of db come from one load.
        for fb in range(0, F // BLOCK_F):
            cols = fb * BLOCK_F + lanes
            mask = row_ok[:, None] & (cols < F)[None, :]
            a = tl.load(x_ptr + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            b = tl.load(x_ptr + rows64[:, None] * stride_x + F + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            g = tl.load(g_ptr + rows64[:, None] * stride_g + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            s = _sigmoid(a)
            silu = a * s
            gp = g * p
            da = tl.where(mask, gp * b * (s + silu * (1.0 - s)), 0.0)
            db = tl.where(mask, gp * silu, 0.0)
            dp += tl.where(mask, g * silu * b, 0.0)
            codes, scale_inv, nonfinite_a = quantize_1x128_rows(da, FP8_MAX)
            tl.store(out_row + cols[None, :], codes, mask=mask)
            tl.store(scale_inv_ptr + rows64 * NUM_OUT_BLOCKS + fb, scale_inv, mask=row_ok)
            codes, scale_inv, nonfinite_b = quantize_1x128_rows(db, FP8_MAX)
            tl.store(out_row + F + cols[None, :], codes, mask=mask)
            tl.store(scale_inv_ptr + rows64 * NUM_OUT_BLOCKS + F // BLOCK_F + fb, scale_inv, mask=row_ok)
            if HAS_FLAG:
                bad = tl.maximum(bad, (nonfinite_a | nonfinite_b).to(tl.int32))
    else:
        # A block may hold the end of da and the start of db: gather each output column's source column.
        for ob in range(0, NUM_OUT_BLOCKS):
            c = ob * BLOCK_F + lanes
            is_a = c < F
            f = tl.where(is_a, c, c - F)
            mask = row_ok[:, None] & (c < 2 * F)[None, :]
            a = tl.load(x_ptr + rows64[:, None] * stride_x + f[None, :], mask=mask, other=0.0).to(tl.float32)
            b = tl.load(x_ptr + rows64[:, None] * stride_x + F + f[None, :], mask=mask, other=0.0).to(tl.float32)
            g = tl.load(g_ptr + rows64[:, None] * stride_g + f[None, :], mask=mask, other=0.0).to(tl.float32)
            s = _sigmoid(a)
            silu = a * s
            gp = g * p
            da = gp * b * (s + silu * (1.0 - s))
            db = gp * silu
            d = tl.where(mask, tl.where(is_a[None, :], da, db), 0.0)
            dp += tl.where(mask & is_a[None, :], g * silu * b, 0.0)
            codes, scale_inv, nonfinite = quantize_1x128_rows(d, FP8_MAX)
            tl.store(out_row + c[None, :], codes, mask=mask)
            tl.store(scale_inv_ptr + rows64 * NUM_OUT_BLOCKS + ob, scale_inv, mask=row_ok)
            if HAS_FLAG:
                bad = tl.maximum(bad, nonfinite.to(tl.int32))
    tl.store(dprobs_ptr + rows64, tl.sum(dp, axis=1), mask=row_ok)
    if HAS_FLAG:
        raise_nonfinite_flag(flag_ptr, bad > 0)


def _check(fc1_out: torch.Tensor, probs: torch.Tensor, op: str) -> int:
    if fc1_out.dim() != 2 or fc1_out.shape[1] % 2:
        raise ValueError(f"{op}: fc1_out must be [N, 2F], got shape {tuple(fc1_out.shape)}")
    if probs.numel() != fc1_out.shape[0]:
        raise ValueError(f"{op}: probs must have N={fc1_out.shape[0]} entries, got shape {tuple(probs.shape)}")
    return fc1_out.shape[1] // 2


def weighted_swiglu_quant_triton(
    fc1_out: torch.Tensor, probs: torch.Tensor, nonfinite_flag: Optional[torch.Tensor] = None
) -> Fp8Blockwise:
    """fc1_out CUDA [N, 2F] bf16/fp32 (gate | linear), probs [N] -> FP8 (1x128) [N, F], the fc2 input:
    quantize_1x128(silu(a) * b * p) with compact scale_inv [N, ceil(F/128)].
    nonfinite_flag: None, or a CUDA int32 [1] tensor set to 1 (asynchronously) when silu(a) * b * p holds an inf or
    NaN."""
    f = _check(fc1_out, probs, "weighted_swiglu_quant_triton")
    require_cuda("weighted_swiglu_quant_triton", fc1_out, probs)
    check_nonfinite_flag(nonfinite_flag, fc1_out.device, "weighted_swiglu_quant_triton")
    n = fc1_out.shape[0]
    if fc1_out.stride(1) != 1:
        fc1_out = fc1_out.contiguous()
    probs = probs.reshape(-1).contiguous()
    nbf = ceil_div(f, BLOCK)
    data = torch.empty(n, f, dtype=FP8_DTYPE, device=fc1_out.device)
    scale_inv = torch.empty(n, nbf, dtype=torch.float32, device=fc1_out.device)
    if n > 0 and f > 0:
        require_triton("weighted_swiglu_quant_triton")
        grid = (triton.cdiv(n, _FWD_BLOCK_M) * nbf,)
        _weighted_swiglu_quant_kernel[grid](
            fc1_out, probs, data, scale_inv, flag_arg(nonfinite_flag, scale_inv), n, f, nbf, fc1_out.stride(0),
            BLOCK_M=_FWD_BLOCK_M, BLOCK_F=BLOCK, FP8_MAX=E4M3_MAX, HAS_FLAG=nonfinite_flag is not None,
            num_warps=_FWD_WARPS, **_EXACT_FP32,
        )  # fmt: skip
    return Fp8Blockwise(data=data, scale_inv=scale_inv, block=ROWWISE_1X128)


def weighted_swiglu_quant_backward_triton(
    grad_out: torch.Tensor, fc1_out: torch.Tensor, probs: torch.Tensor, nonfinite_flag: Optional[torch.Tensor] = None
) -> Tuple[Fp8Blockwise, torch.Tensor]:
    """grad_out CUDA [N, F] (fc2 dgrad, bf16/fp32), fc1_out [N, 2F], probs [N] ->
    (grad_fc1_out FP8 1x128 [N, 2F] = quantize_1x128([da | db]) with compact scale_inv [N, ceil(2F/128)],
     grad_probs [N] fp32).
    nonfinite_flag: None, or a CUDA int32 [1] tensor set to 1 (asynchronously) when [da | db] holds an inf or NaN."""
    f = _check(fc1_out, probs, "weighted_swiglu_quant_backward_triton")
    n = fc1_out.shape[0]
    if tuple(grad_out.shape) != (n, f):
        raise ValueError(
            f"weighted_swiglu_quant_backward_triton: grad_out must be [N, F] = [{n}, {f}], got {tuple(grad_out.shape)}"
        )
    require_cuda("weighted_swiglu_quant_backward_triton", grad_out, fc1_out, probs)
    check_nonfinite_flag(nonfinite_flag, fc1_out.device, "weighted_swiglu_quant_backward_triton")
    if fc1_out.stride(1) != 1:
        fc1_out = fc1_out.contiguous()
    if grad_out.stride(1) != 1:
        grad_out = grad_out.contiguous()
    probs = probs.reshape(-1).contiguous()
    nbo = ceil_div(2 * f, BLOCK)
    data = torch.empty(n, 2 * f, dtype=FP8_DTYPE, device=fc1_out.device)
    scale_inv = torch.empty(n, nbo, dtype=torch.float32, device=fc1_out.device)
    dprobs = torch.empty(n, dtype=torch.float32, device=fc1_out.device)
    if n > 0 and f > 0:
        require_triton("weighted_swiglu_quant_backward_triton")
        grid = (triton.cdiv(n, _BWD_BLOCK_M),)
        _weighted_swiglu_quant_bwd_kernel[grid](
            grad_out, fc1_out, probs, data, scale_inv, dprobs, flag_arg(nonfinite_flag, dprobs), n, f, nbo,
            grad_out.stride(0), fc1_out.stride(0),
            BLOCK_M=_BWD_BLOCK_M, BLOCK_F=BLOCK, FP8_MAX=E4M3_MAX, F_ALIGNED=f % BLOCK == 0,
            HAS_FLAG=nonfinite_flag is not None, num_warps=_BWD_WARPS, **_EXACT_FP32,
        )  # fmt: skip
    elif n > 0:
        dprobs.zero_()
    return Fp8Blockwise(data=data, scale_inv=scale_inv, block=ROWWISE_1X128), dprobs
