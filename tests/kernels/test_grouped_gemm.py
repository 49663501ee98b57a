"""fp8_grouped_gemm_nt_triton / fp8_grouped_wgrad_triton vs their numerics twins on the same FP8 codes and scales.

The twins dequantize and multiply in fp32; the kernels multiply FP8 codes on the tensor cores per 128-wide K block and
scale-accumulate in fp32, so results agree to fp32 summation order plus Hopper's FP8 accumulation inside one 128-wide
block (bound 1e-3 relative; the measured values are printed with -s). Edge cases: empty experts, an expert of 16
rows, experts spanning several 128-row tiles with a partial last one, all rows on one expert, K and N not multiples
of 128, no rows at all, row counts not multiples of 16 (the wgrad kernel's unaligned path)."""

import pytest
import torch

from fp8flow_megatron.numerics import quantize_1x128, quantize_128x128
from fp8flow_megatron.numerics.gemm import Fp8BlockwiseStack, fp8_grouped_gemm_nt, fp8_grouped_wgrad

pytestmark = pytest.mark.gpu

TOL = 1e-3
SPLITS = [[16, 0, 48, 32], [0, 0, 64, 0], [128, 256, 16, 0], [144, 400, 0, 16], [0, 0, 0, 0], [1040], [5, 0, 37, 130]]


def _rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


def _problem(m_splits, n, k, seed):
    g = torch.Generator().manual_seed(seed)
    m = sum(m_splits)
    x = quantize_1x128((torch.randn(m, k, generator=g) * 3).cuda())
    dy = quantize_1x128((torch.randn(m, n, generator=g) * 1e-3).cuda())
    weights = [(torch.randn(n, k, generator=g) * 0.02).cuda() for _ in m_splits]
    return x, dy, Fp8BlockwiseStack.quantize(weights, quantize_128x128)


@pytest.mark.parametrize("n,k", [(256, 384), (200, 320), (2816, 2048)])
@pytest.mark.parametrize("m_splits", SPLITS)
def test_grouped_gemm_matches_twin(m_splits, n, k):
    from fp8flow_megatron.kernels import fp8_grouped_gemm_nt_triton

    if n == 2816 and max(m_splits) > 256:
        pytest.skip("large shape once")
    x, dy, w = _problem(m_splits, n, k, seed=sum(m_splits) + n)
    for out_dtype in (torch.float32, torch.bfloat16):
        y = fp8_grouped_gemm_nt_triton(x, w, m_splits, out_dtype)
        y_ref = fp8_grouped_gemm_nt(x, w, m_splits, out_dtype)
        assert y.dtype == out_dtype and y.shape == y_ref.shape
        if sum(m_splits):
            print(f"grouped gemm {m_splits} n={n} k={k} {out_dtype}: rel {_rel(y, y_ref):.1e}")
            assert _rel(y, y_ref) < TOL, (out_dtype, _rel(y, y_ref))
    # dgrad form: dy [M, N] against the exact block transposes [K, N]
    dx = fp8_grouped_gemm_nt_triton(dy, w.t(), m_splits, torch.float32)
    dx_ref = fp8_grouped_gemm_nt(dy, w.t(), m_splits, torch.float32)
    if sum(m_splits):
        assert _rel(dx, dx_ref) < TOL
    # a list of per-expert weights gives the same result as the stack
    assert torch.equal(fp8_grouped_gemm_nt_triton(x, list(w), m_splits), fp8_grouped_gemm_nt_triton(x, w, m_splits))


@pytest.mark.parametrize("n,k", [(256, 384), (200, 320)])
@pytest.mark.parametrize("m_splits", SPLITS)
def test_grouped_wgrad_matches_twin(m_splits, n, k):
    from fp8flow_megatron.kernels import fp8_grouped_wgrad_triton

    x, dy, _ = _problem(m_splits, n, k, seed=7 + sum(m_splits))
    dw = fp8_grouped_wgrad_triton(dy, x, m_splits, torch.float32)
    dw_ref = fp8_grouped_wgrad(dy, x, m_splits, torch.float32)
    assert dw.shape == (len(m_splits), n, k)
    for e, m in enumerate(m_splits):
        if m == 0:
            assert float(dw[e].abs().sum()) == 0.0  # written as zeros, not left uninitialized
        else:
            print(f"grouped wgrad {m_splits} expert {e}: rel {_rel(dw[e], dw_ref[e]):.1e}")
            assert _rel(dw[e], dw_ref[e]) < TOL, (e, _rel(dw[e], dw_ref[e]))


def test_grouped_gemm_rejects_mismatched_splits():
    from fp8flow_megatron.kernels import fp8_grouped_gemm_nt_triton

    x, _, w = _problem([16, 16], 128, 128, seed=0)
    with pytest.raises(ValueError, match="m_splits"):
        fp8_grouped_gemm_nt_triton(x, w, [16, 8])
