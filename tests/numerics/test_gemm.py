"""The GEMM twins the grouped kernels are tested against: Fp8BlockwiseStack holds exactly the per-expert 128x128
quantization (and its exact block transpose), quantize_weight_stack makes both for all experts of a linear, the
grouped GEMM reads a stack like a list, and fp8_grouped_wgrad is the per-expert product of the scaling-aware
transposes (zero for empty experts), returned or written / accumulated into per-expert buffers."""

import pytest
import torch

from fp8flow_megatron.numerics import Fp8Blockwise, quantize_1x128, quantize_128x128, scaling_aware_transpose
from fp8flow_megatron.numerics.gemm import (
    Fp8BlockwiseStack,
    fp8_gemm_nt,
    fp8_grouped_gemm_nt,
    fp8_grouped_wgrad,
    quantize_weight_stack,
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


# ---- quantize_weight_stack: one call for all experts of one linear == per-expert quantize_128x128 + block transpose


def special_weights(num_experts, n, k, dtype, seed):
    """E [n, k] weights spread over 40 binades, with the awkward blocks placed round-robin over experts and blocks:
    an all-zero block (amax 0), an inf (amax inf), a NaN (scale 1), a block scaled by 1e30, and a block of fp32
    subnormals only (448 / amax overflows fp32: scale 2^127), plus a -0. Shared with the kernel tests."""
    g = torch.Generator().manual_seed(seed)
    weights = [
        torch.randn(n, k, generator=g) * torch.exp2(torch.randint(-20, 21, (n, 1), generator=g).float())
        for _ in range(num_experts)
    ]
    blocks = [(i, j) for i in range(-(-n // 128)) for j in range(-(-k // 128))]
    for i, kind in enumerate(["zero", "inf", "nan", "huge", "subnormal", "negzero"]):
        w = weights[i % num_experts]
        bi, bj = blocks[(i * 7) % len(blocks)]
        block = w[bi * 128 : (bi + 1) * 128, bj * 128 : (bj + 1) * 128]
        r, c = (i * 5) % block.shape[0], (i * 11) % block.shape[1]
        if kind == "zero":
            block.zero_()
        elif kind == "inf":
            block[r, c] = -float("inf") if i % 2 else float("inf")
        elif kind == "nan":
            block[r, c] = float("nan")
        elif kind == "huge":
            block.mul_(1e30)
        elif kind == "subnormal":
            block.copy_(torch.randn(block.shape, generator=g).sign() * 1e-40 * torch.rand(block.shape, generator=g))
        else:
            block[r, c] = -0.0
    return [w.to(dtype) for w in weights]


def assert_stack_is_per_expert(stack, stack_t, weights, what):
    e, (n, k) = len(weights), weights[0].shape
    nbn, nbk = -(-n // 128), -(-k // 128)
    assert stack.data.shape == (e, n, k) and stack.scale_inv.shape == (e, nbn, nbk), what
    assert stack_t.data.shape == (e, k, n) and stack_t.scale_inv.shape == (e, nbk, nbn), what
    for i, w in enumerate(weights):
        q = quantize_128x128(w.detach().cpu())
        t = transpose_128x128(q)
        assert torch.equal(_codes(stack[i].data.cpu()), _codes(q.data)), f"{what}: expert {i} codes"
        assert torch.equal(stack[i].scale_inv.cpu(), q.scale_inv), f"{what}: expert {i} scale_inv"
        assert torch.equal(_codes(stack_t[i].data.cpu()), _codes(t.data)), f"{what}: expert {i} transposed codes"
        assert torch.equal(stack_t[i].scale_inv.cpu(), t.scale_inv), f"{what}: expert {i} transposed scale_inv"


WEIGHT_SHAPES = [(256, 384), (200, 130), (129, 300), (1, 1), (64, 1000)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,k", WEIGHT_SHAPES)
@pytest.mark.parametrize("num_experts", [1, 3])
def test_weight_stack_is_per_expert_quantization(num_experts, n, k, dtype):
    weights = special_weights(num_experts, n, k, dtype, seed=n * 31 + k + num_experts)
    stack, stack_t = quantize_weight_stack(weights)
    assert stack.data.dtype == torch.float8_e4m3fn and stack.data.is_contiguous() and stack_t.data.is_contiguous()
    assert_stack_is_per_expert(stack, stack_t, weights, f"E={num_experts} [{n}, {k}] {dtype}")


@pytest.mark.parametrize("rowwise,columnwise", [(True, False), (False, True)], ids=["rowwise", "columnwise"])
def test_weight_stack_one_usage(rowwise, columnwise):
    # One usage alone: exactly that half of the full result, the other None; out= of that form is written in place;
    # a form that does not match, or no usage at all, is refused with what to pass.
    weights = special_weights(3, 200, 130, torch.float32, seed=2)
    full = quantize_weight_stack(weights)
    got = quantize_weight_stack(weights, rowwise=rowwise, columnwise=columnwise)
    for g, f, wanted in zip(got, full, (rowwise, columnwise)):
        assert (g is not None) == wanted
        if wanted:
            assert torch.equal(_codes(g.data), _codes(f.data)) and torch.equal(g.scale_inv, f.scale_inv)
    new = special_weights(3, 200, 130, torch.float32, seed=9)
    out = quantize_weight_stack(new, out=got, rowwise=rowwise, columnwise=columnwise)
    assert out[0] is got[0] and out[1] is got[1]
    made = out[0] if rowwise else out[1]
    ref = quantize_weight_stack(new)[0 if rowwise else 1]
    assert torch.equal(_codes(made.data), _codes(ref.data)) and torch.equal(made.scale_inv, ref.scale_inv)
    with pytest.raises(ValueError, match="same rowwise= / columnwise="):
        quantize_weight_stack(new, out=got)
    with pytest.raises(ValueError, match="same rowwise= / columnwise="):
        quantize_weight_stack(new, out=full, rowwise=rowwise, columnwise=columnwise)
    with pytest.raises(ValueError, match="at least one usage"):
        quantize_weight_stack(new, rowwise=False, columnwise=False)


def test_weight_stack_special_blocks_are_exercised():
    # The awkward blocks really land where the scale rule has its special cases.
    weights = special_weights(1, 256, 384, torch.float32, seed=0)
    q = quantize_128x128(weights[0])
    assert (q.scale_inv == 1.0).sum() >= 3  # the zero, inf and NaN blocks
    assert (q.scale_inv == 2.0**-127).any()  # the subnormal block: infinite 448 / amax -> 2^127
    assert torch.isnan(q.data.float()).any() and (q.data.float().abs() == 448).any()


def test_weight_stack_reads_scattered_parameters():
    # As megatron keeps them: separate parameters viewing one flat buffer, laid out in reverse expert order.
    e, n, k = 3, 200, 300
    weights = special_weights(e, n, k, torch.bfloat16, seed=5)
    buf = torch.empty(e * n * k + 7, dtype=torch.bfloat16)
    views = []
    for i, w in enumerate(weights):
        start = 7 + (e - 1 - i) * n * k
        view = buf[start : start + n * k].view(n, k)
        view.copy_(w)
        views.append(torch.nn.Parameter(view))
    stack, stack_t = quantize_weight_stack(views)
    assert_stack_is_per_expert(stack, stack_t, weights, "scattered parameters")
    # Fp8BlockwiseStack.quantize (any per-expert implementation) still builds the same stack
    old = Fp8BlockwiseStack.quantize(views, quantize_128x128)
    assert torch.equal(_codes(old.data), _codes(stack.data)) and torch.equal(old.scale_inv, stack.scale_inv)


@pytest.mark.parametrize(
    "weights,error,match",
    [
        ([], ValueError, "no weights"),
        ([torch.zeros(4, 8), torch.zeros(4, 9)], ValueError, r"weights\[1\] has shape \(4, 9\).*must share"),
        ([torch.zeros(4, 8, dtype=torch.float16)], TypeError, "bfloat16 or torch.float32"),
        ([torch.zeros(4, 8), torch.zeros(4, 8, dtype=torch.bfloat16)], TypeError, "one dtype"),
        ([torch.zeros(8)], ValueError, "2-D"),
        ([torch.zeros(4, 0)], ValueError, "K must be >= 1"),
        ([torch.zeros(4, 8), "w"], TypeError, "not a torch.Tensor"),
    ],
    ids=["empty", "shape", "fp16", "mixed-dtype", "1-D", "K=0", "not-a-tensor"],
)
def test_weight_stack_rejects_bad_input(weights, error, match):
    with pytest.raises(error, match=match):
        quantize_weight_stack(weights)


# ---- fp8_grouped_wgrad(out=, accumulate=): straight into per-expert buffers (megatron's main_grad)


def _wgrad_problem(m_splits, n, k, seed):
    g = torch.Generator().manual_seed(seed)
    m = sum(m_splits)
    return quantize_1x128(torch.randn(m, n, generator=g)), quantize_1x128(torch.randn(m, k, generator=g))


def scattered_buffers(values, pad=3):
    """Contiguous [N, K] views of one flat buffer holding `values` in reverse order, `pad` elements apart (megatron's
    grad buffer: per-parameter views at arbitrary, not necessarily 16-byte aligned, offsets)."""
    e, (n, k) = len(values), values[0].shape
    buf = torch.full((e * (n * k + pad) + pad,), float("nan"), dtype=values[0].dtype, device=values[0].device)
    views = []
    for i, v in enumerate(values):
        start = pad + (e - 1 - i) * (n * k + pad)
        views.append(buf[start : start + n * k].view(n, k))
        views[-1].copy_(v)
    return buf, views


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m_splits", [[16, 0, 32], [0, 0], [5, 130, 0]])
def test_grouped_wgrad_accumulates_into_out(m_splits, out_dtype):
    n, k = 256, 200
    dy, x = _wgrad_problem(m_splits, n, k, seed=sum(m_splits) + 1)
    dw = fp8_grouped_wgrad(dy, x, m_splits)  # fp32
    g = torch.Generator().manual_seed(3)
    before = [torch.randn(n, k, generator=g).to(out_dtype) for _ in m_splits]
    for b in before:
        b[0, :4] = torch.tensor([-0.0, 0.0, 1e-3, -1e-3])  # an empty expert keeps even the sign of its zeros
    buf, out = scattered_buffers(before)
    got = fp8_grouped_wgrad(dy, x, m_splits, out_dtype, out=out, accumulate=True)
    assert got is out
    for e, rows in enumerate(m_splits):
        want = (before[e].float() + dw[e]).to(out_dtype) if rows else before[e]
        assert torch.equal(out[e].view(torch.uint8), want.view(torch.uint8)), (e, rows)  # bitwise: -0 is not +0
    # nothing outside the views was written
    inside = torch.zeros_like(buf, dtype=torch.bool)
    for o in out:
        start = o.storage_offset()
        inside[start : start + o.numel()] = True
    assert torch.isnan(buf[~inside]).all()


@pytest.mark.parametrize("m_splits", [[16, 0, 32], [0, 0], [5, 130, 0]])
def test_grouped_wgrad_overwrites_out(m_splits):
    n, k = 128, 384
    dy, x = _wgrad_problem(m_splits, n, k, seed=sum(m_splits) + 2)
    for out_dtype in (torch.float32, torch.bfloat16):
        dw = fp8_grouped_wgrad(dy, x, m_splits, out_dtype)
        _, out = scattered_buffers([torch.full((n, k), 7.0, dtype=out_dtype) for _ in m_splits])
        assert fp8_grouped_wgrad(dy, x, m_splits, out_dtype, out=out) is out
        for e, rows in enumerate(m_splits):
            assert torch.equal(out[e], dw[e]), (out_dtype, e)  # an empty expert's buffer is zeroed, as dw[e]
            if not rows:
                assert float(out[e].abs().sum()) == 0.0


def test_grouped_wgrad_out_matches_returned_gradients():
    # The same numbers whether returned as [E, N, K] or written into separate buffers (accumulating into zeros).
    m_splits = [48, 16, 0, 130]
    dy, x = _wgrad_problem(m_splits, 200, 320, seed=11)
    dw = fp8_grouped_wgrad(dy, x, m_splits)
    _, out = scattered_buffers([torch.zeros(200, 320) for _ in m_splits])
    fp8_grouped_wgrad(dy, x, m_splits, out=out, accumulate=True)
    assert all(torch.equal(o, d) for o, d in zip(out, dw))


def test_grouped_wgrad_rejects_bad_out():
    m_splits = [16, 16]
    dy, x = _wgrad_problem(m_splits, 128, 256, seed=0)
    with pytest.raises(ValueError, match="accumulate=True needs out="):
        fp8_grouped_wgrad(dy, x, m_splits, accumulate=True)
    with pytest.raises(ValueError, match="1 out tensors for 2 experts"):
        fp8_grouped_wgrad(dy, x, m_splits, out=[torch.zeros(128, 256)])
    with pytest.raises(ValueError, match=r"out\[1\] has shape \(256, 128\)"):
        fp8_grouped_wgrad(dy, x, m_splits, out=[torch.zeros(128, 256), torch.zeros(256, 128)])
    with pytest.raises(TypeError, match="out_dtype=out"):
        fp8_grouped_wgrad(dy, x, m_splits, out=[torch.zeros(128, 256, dtype=torch.bfloat16)] * 2)
    with pytest.raises(ValueError, match="contiguous"):
        fp8_grouped_wgrad(dy, x, m_splits, out=[torch.zeros(256, 128).t()] * 2)
