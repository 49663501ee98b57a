"""quantize_weight_stack_triton vs its numerics twin (and TE's 128x128 Float8BlockQuantizer), bit for bit, with each
expert's weight a separate tensor at its own address, as megatron's DDP parameter buffer holds them (contiguous views
of one flat buffer, expert 0 last), at 16-byte aligned and unaligned offsets."""

import pytest
import torch

from fp8flow_megatron.kernels import quantize_weight_stack_triton
from fp8flow_megatron.numerics.gemm import quantize_weight_stack

from ..numerics.test_gemm import WEIGHT_SHAPES, special_weights
from .compare import assert_bitwise_equal

pytestmark = pytest.mark.gpu


def ddp_views(weights, pad):
    """Copies of `weights` as contiguous CUDA views of one flat buffer in reverse expert order. pad=0: every view
    starts 16-byte aligned (the kernel's hinted path); pad>0: `pad` elements before and between views (unaligned)."""
    n, k = weights[0].shape
    align = 16 // weights[0].element_size()
    stride = -(-n * k // align) * align + pad
    buf = torch.zeros(pad + len(weights) * stride, dtype=weights[0].dtype, device="cuda")
    views = []
    for i, w in enumerate(weights):
        start = pad + (len(weights) - 1 - i) * stride
        views.append(buf[start : start + n * k].view(n, k))
        views[-1].copy_(w)
    return buf, views


def assert_codes_equal(got, ref, what):
    """Bitwise, except that a NaN's code is compared as "is NaN": the kernel writes 0x7F for either sign (hardware
    conversion), the twin keeps the sign."""
    g, r = got.detach().cpu().view(torch.uint8), ref.detach().cpu().view(torch.uint8)
    nan = (r & 0x7F) == 0x7F
    assert torch.equal(nan, (g & 0x7F) == 0x7F), f"{what}: NaN codes at different positions"
    assert_bitwise_equal(torch.where(nan, 0, g), torch.where(nan, 0, r), what)


def assert_stacks_equal(got, ref, what):
    (s, s_t), (r, r_t) = got, ref
    assert (s is None) == (r is None) and (s_t is None) == (r_t is None), f"{what}: usages differ from the twin's"
    if s is not None:
        assert s.data.is_contiguous() and s.scale_inv.is_contiguous(), what
        assert_codes_equal(s.data, r.data, f"{what} codes")
        assert_bitwise_equal(s.scale_inv, r.scale_inv, f"{what} scale_inv")
    if s_t is not None:
        assert s_t.data.is_contiguous() and s_t.scale_inv.is_contiguous(), what
        assert_codes_equal(s_t.data, r_t.data, f"{what} transposed codes")
        assert_bitwise_equal(s_t.scale_inv, r_t.scale_inv, f"{what} transposed scale_inv")


@pytest.mark.parametrize("pad", [0, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,k", WEIGHT_SHAPES)
@pytest.mark.parametrize("num_experts", [1, 3])
def test_weight_stack_matches_twin(num_experts, n, k, dtype, pad):
    weights = special_weights(num_experts, n, k, dtype, seed=n * 31 + k + num_experts)
    _, views = ddp_views(weights, pad)
    if pad == 0:
        assert all(v.data_ptr() % 16 == 0 for v in views)
    what = f"E={num_experts} [{n}, {k}] {dtype} pad={pad}"
    assert_stacks_equal(quantize_weight_stack_triton(views), quantize_weight_stack(weights), what)
    # one usage alone (the forward's codes without the transpose; the transpose alone in backward), fresh and out=
    for rowwise, columnwise in ((True, False), (False, True)):
        usage = dict(rowwise=rowwise, columnwise=columnwise)
        got = quantize_weight_stack_triton(views, **usage)
        assert_stacks_equal(got, quantize_weight_stack(weights, **usage), f"{what} {usage}")
        for v, w in zip(views, reversed(weights)):
            v.copy_(w)
        assert quantize_weight_stack_triton(views, out=got, **usage) is got
        assert_stacks_equal(got, quantize_weight_stack(list(reversed(weights)), **usage), f"{what} {usage} out=")
        for v, w in zip(views, weights):
            v.copy_(w)


@pytest.mark.parametrize("n,k", [(2816, 2048), (2048, 1408)])
def test_weight_stack_matches_twin_at_model_shapes(n, k):
    g = torch.Generator().manual_seed(n + k)
    weights = [(torch.randn(n, k, generator=g) * 0.02 * 4.0**e).bfloat16() for e in range(4)]
    _, views = ddp_views(weights, pad=0)
    assert_stacks_equal(quantize_weight_stack_triton(views), quantize_weight_stack(weights), f"4 x [{n}, {k}] bf16")


def test_weight_stack_of_parameters_and_detached_views():
    weights = special_weights(3, 200, 300, torch.bfloat16, seed=1)
    _, views = ddp_views(weights, pad=0)
    ref = quantize_weight_stack(weights)
    params = [torch.nn.Parameter(v) for v in views]
    assert_stacks_equal(quantize_weight_stack_triton(params), ref, "parameters")
    assert_stacks_equal(quantize_weight_stack_triton([p.detach() for p in params]), ref, "detached views")


def test_weight_stack_is_what_the_triton_engine_and_cuda_backend_use():
    from fp8flow_megatron.ops.backend import backend_for
    from fp8flow_megatron.ops.gemm_engine import TritonGroupedGemm

    assert backend_for(torch.device("cuda")).quantize_weight_stack is quantize_weight_stack_triton
    weights = special_weights(3, 256, 384, torch.bfloat16, seed=2)
    _, views = ddp_views(weights, pad=0)
    assert_stacks_equal(TritonGroupedGemm().quantize_weights(views), quantize_weight_stack(weights), "engine")


@pytest.mark.parametrize("n,k", [(256, 384), (200, 130), (2816, 2048)])
def test_weight_stack_matches_te(n, k):
    te = pytest.importorskip("transformer_engine.pytorch")
    import transformer_engine_torch as tex

    quantizer = te.tensor.float8_blockwise_tensor.Float8BlockQuantizer(
        tex.DType.kFloat8E4M3, rowwise=True, columnwise=True, force_pow_2_scales=True, amax_epsilon=0.0,
        block_scaling_dim=2,
    )  # fmt: skip
    g = torch.Generator().manual_seed(n * k)
    weights = [(torch.randn(n, k, generator=g) * 0.02 * 8.0**e).bfloat16().cuda() for e in range(3)]
    stack, stack_t = quantize_weight_stack_triton(weights)
    nbn, nbk = -(-n // 128), -(-k // 128)
    for e, w in enumerate(weights):
        ref = quantizer(w)  # TE pads the inner scale dimension to a multiple of 4
        what = f"TE [{n}, {k}] expert {e}"
        assert_bitwise_equal(stack.data[e].view(torch.uint8), ref._rowwise_data.view(torch.uint8), f"{what} codes")
        assert_bitwise_equal(stack.scale_inv[e], ref._rowwise_scale_inv[:, :nbk], f"{what} scale_inv")
        assert_bitwise_equal(stack_t.data[e].view(torch.uint8), ref._columnwise_data.view(torch.uint8),
                             f"{what} columnwise codes")  # fmt: skip
        assert_bitwise_equal(stack_t.scale_inv[e], ref._columnwise_scale_inv[:, :nbn], f"{what} columnwise scale_inv")


def test_weight_stack_rejects_bad_input():
    with pytest.raises(ValueError, match="not contiguous.*contiguous\\(\\)"):
        quantize_weight_stack_triton([torch.zeros(256, 128, device="cuda").t()])
    with pytest.raises(ValueError, match="numerics"):
        quantize_weight_stack_triton([torch.zeros(128, 128)])
    with pytest.raises(ValueError, match="no weights"):
        quantize_weight_stack_triton([])
    with pytest.raises(TypeError, match="one dtype"):
        quantize_weight_stack_triton([torch.zeros(4, 8, device="cuda"), torch.zeros(4, 8, device="cuda").bfloat16()])
