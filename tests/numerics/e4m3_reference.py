"""An independent E4M3 reference for the tests: a table of all 256 codes decoded from their bit fields, and an
explicit nearest-even selection over it, in numpy. It shares no code with fp8flow_megatron.numerics."""

import numpy as np

_CODES = np.arange(256, dtype=np.int64)


def decode_code(code: int) -> float:
    """Value of an E4M3fn code from its bits: sign, 4-bit exponent (bias 7), 3-bit mantissa; 0x7F/0xFF are NaN."""
    sign = -1.0 if code & 0x80 else 1.0
    e, m = (code >> 3) & 0xF, code & 0x7
    if e == 0xF and m == 0x7:
        return float("nan")
    if e == 0:
        return sign * m * 2.0**-9
    return sign * (1 + m / 8) * 2.0 ** (e - 7)


TABLE = np.array([decode_code(c) for c in range(256)])
# Non-negative finite codes 0x00..0x7E in increasing value order (the positive half is monotone in the code).
POS_CODES = np.arange(0x7F)
POS_VALUES = TABLE[:0x7F]
assert np.all(np.diff(POS_VALUES) > 0)


def encode_rne(v: np.ndarray) -> np.ndarray:
    """uint8 E4M3 codes of float64 values: nearest representable, ties to the even code, saturate at ±448, NaN->0x7F
    (with the input's sign bit), signed zero kept."""
    v = np.asarray(v, dtype=np.float64)
    out = np.zeros(v.shape, dtype=np.uint8)
    a = np.abs(v)
    # index of the largest table value <= a
    hi_idx = np.clip(np.searchsorted(POS_VALUES, a, side="right") - 1, 0, 0x7E)
    nxt = np.clip(hi_idx + 1, 0, 0x7E)
    lo_v, hi_v = POS_VALUES[hi_idx], POS_VALUES[nxt]
    d_lo, d_hi = a - lo_v, hi_v - a
    pick_hi = (d_hi < d_lo) | ((d_hi == d_lo) & (POS_CODES[hi_idx] % 2 == 1))
    code = np.where(pick_hi, POS_CODES[nxt], POS_CODES[hi_idx])
    code = np.where(a >= 448.0, 0x7E, code)  # saturate
    sign = np.signbit(v).astype(np.uint8) << 7
    out = (code.astype(np.uint8) | sign).astype(np.uint8)
    out = np.where(np.isnan(v), np.uint8(0x7F) | sign, out)
    return out


def pow2_scale(amax: np.ndarray) -> np.ndarray:
    """The scale rule, written from the spec in numpy float32: fl32(448/amax), mantissa cleared; amax 0/inf/nan -> 1;
    infinite scale -> 2^127."""
    amax = np.asarray(amax, dtype=np.float32)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        s = np.float32(448.0) / amax
    s = np.where(np.isinf(s), np.float32(2.0**127), s).astype(np.float32)
    bits = s.view(np.uint32) & np.uint32(0x7F800000)
    s = bits.view(np.float32)
    bad = (amax == 0) | np.isinf(amax) | np.isnan(amax)
    return np.where(bad, np.float32(1.0), s).astype(np.float32)


def ref_quantize(x32: np.ndarray, block_rows: int, block_cols: int):
    """Blockwise reference quantizer over a float32 [M, K] array -> (codes uint8 [M, K], scale_inv float32)."""
    m, k = x32.shape
    mb, kb = -(-m // block_rows), -(-k // block_cols)
    codes = np.zeros((m, k), dtype=np.uint8)
    scale_inv = np.zeros((mb, kb), dtype=np.float32)
    for i in range(mb):
        for j in range(kb):
            blk = x32[i * block_rows : (i + 1) * block_rows, j * block_cols : (j + 1) * block_cols]
            with np.errstate(invalid="ignore"):
                amax = np.float32(np.max(np.abs(blk))) if not np.isnan(blk).any() else np.float32("nan")
            s = pow2_scale(amax)
            scale_inv[i, j] = np.float32(1.0) / s
            with np.errstate(over="ignore", invalid="ignore"):
                scaled = (blk.astype(np.float32) * s).astype(np.float64)  # fp32 product, then E4M3 RNE
            codes[i * block_rows : (i + 1) * block_rows, j * block_cols : (j + 1) * block_cols] = encode_rne(scaled)
    return codes, scale_inv


def ref_dequantize(codes: np.ndarray, scale_inv: np.ndarray, block_rows: int, block_cols: int) -> np.ndarray:
    vals = TABLE[codes.astype(np.int64)]
    s = np.repeat(np.repeat(scale_inv.astype(np.float64), block_rows, 0), block_cols, 1)[: codes.shape[0], : codes.shape[1]]
    return (vals * s).astype(np.float32)
