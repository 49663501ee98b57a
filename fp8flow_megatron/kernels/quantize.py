"""1x128 row-wise E4M3 quantization on the GPU (Triton); twin of ``fp8flow_megatron.numerics.quantize.quantize_1x128``.

Bit-identical to the twin and to TE's ``Float8BlockQuantizer(E4M3, rowwise=True, columnwise=False,
force_pow_2_scales=True, amax_epsilon=0.0, block_scaling_dim=1)`` (codes and scales; TE stores the scales transposed
and padded, [ceil(K/128), pad4(M)]). ``quantize_1x128_rows`` is the block rule every fused kernel here reuses, so there
is one implementation of the scale convention on the GPU side (numerics/format.py is its spec):
    amax in fp32; scale = fl32(448 / amax) correctly rounded (tl.math.div_rn: Triton's ``/`` is approximate) with its
    mantissa cleared; amax 0, inf or NaN -> 1; an infinite quotient -> 2^127; codes = RNE(x * scale) saturated to
    ±448 (the clamp keeps NaN and the sign of zero); scale_inv = 1 / scale (exact).
A NaN input encodes as 0x7F whatever its sign (hardware conversion); the twin keeps the sign (0xFF for -NaN).

Non-finite guard: the rule already tells whether a block holds an inf or NaN (amax > FLT_MAX, or a NaN), so a kernel
given a `nonfinite_flag` (HAS_FLAG) raises it with one atomic per program that saw one -- no extra pass, no sync.
Without a flag the kernel is compiled without that code (HAS_FLAG is a constexpr).
"""

from __future__ import annotations

from typing import Optional

import torch

from ..numerics.format import BLOCK, E4M3_MAX, FP8_DTYPE, ROWWISE_1X128, Fp8Blockwise, ceil_div, check_nonfinite_flag
from ._triton import jit, require_cuda, require_triton, tl, triton

_FLT_MAX = tl.constexpr(3.4028234663852886e38)  # fp32's largest finite value
# 32 rows x 128 columns per program, 4 warps: 32 elements per thread, 16-byte bf16 loads. Sweep on H100 at
# [32768, 2048] bf16: 75.5 µs (90% of copy bandwidth); 16-128 rows and 4-8 warps all within 2%.
_BLOCK_M = 32
_NUM_WARPS = 4


@jit
def quantize_1x128_rows(x, FP8_MAX: tl.constexpr):
    """x: fp32 [BLOCK_M, 128] tile, one 1x128 block per row (masked-off entries must be 0: they cannot raise the
    amax, nor the flag). Returns (codes float8e4nv [BLOCK_M, 128], scale_inv fp32 [BLOCK_M], nonfinite int1
    [BLOCK_M]: the row held an inf or NaN; callers without a flag drop it and the compiler removes it)."""
    amax = tl.max(tl.abs(x), axis=1)
    has_nan = tl.max((x != x).to(tl.int32), axis=1) > 0  # tl.max need not propagate NaN; the rule says scale 1
    nonfinite = (amax > _FLT_MAX) | has_nan
    scale = tl.math.div_rn(tl.full(amax.shape, FP8_MAX, tl.float32), amax)
    scale = tl.where(scale > _FLT_MAX, _FLT_MAX, scale)  # inf -> FLT_MAX -> 2^127 once the mantissa is cleared
    scale = (scale.to(tl.int32, bitcast=True) & 0x7F800000).to(tl.float32, bitcast=True)
    scale = tl.where((amax == 0.0) | nonfinite, 1.0, scale)
    y = x * scale[:, None]
    y = tl.where(y != y, y, tl.minimum(tl.maximum(y, -FP8_MAX), FP8_MAX))
    scale_inv = tl.math.div_rn(tl.full(scale.shape, 1.0, tl.float32), scale)
    return y.to(tl.float8e4nv), scale_inv, nonfinite


@jit
def raise_nonfinite_flag(flag_ptr, nonfinite):
    """*flag_ptr (int32) = 1 when any entry of the 1-D int1 `nonfinite` is set. The atomic is issued only by programs
    that saw an inf or NaN (finite data costs one register reduction), and the flag is only ever raised, so any number
    of concurrent or repeated writes agree."""
    if tl.max(nonfinite.to(tl.int32), axis=0) > 0:
        tl.atomic_max(flag_ptr, 1)


