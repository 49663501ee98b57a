"""Scaling-aware transpose: row-wise 1x128 FP8 -> column-wise (128x1) FP8, from codes and exponents only.

Every scale is a power of two, so an element moves from its row block's scale to its column block's scale by an
integer exponent shift of its E4M3 code. The shift is exact while the result stays in E4M3's normal range; below it
the value rounds to nearest-even into the subnormals (the open upstream PR TE#2544 truncates there; we do not).

The whole computation is integer arithmetic on (sign, significand, exponent) decoded from the codes and the scale
exponents; no dequantized tensor is formed. Contract (tested bit-for-bit):
    scaling_aware_transpose(q, m_splits)[i] == quantize_1x128(dequantize(q_i).t())   for every split q_i of q's rows.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Union

import torch

from .format import BLOCK, E4M3_MAX_CODE, FP8_DTYPE, ROWWISE_1X128, Fp8Blockwise, ceil_div

_NO_VALUE = -(1 << 30)  # ordering key of a zero element: below every nonzero key


def _pow2_exponent(pow2: torch.Tensor) -> torch.Tensor:
    """Integer a with pow2 == 2^a, for fp32 powers of two (subnormal ones included)."""
    _, exp = torch.frexp(pow2.to(torch.float64))
    return exp.to(torch.int32) - 1


def _bit_length_4(n: torch.Tensor) -> torch.Tensor:
    """floor(log2(n)) for integers 1..15 (the significand of an E4M3 value); 0 where n == 0."""
    return (n >= 2).int() + (n >= 4).int() + (n >= 8).int()


def _encode_e4m3(sign: torch.Tensor, n: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """E4M3 codes (int32) of sign * n * 2^k, n an integer in [0, 15], rounded to nearest-even and saturated to 448."""
    b = _bit_length_4(n)
    e = k + b  # unbiased exponent of the value's leading bit
    mant = (n << (3 - b)) & 7
    normal_code = ((e + 7) << 3) | mant
    overflow = (e > 8) | ((e == 8) & (mant == 7))  # past 448: E4M3fn has no infinity, saturate
    normal_code = torch.where(overflow, torch.full_like(normal_code, E4M3_MAX_CODE), normal_code)
    # Subnormal: the value in units of 2^-9 is n * 2^(k+9); round the shifted-out bits to nearest-even.
    # A result of 8 units is encoded as 0x08, which is exactly the smallest normal: rounding up carries correctly.
    shift = (k + 9).clamp(min=-30, max=3)
    left = n << shift.clamp(min=0)
    t = (-shift).clamp(min=0)
    kept = n >> t
    rem = n - (kept << t)
    half = (1 << t) >> 1
    round_up = (t > 0) & ((rem > half) | ((rem == half) & ((kept & 1) == 1)))
    sub_code = torch.where(shift >= 0, left, kept + round_up.int())
    code = torch.where(e >= -6, normal_code, sub_code)
    code = torch.where(n == 0, torch.zeros_like(code), code)
    return code | (sign << 7)


def _transpose_one(codes: torch.Tensor, row_exp: torch.Tensor) -> Fp8Blockwise:
    """codes: int32 [m, K] E4M3 codes; row_exp: int32 [m, K] exponent of each element's row scale_inv."""
    m, k = codes.shape
    sign = (codes >> 7) & 1
    biased = (codes >> 3) & 15
    frac = codes & 7
    is_nan = (codes & 0x7F) == 0x7F
    n = torch.where(biased > 0, frac + 8, frac)
    n = torch.where(is_nan, torch.zeros_like(n), n)
    q = torch.where(biased > 0, biased - 10, torch.full_like(biased, -9)) + row_exp  # value = n * 2^q

    # Column-major blocks: transpose, pad m up to whole 128-blocks with zeros (they never win the amax).
    mb = ceil_div(m, BLOCK)
    pad = mb * BLOCK - m

    def cols(t: torch.Tensor, fill: int) -> torch.Tensor:
        t = t.t()
        if pad:
            t = torch.cat([t, t.new_full((k, pad), fill)], dim=1)
        return t.reshape(k, mb, BLOCK)

    n_b, q_b, sign_b, nan_b = cols(n, 0), cols(q, 0), cols(sign, 0), cols(is_nan.int(), 0).bool()

    # Block amax by an order-preserving integer key over (exponent, normalized 4-bit significand).
    bl = _bit_length_4(n_b)
    top_exp = q_b + bl  # exponent of the leading bit
    sig = n_b << (3 - bl)  # 8..15 for nonzero
    key = torch.where(n_b > 0, top_exp * 16 + sig, torch.full_like(n_b, _NO_VALUE))
    amax_key = key.amax(dim=2) if mb > 0 else key.new_zeros(k, 0)
    amax_exp = torch.div(amax_key, 16, rounding_mode="floor")
    amax_sig = amax_key - amax_exp * 16
    # fl32(448 / amax) floored to a power of two: 448 = 14 * 2^5 and amax = sig * 2^(exp-3), so the quotient is
    # (14 / sig) * 2^(8 - exp), whose floor power of two drops one binade only for sig == 15. No fp32 rounding of the
    # quotient can cross a power of two here because 14/sig is never within 2^-24 of one except when exactly one.
    scale_exp = 8 - amax_exp - (amax_sig == 15).int()
    scale_exp = scale_exp.clamp(max=127)  # an infinite fp32 scale becomes 2^127
    amax_is_zero = amax_key == _NO_VALUE
    amax_is_inf = amax_exp >= 128  # the dequantized fp32 value overflowed
    block_has_nan = nan_b.any(dim=2) if mb > 0 else torch.zeros_like(amax_is_zero)
    scale_exp = torch.where(amax_is_zero | amax_is_inf | block_has_nan, torch.zeros_like(scale_exp), scale_exp)

    # Elements whose dequantized fp32 value is infinite are multiplied by scale 1 and saturate.
    overflowed = top_exp >= 128
    new_k = q_b + scale_exp.unsqueeze(2)
    new_codes = _encode_e4m3(sign_b, n_b, new_k)
    new_codes = torch.where(overflowed & (n_b > 0), E4M3_MAX_CODE | (sign_b << 7), new_codes)
    new_codes = torch.where(nan_b, 0x7F | (sign_b << 7), new_codes)

    data_t = new_codes.reshape(k, mb * BLOCK)[:, :m].to(torch.uint8).contiguous().view(FP8_DTYPE)
    scale_inv_t = torch.pow(2.0, (-scale_exp).to(torch.float64)).to(torch.float32)
    return Fp8Blockwise(data=data_t, scale_inv=scale_inv_t.contiguous(), block=ROWWISE_1X128)


