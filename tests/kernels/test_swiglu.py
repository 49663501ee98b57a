"""weighted_swiglu_quant(_backward)_triton vs their numerics twins: codes within one E4M3 step, scales exact on
well-conditioned data, grad_probs to fp32 summation-order accuracy. The fraction of codes that differ is printed."""

import pytest
import torch

from fp8flow_megatron.kernels import weighted_swiglu_quant_backward_triton, weighted_swiglu_quant_triton
from fp8flow_megatron.numerics.swiglu import weighted_swiglu_quant, weighted_swiglu_quant_backward

from .compare import assert_bitwise_equal, e4m3_step_mismatch

pytestmark = pytest.mark.gpu

# Code mismatch fraction allowed: CUDA's expf vs libdevice's may differ in the last bit, moving a rounding boundary.
MAX_MISMATCH = 1e-3


def _inputs(n, f, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    fc1_out = (torch.randn(n, 2 * f, generator=g) * 2).to(dtype)
    probs = torch.rand(n, generator=g)
    grad = (torch.randn(n, f, generator=g) * 1e-3).to(dtype)
    return fc1_out, probs, grad


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("f", [128, 200, 1408])
@pytest.mark.parametrize("n", [0, 1, 129, 1000])
def test_swiglu_forward(n, f, dtype):
    fc1_out, probs, _ = _inputs(n, f, dtype, seed=n + f)
    got = weighted_swiglu_quant_triton(fc1_out.cuda(), probs.cuda())
    ref = weighted_swiglu_quant(fc1_out.cuda(), probs.cuda())  # the twin on the GPU: torch's CUDA sigmoid
    case = f"swiglu fwd N={n} F={f} {dtype}"
    frac = e4m3_step_mismatch(got.data, ref.data, case)
    assert_bitwise_equal(got.scale_inv, ref.scale_inv, case + " scale_inv")
    print(f"{case}: code mismatch fraction {frac:.2e}")
    assert frac <= MAX_MISMATCH, f"{case}: {frac:.2e} of codes differ by one step"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("f", [128, 200, 1408])
@pytest.mark.parametrize("n", [0, 1, 129, 1000])
def test_swiglu_backward(n, f, dtype):
    fc1_out, probs, grad = _inputs(n, f, dtype, seed=n + f + 1)
    got, got_dp = weighted_swiglu_quant_backward_triton(grad.cuda(), fc1_out.cuda(), probs.cuda())
    ref, ref_dp = weighted_swiglu_quant_backward(grad.cuda(), fc1_out.cuda(), probs.cuda())
    case = f"swiglu bwd N={n} F={f} {dtype}"
    frac = e4m3_step_mismatch(got.data, ref.data, case)
    assert_bitwise_equal(got.scale_inv, ref.scale_inv, case + " scale_inv")
    print(f"{case}: code mismatch fraction {frac:.2e}")
    assert frac <= MAX_MISMATCH, f"{case}: {frac:.2e} of codes differ by one step"
    # grad_probs: a different fp32 summation order; bound by the sum of |terms|.
    a, b = fc1_out.float().cuda().chunk(2, dim=1)
    bound = (grad.float().cuda() * torch.nn.functional.silu(a) * b).abs().sum(dim=1) * 1e-5 + 1e-30
    err = (got_dp - ref_dp).abs()
    assert bool((err <= bound).all()), f"{case}: grad_probs error {float(err.max()):.3e}"


def test_swiglu_rejects_bad_shapes():
    x = torch.zeros(4, 7, device="cuda")
    with pytest.raises(ValueError, match=r"\[N, 2F\]"):
        weighted_swiglu_quant_triton(x, torch.zeros(4, device="cuda"))
    with pytest.raises(ValueError, match="grad_out"):
        weighted_swiglu_quant_backward_triton(torch.zeros(4, 3, device="cuda"), torch.zeros(4, 8, device="cuda"),
                                              torch.zeros(4, device="cuda"))  # fmt: skip
