"""The sync-free kernels, their row groups read from device memory (numerics.groups.RowGroups over a worst-case
buffer), on the GPU:

- fp8_varlen_gemm_nt_triton / fp8_varlen_wgrad_triton vs their twins (numerics.gemm.fp8_varlen_*) at several shapes:
  empty experts, 1 row, row counts not multiples of 128 (nor of 16), experts of several 128-row tiles, K and N not
  multiples of 128, tail rows past the last group (0, 1, many) -- which the GEMM must return as exact zeros and the
  wgrad must never read (they are filled with NaN/huge codes here);
- the same kernels bit for bit against the host-split entry points on the groups' rows (same tiles, same sums);
- scaling_aware_transpose_buffers_grouped bit for bit against the host-split transpose, both scale layouts;
- routing_rows_static on CUDA equal to the CPU result;
- none of them synchronizes: after a warm-up (Triton compilation / autotuning), they run under
  torch.cuda.set_sync_debug_mode("error").
Tolerance vs the twins as tests/kernels/test_grouped_gemm.py: 1e-3 relative (fp32 summation order plus Hopper's FP8
accumulation inside a 128-wide block)."""

import pytest
import torch

from fp8flow_megatron.numerics import Fp8Blockwise, quantize_1x128, quantize_128x128
from fp8flow_megatron.numerics.gemm import Fp8BlockwiseStack, fp8_varlen_gemm_nt, fp8_varlen_wgrad
from fp8flow_megatron.numerics.groups import RowGroups, max_padded_rows

pytestmark = pytest.mark.gpu

TOL = 1e-3
TOL_BF16 = TOL + 2.0**-8
# (m_splits, tail rows past the last group)
CASES = [
    ([16, 0, 48, 32], 17),
    ([0, 0, 64, 0], 0),
    ([128, 256, 16, 0], 200),
    ([144, 400, 0, 16], 1),
    ([0, 0, 0, 0], 33),
    ([1040], 0),
    ([5, 0, 37, 130], 3),
    ([1], 0),
    ([0] * 63 + [1], 15),
    ([0, 1, 0, 127, 129, 0], 128),
]


def _rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


def _poison_tail(q: Fp8Blockwise, end: int) -> Fp8Blockwise:
    """Tail rows that would show up in any result that read them: NaN codes with huge scales."""
    data, scale = q.data.clone(), q.scale_inv.clone()
    data.view(torch.uint8)[end:] = 0x7F
    scale[end:] = 2.0**100
    return Fp8Blockwise(data, scale, q.block)


def _problem(m_splits, tail, n, k, seed, align=None):
    g = torch.Generator().manual_seed(seed)
    end = sum(m_splits)
    x = quantize_1x128((torch.randn(end + tail, k, generator=g) * 3).cuda())
    dy = quantize_1x128((torch.randn(end + tail, n, generator=g) * 1e-3).cuda())
    weights = [(torch.randn(n, k, generator=g) * 0.02).cuda() for _ in m_splits]
    if align is None:
        align = 16 if all(m % 16 == 0 for m in m_splits) else 1
    groups = RowGroups.from_counts(torch.tensor(m_splits, device="cuda"), end + tail, align)
    return _poison_tail(x, end), _poison_tail(dy, end), Fp8BlockwiseStack.quantize(weights, quantize_128x128), groups


def _head(q: Fp8Blockwise, end: int) -> Fp8Blockwise:
    return Fp8Blockwise(q.data[:end].contiguous(), q.scale_inv[:end].contiguous(), q.block)


@pytest.mark.parametrize("n,k", [(256, 384), (200, 320), (2816, 2048)])
@pytest.mark.parametrize("m_splits,tail", CASES)
def test_varlen_gemm_matches_twin_and_zeroes_the_tail(m_splits, tail, n, k):
    from fp8flow_megatron.kernels import fp8_grouped_gemm_nt_triton, fp8_varlen_gemm_nt_triton

    if n == 2816 and sum(m_splits) > 300:
        pytest.skip("large shape once")
    x, dy, w, groups = _problem(m_splits, tail, n, k, seed=sum(m_splits) + n + tail)
    end = sum(m_splits)
    for out_dtype in (torch.float32, torch.bfloat16):
        y = fp8_varlen_gemm_nt_triton(x, w, groups, out_dtype)
        assert y.dtype == out_dtype and y.shape == (end + tail, n)
        assert bool((y[end:] == 0).all()), "tail rows must be written as zeros"
        if end:
            y_ref = fp8_varlen_gemm_nt(x, w, groups, out_dtype)
            print(f"varlen gemm {m_splits}+{tail} n={n} k={k} {out_dtype}: rel {_rel(y[:end], y_ref[:end]):.1e}")
            assert _rel(y[:end], y_ref[:end]) < (TOL if out_dtype == torch.float32 else TOL_BF16)
            # same kernel, same tiles as the host-split entry point: bit-identical on the groups' rows
            assert torch.equal(y[:end], fp8_grouped_gemm_nt_triton(_head(x, end), w, m_splits, out_dtype))
    # dgrad form: dy [num_rows, N] against the exact block transposes [K, N]
    dx = fp8_varlen_gemm_nt_triton(dy, w.t(), groups, torch.float32)
    assert bool((dx[end:] == 0).all())
    if end:
        assert _rel(dx[:end], fp8_varlen_gemm_nt(dy, w.t(), groups)[:end]) < TOL