def scaling_aware_transpose(
    q: Fp8Blockwise, m_splits: Optional[Sequence[int]] = None
) -> Union[Fp8Blockwise, List[Fp8Blockwise]]:
    """Column-wise FP8 form of a row-wise 1x128 tensor, as a 1x128 tensor of the transpose.

    q: Fp8Blockwise with block (1, 128), data [M, K].
    m_splits: optional per-expert row counts (ints >= 0, zeros allowed) summing to M.
    Returns Fp8Blockwise(data [K, M], scale_inv [K, ceil(M/128)]) without m_splits; with m_splits, a list of
    Fp8Blockwise(data [K, m_i], scale_inv [K, ceil(m_i/128)]), one per split, each the transpose of its own rows
    (no 128-block crosses a split boundary). Bit-identical to quantize_1x128(dequantize(q_split).t()).
    """
    if tuple(q.block) != ROWWISE_1X128:
        raise ValueError(f"scaling_aware_transpose needs a 1x128 row-wise tensor, got block {q.block}")
    m_total, k = q.data.shape
    codes = q.data.view(torch.uint8).to(torch.int32)
    row_exp = _pow2_exponent(q.scale_inv).repeat_interleave(BLOCK, dim=1)[:, :k]
    if m_splits is None:
        return _transpose_one(codes, row_exp)
    splits = [int(s) for s in m_splits]
    if any(s < 0 for s in splits) or sum(splits) != m_total:
        raise ValueError(f"m_splits must be non-negative and sum to M={m_total}, got {splits}")
    out = []
    start = 0
    for s in splits:
        out.append(_transpose_one(codes[start : start + s], row_exp[start : start + s]))
        start += s
    return out
