"""The Triton quantizers' `nonfinite_flag` vs their numerics twins: raised exactly when the twin raises it (inf, -inf,
NaN at the first / a middle / the last element, in partial edge blocks, in many programs at once; never for finite data
however large), only in the slot given (a view into a larger buffer, as ops/nonfinite.py hands out), and the codes and
scales with the flag passed are bit-identical to the flag-less launch (HAS_FLAG changes nothing else) and to the twin
where the twin is exact."""

import pytest
import torch

from fp8flow_megatron.kernels import (
    quantize_1x128_triton,
    quantize_weight_stack_triton,
    weighted_swiglu_quant_backward_triton,
    weighted_swiglu_quant_triton,
)
from fp8flow_megatron.numerics import quantize_1x128
from fp8flow_megatron.numerics.gemm import quantize_weight_stack
from fp8flow_megatron.numerics.swiglu import weighted_swiglu_quant, weighted_swiglu_quant_backward

from .compare import assert_bitwise_equal
from .test_weight_quant import assert_codes_equal, ddp_views

pytestmark = pytest.mark.gpu

SPECIALS = {"inf": float("inf"), "-inf": float("-inf"), "nan": float("nan")}
# "large": 3e38, finite in fp32 and bf16 (fp32's max would round to inf in bf16)
CASES = ["finite", "zeros", "large", "tiny", *SPECIALS, "many"]