@pytest.mark.parametrize("n,k", [(256, 384), (200, 320)])
@pytest.mark.parametrize("m_splits,tail", CASES)
def test_varlen_wgrad_matches_twin(m_splits, tail, n, k):
    from fp8flow_megatron.kernels import fp8_grouped_wgrad_triton, fp8_varlen_wgrad_triton

    x, dy, _, groups = _problem(m_splits, tail, n, k, seed=7 + sum(m_splits) + tail)
    end = sum(m_splits)
    dw = fp8_varlen_wgrad_triton(dy, x, groups, torch.float32)
    assert dw.shape == (len(m_splits), n, k)
    dw_ref = fp8_varlen_wgrad(dy, x, groups, torch.float32)  # the twin never reads the (poisoned) tail either
    assert torch.equal(dw, fp8_grouped_wgrad_triton(_head(dy, end), _head(x, end), m_splits, torch.float32))
    for e, m in enumerate(m_splits):
        if m == 0:
            assert float(dw[e].abs().sum()) == 0.0
        else:
            print(f"varlen wgrad {m_splits}+{tail} expert {e}: rel {_rel(dw[e], dw_ref[e]):.1e}")
            assert torch.isfinite(dw[e]).all() and _rel(dw[e], dw_ref[e]) < TOL, (e, _rel(dw[e], dw_ref[e]))


@pytest.mark.parametrize("accumulate", [True, False])
@pytest.mark.parametrize("m_splits,tail", CASES[:6])
def test_varlen_wgrad_into_main_grads(m_splits, tail, accumulate):
    from fp8flow_megatron.kernels import fp8_varlen_wgrad_triton

    n, k = 200, 320
    x, dy, _, groups = _problem(m_splits, tail, n, k, seed=11 + sum(m_splits))
    g = torch.Generator().manual_seed(len(m_splits))
    before = [(torch.randn(n, k, generator=g) * 0.05).cuda() for _ in m_splits]
    out = [b.clone() for b in before]
    assert fp8_varlen_wgrad_triton(dy, x, groups, torch.float32, out=out, accumulate=accumulate) is out
    ref = [b.clone() for b in before]
    fp8_varlen_wgrad(dy, x, groups, torch.float32, out=ref, accumulate=accumulate)
    for e, m in enumerate(m_splits):
        if m == 0 and accumulate:
            assert torch.equal(out[e], before[e]), f"expert {e} was touched"
        elif m == 0:
            assert float(out[e].abs().sum()) == 0.0, f"expert {e} not zeroed"
        else:
            assert _rel(out[e], ref[e]) < TOL, (e, _rel(out[e], ref[e]))


@pytest.mark.parametrize("layout", ["compact", "gemm_ready"])
@pytest.mark.parametrize("m_splits,tail", CASES)
def test_grouped_transpose_equals_host_split_transpose(m_splits, tail, layout):
    from fp8flow_megatron.kernels.transpose import (
        scaling_aware_transpose_buffers,
        scaling_aware_transpose_buffers_grouped,
    )

    k = 320
    x, _, _, groups = _problem(m_splits, tail, 128, k, seed=3 + tail)
    end = sum(m_splits)
    codes, scales, row_len = scaling_aware_transpose_buffers_grouped(x, groups, layout)
    ref_codes, ref_scales, _, blocks, ref_row_len = scaling_aware_transpose_buffers(_head(x, end), m_splits, layout)
    assert row_len == ref_row_len
    # every group's codes and scales sit where the host-split transpose puts them; nothing past them is compared
    assert torch.equal(codes[: end * k], ref_codes)
    assert torch.equal(scales[: sum(blocks) * row_len], ref_scales)


def test_routing_rows_static_on_cuda_equals_cpu():
    from fp8flow_megatron.numerics.permute import routing_rows_static

    g = torch.Generator().manual_seed(0)
    t, e, topk, align = 300, 64, 6, 16
    logits = torch.randn(t, e, generator=g)
    logits[:, 50:] -= 100.0  # experts 50.. stay empty
    rm = torch.zeros(t, e, dtype=torch.bool).scatter(1, logits.topk(topk, dim=1).indices, True)
    num_rows = max_padded_rows(t * topk, e, align)
    ref = routing_rows_static(rm, align, num_rows)
    got = routing_rows_static(rm.cuda(), align, num_rows)
    for a, b in zip(got, ref):
        assert torch.equal(a.cpu(), b)


def test_varlen_kernels_do_not_synchronize():
    from fp8flow_megatron.kernels import fp8_varlen_gemm_nt_triton, fp8_varlen_wgrad_triton
    from fp8flow_megatron.numerics.permute import routing_rows_static

    t, e, topk, align = 512, 64, 6, 16
    rm = torch.zeros(t, e, dtype=torch.bool, device="cuda").scatter(1, torch.randn(t, e, device="cuda").topk(topk, 1).indices, True)
    num_rows = max_padded_rows(t * topk, e, align)
    n, k = 256, 384
    x = quantize_1x128(torch.randn(num_rows, k, device="cuda"))
    dy = quantize_1x128(torch.randn(num_rows, n, device="cuda"))
    w = Fp8BlockwiseStack.quantize([torch.randn(n, k, device="cuda") * 0.02 for _ in range(e)], quantize_128x128)
    main_grads = [torch.zeros(n, k, device="cuda") for _ in range(e)]

    def step():
        _, _, _, padded = routing_rows_static(rm, align, num_rows)
        groups = RowGroups.from_counts(padded, num_rows, align)
        fp8_varlen_gemm_nt_triton(x, w, groups, torch.bfloat16)
        fp8_varlen_gemm_nt_triton(dy, w.t(), groups, torch.bfloat16)
        fp8_varlen_wgrad_triton(dy, x, groups, torch.float32)
        fp8_varlen_wgrad_triton(dy, x, groups, torch.float32, out=main_grads, accumulate=True)

    step()  # compilation, autotuning, the cached main_grad address table
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
