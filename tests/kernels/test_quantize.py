"""quantize_1x128_triton vs its numerics twin and vs TE's Float8BlockQuantizer, bit for bit."""

import pytest
import torch

from fp8flow_megatron.kernels import quantize_1x128_triton
from fp8flow_megatron.numerics import quantize_1x128

from .compare import assert_bitwise_equal

pytestmark = pytest.mark.gpu


def _data(m, k, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * torch.exp2(torch.randint(-40, 41, (m, 1), generator=g).float())
    if m >= 4 and k >= 128:
        x[0, :128] = 0.0  # amax = 0: scale 1
        x[1] *= 1e30  # far beyond 448 before scaling
        x[2, :3] = torch.tensor([1e-40, -1e-41, -0.0])  # fp32 subnormal inputs and -0
        x[3, 5] = float("inf")  # amax inf: scale 1, the inf saturates to 448, its block's other values scale by 1
    return x.to(dtype)


def _check(x, case):
    got = quantize_1x128_triton(x.cuda())
    ref = quantize_1x128(x)
    assert got.block == (1, 128) and got.data.is_contiguous() and got.scale_inv.is_contiguous()
    assert_bitwise_equal(got.data.view(torch.uint8), ref.data.view(torch.uint8), f"{case} codes")
    assert_bitwise_equal(got.scale_inv, ref.scale_inv, f"{case} scale_inv")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k", [1, 128, 300, 2048])
@pytest.mark.parametrize("m", [0, 1, 129, 500])
def test_quantize_matches_twin(m, k, dtype):
    _check(_data(m, k, dtype, seed=m * 7 + k), f"[{m}, {k}] {dtype}")


def test_quantize_row_strided_input():
    wide = _data(300, 1024, torch.bfloat16, seed=1)
    _check(wide[:, 100:740], "row-strided view")


def test_quantize_nan_block():
    # A NaN makes its block's scale 1 (as the twin). The NaN code itself is 0x7F for either sign (hardware
    # conversion) where the twin keeps the sign, so NaN positions are compared as "is NaN" only.
    x = _data(8, 256, torch.float32, seed=2)
    x[4, 10], x[5, 200] = float("nan"), -float("nan")
    got, ref = quantize_1x128_triton(x.cuda()), quantize_1x128(x)
    assert_bitwise_equal(got.scale_inv, ref.scale_inv, "NaN block scale_inv")
    g, r = got.data.view(torch.uint8).cpu(), ref.data.view(torch.uint8)
    nan = (r & 0x7F) == 0x7F
    assert torch.equal(nan, (g & 0x7F) == 0x7F)
    assert torch.equal(g[~nan], r[~nan])


@pytest.mark.parametrize("m,k", [(1, 128), (129, 2048), (1000, 7168), (37, 300)])
def test_quantize_matches_te(m, k):
    te = pytest.importorskip("transformer_engine.pytorch")
    import transformer_engine_torch as tex

    quantizer = te.tensor.float8_blockwise_tensor.Float8BlockQuantizer(
        tex.DType.kFloat8E4M3, rowwise=True, columnwise=False, force_pow_2_scales=True, amax_epsilon=0.0,
        block_scaling_dim=1,
    )  # fmt: skip
    g = torch.Generator().manual_seed(m + k)
    x = (torch.randn(m, k, generator=g) * torch.exp2(torch.randint(-30, 31, (m, 1), generator=g).float())).bfloat16()
    x = x.cuda()
    got = quantize_1x128_triton(x)
    ref = quantizer(x)
    nbk = -(-k // 128)
    assert tuple(ref._rowwise_scale_inv.shape) == (nbk, -(-m // 4) * 4)  # TE: transposed, M padded to 4
    assert_bitwise_equal(got.data.view(torch.uint8), ref._rowwise_data.view(torch.uint8), f"TE [{m}, {k}] codes")
    assert_bitwise_equal(got.scale_inv, ref._rowwise_scale_inv[:, :m].t().contiguous(), f"TE [{m}, {k}] scale_inv")


def test_quantize_rejects_bad_input():
    with pytest.raises(TypeError, match="float32 or torch.bfloat16"):
        quantize_1x128_triton(torch.zeros(4, 128, dtype=torch.float16, device="cuda"))
    with pytest.raises(ValueError, match="2-D"):
        quantize_1x128_triton(torch.zeros(128, device="cuda"))
