import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fp8flow_megatron.numerics import dequantize, quantize_1x128, quantize_128x128, scaling_aware_transpose

from .e4m3_reference import ref_dequantize, ref_quantize


def _rows_over_binades(m, k, binades=40, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * torch.exp2(torch.randint(-binades, binades + 1, (m, 1), generator=g).float())
    return x.to(dtype)


def _independent_transpose(q, m_splits):
    """Reference: decode with the table, transpose, re-quantize with the reference quantizer (per split)."""
    full = ref_dequantize(q.data.view(torch.uint8).numpy(), q.scale_inv.numpy(), 1, 128)
    out, start = [], 0
    for s in m_splits:
        out.append(ref_quantize(np.ascontiguousarray(full[start : start + s].T), 1, 128) if s else None)
        start += s
    return out


def _check(q, m_splits):
    got = scaling_aware_transpose(q, m_splits)
    refs = _independent_transpose(q, m_splits)
    k = q.data.shape[1]
    stats = {"subnormal": 0, "rounded": 0, "max_code": 0}
    full_exact = dequantize(q)
    start = 0
    for s, t, ref in zip(m_splits, got, refs):
        assert t.block == (1, 128)
        assert tuple(t.data.shape) == (k, s) and tuple(t.scale_inv.shape) == (k, -(-s // 128))
        if s:
            codes = t.data.view(torch.uint8).numpy()
            bad = np.argwhere(codes != ref[0])
            assert bad.size == 0, f"split {s}: {len(bad)} mismatches, first {tuple(bad[0])}: {codes[tuple(bad[0])]:#04x} vs {ref[0][tuple(bad[0])]:#04x}"
            np.testing.assert_array_equal(t.scale_inv.numpy(), ref[1])
            # also the stated contract, through the package's own quantize/dequantize
            c = quantize_1x128(full_exact[start : start + s].t().contiguous())
            assert torch.equal(c.data.view(torch.uint8), t.data.view(torch.uint8))
            assert torch.equal(c.scale_inv, t.scale_inv)
            mag = codes & 0x7F
            stats["subnormal"] += int(((mag > 0) & (mag < 8)).sum())
            stats["max_code"] = max(stats["max_code"], int(mag.max()))
            # values that were not exactly representable after the exponent shift (rounded into the subnormals)
            new_vals = dequantize(t).t()
            stats["rounded"] += int((new_vals != full_exact[start : start + s]).sum())
        start += s
    return stats


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 129, 500])
@pytest.mark.parametrize("k", [1, 128, 300])
def test_transpose_whole_tensor(m, k, dtype):
    q = quantize_1x128(_rows_over_binades(m, k, seed=m + k, dtype=dtype))
    stats = _check(q, [m])
    single = scaling_aware_transpose(q)  # without m_splits: one tensor, not a list
    assert torch.equal(single.data.view(torch.uint8), scaling_aware_transpose(q, [m])[0].data.view(torch.uint8))
    if m >= 129 and k >= 128:
        # ±40 binades across rows must reach the subnormals, and rounding must have happened there
        assert stats["subnormal"] > 0 and stats["rounded"] > 0


@pytest.mark.parametrize(
    "m_splits",
    [[0], [0, 0, 0], [500], [129, 0, 371], [0, 1, 0, 128, 129, 242, 0], [7] * 10 + [430], [250, 250]],
)
def test_transpose_m_splits_with_empty_experts(m_splits):
    m = sum(m_splits)
    q = quantize_1x128(_rows_over_binades(m, 256, seed=len(m_splits)))
    out = scaling_aware_transpose(q, m_splits)
    assert isinstance(out, list) and len(out) == len(m_splits)
    _check(q, m_splits)


def test_transpose_no_block_crosses_a_split():
    # Split 0 holds a huge value; split 1 tiny values. If a 128-block crossed the boundary, split 1 would underflow.
    x = torch.full((20, 128), 1e-3)
    x[:10] = 1e3
    q = quantize_1x128(x)
    small = scaling_aware_transpose(q, [10, 10])[1]
    assert torch.equal(dequantize(small), dequantize(q)[10:].t())


def test_transpose_saturation_and_special_codes():
    # A column whose rows have scales 2^0 and 2^-8: the row with the large scale_inv dominates, the others shift down.
    x = torch.zeros(256, 128)
    x[0] = 448.0
    x[1] = -448.0 * 2.0**-20  # shifts 20 binades down: underflows to -0
    x[2, :64] = 3 * 2.0**-16  # lands on a subnormal tie
    x[3, 5] = -0.0
    q = quantize_1x128(x)
    _check(q, [256])
    t = scaling_aware_transpose(q)
    codes = t.data.view(torch.uint8)
    assert int(codes[0, 0]) == 0x7E and int(codes[0, 1]) == 0x80 and int(codes[5, 3]) == 0x80


def test_transpose_rejects_bad_input():
    q = quantize_1x128(torch.randn(10, 128))
    with pytest.raises(ValueError, match="sum to M=10"):
        scaling_aware_transpose(q, [3, 3])
    with pytest.raises(ValueError, match="non-negative"):
        scaling_aware_transpose(q, [11, -1])
    with pytest.raises(ValueError, match="1x128 row-wise"):
        scaling_aware_transpose(quantize_128x128(torch.randn(10, 128)))


def test_transpose_differs_from_truncation():
    # TE#2544 truncates underflowing values; RNE rounds e.g. 0.75 subnormal units up to 1 unit. Make sure the
    # data here contains such a case, and that we produce the rounded code.
    x = torch.zeros(2, 128)
    x[0, 0] = 448.0  # row 0: scale 1
    x[1, 0] = 1.5 * 2.0**-10  # row 1: own scale; under row 0's scale it is 0.75 * 2^-9 -> RNE 1 unit
    x[1, 1:] = 1.5 * 2.0**-10
    q = quantize_1x128(x)
    t = scaling_aware_transpose(q)
    assert float(t.scale_inv[0, 0]) == 1.0
    assert int(t.data.view(torch.uint8)[0, 1]) == 0x01  # truncation would give 0x00


@settings(max_examples=40, deadline=None)
@given(
    splits=st.lists(st.integers(0, 300), min_size=1, max_size=5),
    k=st.integers(1, 260),
    binades=st.integers(0, 60),
    seed=st.integers(0, 2**31 - 1),
)
def test_transpose_property(splits, k, binades, seed):
    q = quantize_1x128(_rows_over_binades(sum(splits), k, binades=binades, seed=seed))
    _check(q, splits)