@jit
def _quantize_1x128_kernel(
    # inputs
    x_ptr,
    # outputs
    codes_ptr,
    scale_inv_ptr,
    flag_ptr,  # int32 [1], raised on an inf or NaN input (read only when HAS_FLAG)
    # sizes
    M,
    K,
    NUM_K_BLOCKS,
    # strides
    stride_xm,
    # constexpr
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    FP8_MAX: tl.constexpr,
    HAS_FLAG: tl.constexpr,
):
    # k-blocks fastest: programs running together read whole rows (DRAM locality; rows-fastest read one 256-byte
    # stripe per row and lost ~10% at [32768, 2048]).
    kb = tl.program_id(0) % NUM_K_BLOCKS
    rows = (tl.program_id(0) // NUM_K_BLOCKS) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = kb * BLOCK_K + tl.arange(0, BLOCK_K)
    row_ok = rows < M
    mask = row_ok[:, None] & (cols < K)[None, :]
    rows64 = rows.to(tl.int64)
    x = tl.load(x_ptr + rows64[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    codes, scale_inv, nonfinite = quantize_1x128_rows(x, FP8_MAX)
    tl.store(codes_ptr + rows64[:, None] * K + cols[None, :], codes, mask=mask)
    tl.store(scale_inv_ptr + rows64 * NUM_K_BLOCKS + kb, scale_inv, mask=row_ok)
    if HAS_FLAG:
        raise_nonfinite_flag(flag_ptr, nonfinite)


def quantize_1x128_triton(x: torch.Tensor, nonfinite_flag: Optional[torch.Tensor] = None) -> Fp8Blockwise:
    """Row-wise 1x128 blockwise quantization (activations and gradients) on the GPU.

    x: CUDA [M, K] fp32 or bf16 with unit column stride, M >= 0, K >= 1; the last block of a row may be partial.
    nonfinite_flag: None, or a CUDA int32 [1] tensor on x's device, set to 1 (asynchronously, never cleared) when x
        holds an inf or NaN.
    Returns Fp8Blockwise(data [M, K] e4m3, scale_inv [M, ceil(K/128)] fp32 (compact, row-major), block (1, 128)).
    """
    if x.dtype not in (torch.float32, torch.bfloat16):
        raise TypeError(f"quantize_1x128_triton: x must be torch.float32 or torch.bfloat16, got {x.dtype}")
    if x.dim() != 2:
        raise ValueError(f"quantize_1x128_triton: x must be 2-D [M, K], got shape {tuple(x.shape)}")
    if x.shape[1] < 1:
        raise ValueError(f"quantize_1x128_triton: K must be >= 1, got shape {tuple(x.shape)}")
    require_cuda("quantize_1x128_triton", x)
    check_nonfinite_flag(nonfinite_flag, x.device, "quantize_1x128_triton")
    m, k = x.shape
    if x.stride(1) != 1:
        x = x.contiguous()
    nbk = ceil_div(k, BLOCK)
    data = torch.empty(m, k, dtype=FP8_DTYPE, device=x.device)
    scale_inv = torch.empty(m, nbk, dtype=torch.float32, device=x.device)
    if m > 0:
        require_triton("quantize_1x128_triton")
        grid = (triton.cdiv(m, _BLOCK_M) * nbk,)
        _quantize_1x128_kernel[grid](
            x, data, scale_inv, flag_arg(nonfinite_flag, scale_inv), m, k, nbk, x.stride(0),
            BLOCK_M=_BLOCK_M, BLOCK_K=BLOCK, FP8_MAX=E4M3_MAX, HAS_FLAG=nonfinite_flag is not None,
            num_warps=_NUM_WARPS,
        )  # fmt: skip
    return Fp8Blockwise(data=data, scale_inv=scale_inv, block=ROWWISE_1X128)


def flag_arg(nonfinite_flag: Optional[torch.Tensor], placeholder: torch.Tensor) -> torch.Tensor:
    """The tensor to pass as a kernel's flag_ptr: the flag, or (HAS_FLAG=False, never read) any tensor of the launch,
    so that the launch signature does not depend on whether a flag is given."""
    return placeholder if nonfinite_flag is None else nonfinite_flag