def _poison(x, case, seed=0):
    """x (CPU, modified in place) made into one of CASES."""
    m, k = x.shape
    if case == "zeros":
        x.zero_()
    elif case == "large":
        x[:, : k // 2] = 3.0e38
    elif case == "tiny":
        x[:, :] = 1e-40
    elif case in SPECIALS:
        for r, c in ((0, 0), (m // 2, min(130, k - 1)), (m - 1, k - 1)):
            x[r, c] = SPECIALS[case]
    elif case == "many":  # one non-finite value in many blocks at once: many programs race on the flag
        g = torch.Generator().manual_seed(seed)
        idx = torch.randint(0, m * k, (max(1, m * k // 500),), generator=g)
        x.view(-1)[idx] = torch.tensor([float("nan"), float("inf"), float("-inf")]).repeat(len(idx))[: len(idx)]
    return x


def _slot():
    """A flag as the guard hands it out: one int32 of a larger zeroed buffer (not at offset 0)."""
    buf = torch.zeros(8, dtype=torch.int32, device="cuda")
    return buf, buf[5:6]


def _assert_flag(buf, expected, what):
    got = buf.cpu()
    assert int(got[5]) == expected, f"{what}: kernel flag {int(got[5])}, twin {expected}"
    assert int(got.sum()) == int(got[5]), f"{what}: a slot other than the one given was written: {got.tolist()}"


def _twin_flag(fn, *args):
    flag = torch.zeros(1, dtype=torch.int32)
    fn(*args, flag)
    return int(flag)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("m,k", [(1, 128), (37, 300), (513, 2048)])
def test_quantize_1x128_flag(m, k, case, dtype):
    x = _poison(torch.randn(m, k, generator=torch.Generator().manual_seed(m + k)), case).to(dtype)
    expected = _twin_flag(quantize_1x128, x)
    assert expected == int(case in SPECIALS or case == "many")
    buf, flag = _slot()
    got = quantize_1x128_triton(x.cuda(), flag)
    _assert_flag(buf, expected, f"quantize_1x128 [{m}, {k}] {case} {dtype}")
    plain = quantize_1x128_triton(x.cuda())
    assert_bitwise_equal(got.data.view(torch.uint8), plain.data.view(torch.uint8), "codes with vs without flag")
    assert_bitwise_equal(got.scale_inv, plain.scale_inv, "scale_inv with vs without flag")
    ref = quantize_1x128(x)
    assert_codes_equal(got.data, ref.data, "codes vs twin")  # NaN's sign: see test_quantize_nan_block
    assert_bitwise_equal(got.scale_inv, ref.scale_inv, "scale_inv vs twin")


def _swiglu_inputs(n, f, case, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    fc1_out = _poison(torch.randn(n, 2 * f, generator=g) * 2, case, seed)
    if case in ("large", "tiny"):  # keep the SwiGLU product finite: only the gate half takes the extreme value
        fc1_out[:, f:] = torch.randn(n, f, generator=g).clamp(-1e-30, 1e-30) if case == "large" else 1.0
    probs = torch.rand(n, generator=g)
    grad = _poison(torch.randn(n, f, generator=g) * 1e-3, "finite" if case in ("large", "tiny") else case, seed + 1)
    return fc1_out.to(dtype), probs, grad.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("n,f", [(1, 128), (37, 200), (300, 1408)])
def test_swiglu_forward_flag(n, f, case, dtype):
    fc1_out, probs, _ = _swiglu_inputs(n, f, case, dtype, seed=n + f)
    expected = _twin_flag(weighted_swiglu_quant, fc1_out, probs)
    buf, flag = _slot()
    got = weighted_swiglu_quant_triton(fc1_out.cuda(), probs.cuda(), flag)
    _assert_flag(buf, expected, f"swiglu fwd N={n} F={f} {case} {dtype}")
    plain = weighted_swiglu_quant_triton(fc1_out.cuda(), probs.cuda())
    assert_bitwise_equal(got.data.view(torch.uint8), plain.data.view(torch.uint8), "codes with vs without flag")
    assert_bitwise_equal(got.scale_inv, plain.scale_inv, "scale_inv with vs without flag")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("n,f", [(1, 128), (37, 200), (300, 1408), (17, 256)])  # F_ALIGNED and not
def test_swiglu_backward_flag(n, f, case, dtype):
    fc1_out, probs, grad = _swiglu_inputs(n, f, case, dtype, seed=n + f + 1)
    expected = _twin_flag(weighted_swiglu_quant_backward, grad, fc1_out, probs)
    buf, flag = _slot()
    got, got_dp = weighted_swiglu_quant_backward_triton(grad.cuda(), fc1_out.cuda(), probs.cuda(), flag)
    _assert_flag(buf, expected, f"swiglu bwd N={n} F={f} {case} {dtype}")
    plain, plain_dp = weighted_swiglu_quant_backward_triton(grad.cuda(), fc1_out.cuda(), probs.cuda())
    assert_bitwise_equal(got.data.view(torch.uint8), plain.data.view(torch.uint8), "codes with vs without flag")
    assert_bitwise_equal(got.scale_inv, plain.scale_inv, "scale_inv with vs without flag")
    assert_bitwise_equal(got_dp, plain_dp, "grad_probs with vs without flag")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("n,k", [(128, 128), (200, 300)])
def test_weight_stack_flag(n, k, case, dtype):
    g = torch.Generator().manual_seed(n * k)
    weights = [(torch.randn(n, k, generator=g) * 0.02) for _ in range(3)]
    _poison(weights[1], case, seed=n)  # one expert of three
    weights = [w.to(dtype) for w in weights]
    expected = _twin_flag(quantize_weight_stack, weights)
    _, views = ddp_views(weights, pad=0)
    buf, flag = _slot()
    got = quantize_weight_stack_triton(views, flag)
    _assert_flag(buf, expected, f"weight stack [{n}, {k}] {case} {dtype}")
    plain = quantize_weight_stack_triton(views)
    ref = quantize_weight_stack(weights)
    for (s, s_t), other in ((got, "twin"), (got, "flag-less kernel")):
        r, r_t = ref if other == "twin" else plain
        assert_codes_equal(s.data, r.data, f"codes vs {other}")
        assert_bitwise_equal(s.scale_inv, r.scale_inv, f"scale_inv vs {other}")
        assert_codes_equal(s_t.data, r_t.data, f"transposed codes vs {other}")

