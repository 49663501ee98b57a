import numpy as np
import pytest
import torch

from fp8flow_megatron.numerics import (
    E4M3_MAX,
    Fp8Blockwise,
    dequantize,
    quantize_128x128,
    quantize_1x128,
)
from fp8flow_megatron.numerics.format import scale_from_amax

from .e4m3_reference import POS_VALUES, TABLE, encode_rne, pow2_scale, ref_dequantize, ref_quantize


def _codes(q: Fp8Blockwise) -> np.ndarray:
    return q.data.view(torch.uint8).numpy()


def _spread(m, k, binades=40, seed=0, dtype=torch.float32):
    """Rows spread over ±binades binades, with some columns of tiny values inside each row (underflow)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * torch.exp2(torch.randint(-binades, binades, (m, 1), generator=g).float())
    if k > 4:
        x[:, ::5] *= 2.0**-12
    return x.to(dtype)


def assert_bitwise_equal(q: Fp8Blockwise, codes: np.ndarray, scale_inv: np.ndarray):
    got = _codes(q)
    assert got.shape == codes.shape
    bad = np.argwhere(got != codes)
    assert bad.size == 0, f"{len(bad)} code mismatches, first at {tuple(bad[0])}: got {got[tuple(bad[0])]:#04x} want {codes[tuple(bad[0])]:#04x}"
    np.testing.assert_array_equal(q.scale_inv.numpy(), scale_inv)


def test_torch_cast_is_not_what_is_tested_table_is_sane():
    # The reference table itself: 448 max, 2^-9 smallest subnormal, NaN at 0x7F.
    assert TABLE[0x7E] == 448.0 and TABLE[0x01] == 2.0**-9 and TABLE[0x08] == 2.0**-6 and np.isnan(TABLE[0x7F])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m", [0, 1, 129, 500])
@pytest.mark.parametrize("k", [1, 127, 128, 300])
def test_quantize_1x128_matches_reference(m, k, dtype):
    x = _spread(m, k, seed=m * 1000 + k, dtype=dtype)
    q = quantize_1x128(x)
    assert q.data.dtype == torch.float8_e4m3fn and q.scale_inv.dtype == torch.float32
    assert q.block == (1, 128) and tuple(q.scale_inv.shape) == (m, -(-k // 128))
    codes, scale_inv = ref_quantize(x.float().numpy(), 1, 128)
    assert_bitwise_equal(q, codes, scale_inv)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m,k", [(0, 5), (1, 1), (129, 300), (256, 128), (300, 257)])
def test_quantize_128x128_matches_reference(m, k, dtype):
    x = _spread(m, k, binades=10, seed=7 + m + k, dtype=dtype)
    q = quantize_128x128(x)
    assert q.block == (128, 128) and tuple(q.scale_inv.shape) == (-(-m // 128), -(-k // 128))
    codes, scale_inv = ref_quantize(x.float().numpy(), 128, 128)
    assert_bitwise_equal(q, codes, scale_inv)


def test_every_code_round_trips_and_midpoints_round_to_even():
    # A block with amax exactly 448 has scale 1, so every finite E4M3 value must come back as its own code, and every
    # midpoint between neighbours must go to the neighbour whose code is even (subnormals included).
    vals = POS_VALUES
    mids = (vals[:-1] + vals[1:]) / 2
    row = np.concatenate([vals, -vals, mids, -mids]).astype(np.float32)
    row = np.concatenate([row, np.full((-len(row)) % 128, 448.0, dtype=np.float32)])
    x = torch.from_numpy(row.reshape(-1, 128).copy())
    x[:, 0] = 448.0  # every block's amax is 448 -> scale 1
    q = quantize_1x128(x)
    assert torch.all(q.scale_inv == 1.0)
    assert_bitwise_equal(q, encode_rne(x.numpy().astype(np.float64)), np.ones_like(q.scale_inv.numpy()))
    # explicit spot checks of ties-to-even in the subnormals and at the top
    # 2^-10 is half the smallest subnormal (-> 0), 3*2^-10 and 5*2^-10 are ties (-> 2 units), 400 = 384|416 tie -> 384 (0x7C, even)
    spot = torch.tensor([[448.0, 2.0**-10, 3 * 2.0**-10, 5 * 2.0**-10, 400.0, 440.0, -0.0] + [0.0] * 121])
    c = _codes(quantize_1x128(spot))[0, :7]
    assert list(c) == [0x7E, 0x00, 0x02, 0x02, 0x7C, 0x7E, 0x80]


def test_all_zero_blocks_and_signed_zero():
    x = torch.zeros(3, 300)
    x[1, 130:140] = -0.0
    x[2, 200] = 5.0
    q = quantize_1x128(x)
    assert torch.equal(q.scale_inv[0], torch.ones(3))  # amax 0 -> scale 1
    assert _codes(q)[1, 130] == 0x80  # -0 kept
    assert torch.equal(dequantize(q), x)


def test_scale_rule_special_amax():
    amax = torch.tensor([0.0, float("inf"), float("nan"), 448.0, 1.0, 2.0**-140, 1e-45, 3.0e38, 449.0, 447.0])
    s = scale_from_amax(amax)
    np.testing.assert_array_equal(s.numpy(), pow2_scale(amax.numpy()))
    assert s[0] == 1 and s[1] == 1 and s[2] == 1 and s[3] == 1 and s[4] == 256
    assert s[5] == 2.0**127 and s[6] == 2.0**127  # 448/amax overflows fp32
    assert s[8] == 0.5 and s[9] == 1.0


def test_scale_is_the_largest_power_of_two_that_fits():
    # amax * scale lands in (224, 448]: the block's largest element uses the top binade and nothing is clipped.
    g = torch.Generator().manual_seed(11)
    x = torch.randn(4096, 128, generator=g) * torch.exp2(torch.randint(-100, 100, (4096, 1), generator=g).float())
    q = quantize_1x128(x)
    top = x.abs().amax(dim=1) / q.scale_inv[:, 0]
    assert bool(((top > 224) & (top <= 448)).all())
    assert int((q.data.view(torch.uint8) & 0x7F).max()) <= 0x7E


def test_nonfinite_inputs_follow_the_rule():
    x = torch.ones(2, 128)
    x[0, 3] = float("nan")
    x[1, 4] = float("-inf")
    q = quantize_1x128(x)
    assert torch.equal(q.scale_inv, torch.ones(2, 1))  # amax NaN / inf -> scale 1
    assert _codes(q)[0, 3] & 0x7F == 0x7F  # NaN stays NaN
    assert _codes(q)[1, 4] == 0xFE  # -inf saturates to -448


@pytest.mark.parametrize("block", [(1, 128), (128, 128)])
def test_dequantize_is_exact(block):
    x = _spread(200, 260, seed=3)
    quant = quantize_1x128 if block == (1, 128) else quantize_128x128
    q = quant(x)
    ref = ref_dequantize(_codes(q), q.scale_inv.numpy(), *block)
    np.testing.assert_array_equal(dequantize(q).numpy(), ref)
    assert dequantize(q).dtype == torch.float32 and dequantize(q).shape == x.shape
    # relative error of a value that scales into E4M3's normal range is at most half an ulp (2^-4)
    scale_inv = torch.from_numpy(np.repeat(np.repeat(q.scale_inv.numpy(), block[0], 0), block[1], 1)[:200, :260])
    big = (x / scale_inv).abs() >= 2.0**-6
    assert int(big.sum()) > 1000
    rel = ((dequantize(q) - x).abs() / x.abs())[big]
    assert float(rel.max()) <= 2.0**-4


def test_input_validation():
    with pytest.raises(TypeError, match="float32 or torch.bfloat16"):
        quantize_1x128(torch.zeros(2, 2, dtype=torch.float16))
    with pytest.raises(ValueError, match="2-D"):
        quantize_1x128(torch.zeros(2, 2, 2))
    with pytest.raises(ValueError, match="K must be >= 1"):
        quantize_128x128(torch.zeros(2, 0))
    with pytest.raises(ValueError, match="scale_inv has shape"):
        Fp8Blockwise(torch.zeros(2, 130).to(torch.float8_e4m3fn), torch.ones(2, 1))
    with pytest.raises(ValueError, match="block must be"):
        Fp8Blockwise(torch.zeros(2, 2).to(torch.float8_e4m3fn), torch.ones(2, 1), block=(1, 64))
    assert E4M3_MAX == 448.0
