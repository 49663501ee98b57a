"""fp8_grouped_gemm_nt_triton / fp8_grouped_wgrad_triton vs their numerics twins on the same FP8 codes and scales.

The twins dequantize and multiply in fp32; the kernels multiply FP8 codes on the tensor cores per 128-wide K block and
scale-accumulate in fp32, so results agree to fp32 summation order plus Hopper's FP8 accumulation inside one 128-wide
block (bound 1e-3 relative; the measured values are printed with -s). Edge cases: empty experts, an expert of 16
rows, experts spanning several 128-row tiles with a partial last one, all rows on one expert, K and N not multiples
of 128, no rows at all, row counts not multiples of 16 (the wgrad kernel's unaligned path). The wgrad also writes or
accumulates into per-expert buffers at scattered addresses (out=, accumulate=: megatron's main_grad)."""

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


@pytest.mark.parametrize("n,k", [(256, 384), (200, 320), (2816, 2048), (320, 200), (136, 1408)])
@pytest.mark.parametrize("m_splits", SPLITS)
def test_tma_form_is_bit_identical_to_pointer_form(m_splits, n, k):
    # the TMA form reads whole boxes (past a group's rows, past N into the next expert, zero-filled past K and the
    # last row); the pointer form masks every load: the outputs must agree bit for bit, fprop and dgrad, fp32 and bf16
    from fp8flow_megatron.kernels import grouped_gemm as gg
    from fp8flow_megatron.numerics.groups import RowGroups

    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("TMA needs Hopper")
    if n == 2816 and max(m_splits) > 256:
        pytest.skip("large shape once")
    x, dy, w = _problem(m_splits, n, k, seed=sum(m_splits) + n + 1)
    groups = RowGroups.from_splits(m_splits, "cuda")
    for a, b in ((x, w), (dy, w.t())):
        if a.data.shape[1] % 16:
            assert not gg._tma_ok(a.data, b.data)  # K = 200: the pointer form runs
            continue
        assert gg._tma_ok(a.data, b.data)
        for out_dtype in (torch.float32, torch.bfloat16):
            y_tma = gg._gemm(a, b, groups, out_dtype, tma=True)
            y_ptr = gg._gemm(a, b, groups, out_dtype, tma=False)
            assert torch.equal(y_tma.view(torch.int8), y_ptr.view(torch.int8)), (m_splits, n, k, out_dtype)


@pytest.mark.parametrize("n,k", [(256, 384), (200, 320), (2816, 2048), (136, 1408)])
@pytest.mark.parametrize("m_splits", SPLITS + [[8192, 0, 4112]])  # the last: >= 4096 rows per expert, 4 stages
def test_wgrad_tma_form_is_bit_identical_to_pointer_form(m_splits, n, k):
    # the TMA form reads whole [BLOCK, 128] boxes of each expert's transposed operands through descriptors made on
    # the device (zero-filled past N, K and the expert's rows); the pointer form masks every load. Both must give the
    # same bits: the one-tensor output and the out= / accumulate path, fp32 and bf16. Row counts that are not
    # multiples of 16 keep the pointer form, and forcing the TMA form there is an error.
    from fp8flow_megatron.kernels import grouped_gemm as gg
    from fp8flow_megatron.numerics.groups import RowGroups

    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("TMA needs Hopper")
    if n == 2816 and max(m_splits) > 256:
        pytest.skip("large shape once")
    x, dy, _ = _problem(m_splits, n, k, seed=sum(m_splits) + n + 3)
    groups = RowGroups.from_splits(m_splits, "cuda")
    if groups.align % 16:
        with pytest.raises(ValueError, match="multiple of 16"):
            gg._wgrad(dy, x, groups, torch.float32, None, False, "wgrad", tma=True)
        return
    for out_dtype in (torch.float32, torch.bfloat16):
        dw_tma = gg._wgrad(dy, x, groups, out_dtype, None, False, "wgrad", tma=True)
        dw_ptr = gg._wgrad(dy, x, groups, out_dtype, None, False, "wgrad", tma=False)
        assert torch.equal(dw_tma.view(torch.int8), dw_ptr.view(torch.int8)), (m_splits, n, k, out_dtype)
        g = torch.Generator().manual_seed(n)
        before = [(torch.randn(n, k, generator=g) * 0.05).to(out_dtype).cuda() for _ in m_splits]
        for accumulate in (False, True):
            outs = []
            for tma in (True, False):
                out = [b.clone() for b in before]
                gg._wgrad(dy, x, groups, out_dtype, out, accumulate, "wgrad", tma=tma)
                outs.append(out)
            for e in range(len(m_splits)):
                assert torch.equal(outs[0][e].view(torch.int8), outs[1][e].view(torch.int8)), (e, accumulate)


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


