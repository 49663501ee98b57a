"""The GEMM twins the grouped kernels are tested against: Fp8BlockwiseStack holds exactly the per-expert 128x128
quantization (and its exact block transpose), the grouped GEMM reads a stack like a list, and fp8_grouped_wgrad is
the per-expert product of the scaling-aware transposes (zero for empty experts)."""

import pytest
import torch

from fp8flow_megatron.numerics import Fp8Blockwise, quantize_1x128, quantize_128x128, scaling_aware_transpose
from fp8flow_megatron.numerics.gemm import (
    Fp8BlockwiseStack,
    fp8_gemm_nt,
    fp8_grouped_gemm_nt,
    fp8_grouped_wgrad,
    transpose_128x128,
)


def _codes(t):
    return t.view(torch.uint8)


@pytest.mark.parametrize("n,k", [(256, 384), (200, 130)])
def test_stack_is_per_expert_quantization(n, k):
    g = torch.Generator().manual_seed(n)
    weights = [torch.randn(n, k, generator=g) * (10.0**e) for e in (-3, 0, 2)]
    stack = Fp8BlockwiseStack.quantize(weights, quantize_128x128)
    assert len(stack) == 3 and stack.data.shape == (3, n, k)
    stack_t = stack.t()
    for i, w in enumerate(weights):
        q = quantize_128x128(w)
        assert torch.equal(_codes(stack[i].data), _codes(q.data)) and torch.equal(stack[i].scale_inv, q.scale_inv)
        t = transpose_128x128(q)
        assert torch.equal(_codes(stack_t[i].data), _codes(t.data)) and torch.equal(stack_t[i].scale_inv, t.scale_inv)


def test_grouped_gemm_reads_a_stack_like_a_list():
    g = torch.Generator().manual_seed(1)
    weights = [torch.randn(128, 256, generator=g) for _ in range(3)]
    stack = Fp8BlockwiseStack.quantize(weights, quantize_128x128)
    x = quantize_1x128(torch.randn(48, 256, generator=g))
    m_splits = [16, 0, 32]
    assert torch.equal(fp8_grouped_gemm_nt(x, stack, m_splits), fp8_grouped_gemm_nt(x, list(stack), m_splits))


def test_stack_rejects_bad_shapes():
    with pytest.raises(ValueError, match="Fp8BlockwiseStack"):
        Fp8BlockwiseStack(torch.zeros(4, 4), torch.zeros(1, 1, 1))


@pytest.mark.parametrize("m_splits", [[16, 0, 32], [0, 0], [5, 130]])
def test_grouped_wgrad_is_per_expert_transposed_product(m_splits):
    g = torch.Generator().manual_seed(sum(m_splits))
    m = sum(m_splits)
    dy = quantize_1x128(torch.randn(m, 256, generator=g))
    x = quantize_1x128(torch.randn(m, 384, generator=g))
    dw = fp8_grouped_wgrad(dy, x, m_splits)
    assert dw.shape == (len(m_splits), 256, 384)
    start = 0
    for e, rows in enumerate(m_splits):
        if rows == 0:
            assert float(dw[e].abs().sum()) == 0.0
        else:
            part = slice(start, start + rows)
            g_t = scaling_aware_transpose(Fp8Blockwise(dy.data[part], dy.scale_inv[part], dy.block))
            x_t = scaling_aware_transpose(Fp8Blockwise(x.data[part], x.scale_inv[part], x.block))
            assert torch.equal(dw[e], fp8_gemm_nt(g_t, x_t))
            assert float(dw[e].abs().sum()) > 0
        start += rows
