"""scaling_aware_transpose_cuda vs its numerics twin (bit for bit, both scale layouts) and vs TE's column-wise
quantizer (GEMM-ready layout)."""

import pytest
import torch

from fp8flow_megatron.kernels import ColumnwiseGemmReady, scaling_aware_transpose_cuda
from fp8flow_megatron.numerics import Fp8Blockwise, dequantize, quantize_1x128, scaling_aware_transpose

from .compare import assert_bitwise_equal

pytestmark = pytest.mark.gpu


def _rows_over_binades(m, k, binades=40, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * torch.exp2(torch.randint(-binades, binades + 1, (m, 1), generator=g).float())
    return x.to(dtype)


def _cuda(q: Fp8Blockwise) -> Fp8Blockwise:
    return Fp8Blockwise(q.data.cuda(), q.scale_inv.cuda(), q.block)


def _check(q: Fp8Blockwise, m_splits, layout, case):
    """q on the CPU; the twin runs there, the kernel on the GPU."""
    k = q.data.shape[1]
    got = scaling_aware_transpose_cuda(_cuda(q), m_splits, scale_layout=layout)
    ref = scaling_aware_transpose(q, m_splits)
    if m_splits is None:
        got, ref, m_splits = [got], [ref], [q.data.shape[0]]
    assert len(got) == len(ref)
    subnormals = 0
    for i, (s, t, r) in enumerate(zip(m_splits, got, ref)):
        what = f"{case} layout={layout} split {i} (m={s}, K={k})"
        assert t.data.dtype == torch.float8_e4m3fn and t.data.is_contiguous()
        assert_bitwise_equal(t.data.view(torch.uint8), r.data.view(torch.uint8), what + " codes")
        if layout == "compact":
            assert isinstance(t, Fp8Blockwise) and t.block == (1, 128)
            assert_bitwise_equal(t.scale_inv, r.scale_inv, what + " scale_inv")
        else:
            assert isinstance(t, ColumnwiseGemmReady)
            pad4 = -(-k // 4) * 4
            assert tuple(t.scale_inv.shape) == (-(-s // 128), pad4), what
            assert_bitwise_equal(t.scale_inv[:, :k], r.scale_inv.t().contiguous(), what + " scale_inv (GEMM-ready)")
            assert not t.scale_inv[:, k:].any(), what + ": pad columns of the GEMM-ready scales must be 0"
        mag = t.data.view(torch.uint8).cpu() & 0x7F
        subnormals += int(((mag > 0) & (mag < 8)).sum())
    return subnormals


SPLITS = [[0], [0, 0, 0], [500], [129, 0, 371], [0, 1, 0, 128, 129, 242, 0], [7] * 10 + [430], [0, 0, 777, 0]]


@pytest.mark.parametrize("layout", ["compact", "gemm_ready"])
@pytest.mark.parametrize("k", [1, 128, 300, 2048])
@pytest.mark.parametrize("m_splits", SPLITS, ids=lambda s: "-".join(map(str, s)) if len(s) < 8 else f"{len(s)}splits")
def test_transpose_matches_twin(m_splits, k, layout):
    m = sum(m_splits)
    q = quantize_1x128(_rows_over_binades(m, k, seed=m + k))
    subnormals = _check(q, m_splits, layout, f"±40 binades m_splits={m_splits}")
    if m >= 256 and k >= 128:
        assert subnormals > 0, "±40 binades across rows must reach the E4M3 subnormals"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m,k", [(1, 1), (129, 300), (500, 129), (4096, 2048)])
def test_transpose_whole_tensor(m, k, dtype):
    q = quantize_1x128(_rows_over_binades(m, k, seed=3, dtype=dtype))
    _check(q, None, "compact", f"whole tensor {dtype}")
    _check(q, None, "gemm_ready", f"whole tensor {dtype}")


def test_transpose_unaligned_views():
    # Codes starting at an odd byte offset (no 4-byte loads) and splits that are not multiples of 16 (byte stores).
    q = quantize_1x128(_rows_over_binades(301, 129, seed=5))
    view = Fp8Blockwise(q.data[1:], q.scale_inv[1:])
    _check(view, [13, 0, 150, 137], "compact", "unaligned view")
    _check(view, [13, 0, 150, 137], "gemm_ready", "unaligned view")


def test_transpose_special_codes():
    x = torch.zeros(256, 256)
    x[0] = 448.0
    x[1] = -448.0 * 2.0**-20  # shifts 20 binades down: underflows to -0
    x[2, :64] = 3 * 2.0**-16  # subnormal tie
    x[3, 5] = -0.0
    x[4:200] = torch.randn(196, 256)
    q = quantize_1x128(x)
    codes = q.data.view(torch.uint8).clone()
    codes[7, 9], codes[100, 130], codes[130, 131] = 0x7F, 0xFF, 0x7F  # NaN codes, both signs
    q = Fp8Blockwise(codes.view(torch.float8_e4m3fn), q.scale_inv)
    for layout in ("compact", "gemm_ready"):
        _check(q, [256], layout, "special codes")
        _check(q, [100, 156], layout, "special codes, split")


def test_transpose_extreme_scales():
    # Row scales at the ends of the range: 2^120 (448 * 2^120 overflows fp32 when dequantized: saturates with scale 1)
    # and 2^-127 (an fp32 subnormal scale_inv, with subnormal codes: values down to 2^-136).
    codes = torch.randint(0, 0x7F, (256, 256), dtype=torch.uint8)
    codes[::5] |= 0x80
    scale_inv = torch.ones(256, 2)
    scale_inv[0:40] = 2.0**120
    scale_inv[40:80] = 2.0**-127
    scale_inv[80:] = torch.exp2(torch.randint(-127, 121, (176, 2)).float())
    q = Fp8Blockwise(codes.view(torch.float8_e4m3fn), scale_inv)
    for layout in ("compact", "gemm_ready"):
        _check(q, [128, 0, 100, 28], layout, "extreme scales")
        # rows 40..79 alone: every column amax is an fp32 subnormal (the column scale saturates at 2^127)
        _check(q, [40, 40, 0, 148, 28], layout, "extreme scales, tiny split")


def test_transpose_contract_without_twin():
    # The contract itself on one large split: quantize_1x128(dequantize(q).t()).
    q = quantize_1x128(_rows_over_binades(1000, 512, seed=9))
    got = scaling_aware_transpose_cuda(_cuda(q))
    ref = quantize_1x128(dequantize(q).t().contiguous())
    assert_bitwise_equal(got.data.view(torch.uint8), ref.data.view(torch.uint8), "contract codes")
    assert_bitwise_equal(got.scale_inv, ref.scale_inv, "contract scale_inv")


def test_gemm_ready_matches_te_columnwise_quantizer():
    te = pytest.importorskip("transformer_engine.pytorch")
    import transformer_engine_torch as tex

    quantizer = te.tensor.float8_blockwise_tensor.Float8BlockQuantizer(
        tex.DType.kFloat8E4M3, rowwise=False, columnwise=True, force_pow_2_scales=True, amax_epsilon=0.0,
        block_scaling_dim=1,
    )  # fmt: skip
    m_splits = [256, 384, 200, 0, 16]
    q = quantize_1x128(_rows_over_binades(sum(m_splits), 2048, binades=12, seed=11))
    x = dequantize(q)
    assert torch.equal(x.bfloat16().float(), x), "test data must be exact in bf16"
    got = scaling_aware_transpose_cuda(_cuda(q), m_splits, scale_layout="gemm_ready")
    start = 0
    for i, (s, t) in enumerate(zip(m_splits, got)):
        if s:
            ref = quantizer(x[start : start + s].bfloat16().cuda())
            assert_bitwise_equal(t.data.view(torch.uint8), ref._columnwise_data.view(torch.uint8), f"TE split {i} codes")
            assert tuple(ref._columnwise_scale_inv.shape) == tuple(t.scale_inv.shape)
            assert_bitwise_equal(t.scale_inv, ref._columnwise_scale_inv, f"TE split {i} scale_inv")
        start += s


def test_transpose_rejects_bad_input():
    q = _cuda(quantize_1x128(torch.randn(10, 128)))
    with pytest.raises(ValueError, match="sum to M=10"):
        scaling_aware_transpose_cuda(q, [3, 3])
    with pytest.raises(ValueError, match="non-negative"):
        scaling_aware_transpose_cuda(q, [11, -1])
    with pytest.raises(ValueError, match="scale_layout"):
        scaling_aware_transpose_cuda(q, scale_layout="swizzled")