# bf16 buffers: kernel and twin round fp32 sums that differ in summation order, so a sum near a bf16 rounding boundary
# lands one bf16 step (2^-8 relative) apart
TOL_BF16 = TOL + 2.0**-8


@pytest.mark.parametrize("pad", [0, 3])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("accumulate", [True, False])
@pytest.mark.parametrize("m_splits", SPLITS)
def test_grouped_wgrad_into_out_matches_twin(m_splits, accumulate, out_dtype, pad):
    # out[e] are views of one buffer in reverse expert order (megatron's main_grad in the DDP grad buffer), 16-byte
    # aligned (pad 0: 200 * 320 * 4 bytes apart) or not (pad 3); the buffer outside them must stay untouched.
    from fp8flow_megatron.kernels import fp8_grouped_wgrad_triton

    from ..numerics.test_gemm import scattered_buffers

    n, k = 200, 320
    x, dy, _ = _problem(m_splits, n, k, seed=11 + sum(m_splits))
    g = torch.Generator().manual_seed(len(m_splits))
    before = [(torch.randn(n, k, generator=g) * 0.05).to(out_dtype).cuda() for _ in m_splits]
    for b in before:
        b[0, 0] = -0.0  # an empty expert's buffer keeps even the sign of its zeros when accumulating
    buf, out = scattered_buffers(before, pad=pad)
    got = fp8_grouped_wgrad_triton(dy, x, m_splits, out_dtype, out=out, accumulate=accumulate)
    assert got is out
    ref = [b.clone() for b in before]
    fp8_grouped_wgrad(dy, x, m_splits, out_dtype, out=ref, accumulate=accumulate)
    tol = TOL if out_dtype == torch.float32 else TOL_BF16
    for e, m in enumerate(m_splits):
        if m == 0 and accumulate:
            assert torch.equal(out[e].view(torch.uint8), before[e].view(torch.uint8)), f"expert {e} was touched"
        elif m == 0:
            assert float(out[e].abs().sum()) == 0.0, f"expert {e} not zeroed"
        else:
            print(f"wgrad into out {m_splits} acc={accumulate} {out_dtype} expert {e}: rel {_rel(out[e], ref[e]):.1e}")
            assert _rel(out[e], ref[e]) < tol, (e, _rel(out[e], ref[e]))
    inside = torch.zeros(buf.numel(), dtype=torch.bool, device=buf.device)
    for o in out:
        inside[o.storage_offset() : o.storage_offset() + o.numel()] = True
    assert torch.isnan(buf[~inside]).all(), "the kernel wrote outside the out tensors"


def test_grouped_wgrad_accumulates_micro_batches():
    # Two micro-batches into the same fp32 buffers: the sum of both gradients, as the returned ones would add up.
    from fp8flow_megatron.kernels import fp8_grouped_wgrad_triton

    m_splits = [144, 0, 16, 400]
    n, k = 256, 384
    problems = [_problem(m_splits, n, k, seed=s) for s in (1, 2)]
    out = [torch.zeros(n, k, device="cuda") for _ in m_splits]
    for x, dy, _ in problems:
        fp8_grouped_wgrad_triton(dy, x, m_splits, out=out, accumulate=True)
    want = sum(fp8_grouped_wgrad(dy, x, m_splits) for x, dy, _ in problems)
    for e, m in enumerate(m_splits):
        if m:
            assert _rel(out[e], want[e]) < TOL, (e, _rel(out[e], want[e]))
        else:
            assert float(out[e].abs().sum()) == 0.0


def test_grouped_wgrad_rejects_bad_out():
    from fp8flow_megatron.kernels import fp8_grouped_wgrad_triton

    x, dy, _ = _problem([16, 16], 128, 128, seed=0)
    with pytest.raises(ValueError, match="accumulate=True needs out="):
        fp8_grouped_wgrad_triton(dy, x, [16, 16], accumulate=True)
    with pytest.raises(ValueError, match="1 out tensors for 2 experts"):
        fp8_grouped_wgrad_triton(dy, x, [16, 16], out=[torch.zeros(128, 128, device="cuda")], accumulate=True)
    with pytest.raises(ValueError, match="is on cpu"):
        fp8_grouped_wgrad_triton(dy, x, [16, 16], out=[torch.zeros(128, 128)] * 2)
