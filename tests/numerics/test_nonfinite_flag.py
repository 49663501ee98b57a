"""The quantizer twins' `nonfinite_flag`: raised exactly when the quantizer's input holds an inf or NaN (any sign, any
position, partial edge blocks included), never cleared, never raised by finite data however large, and without any
effect on the codes and scales (CPU; the GPU kernels are held to the same cases in tests/kernels/test_nonfinite_flag.py).
"""

import pytest
import torch

from fp8flow_megatron.numerics import quantize_1x128, quantize_128x128
from fp8flow_megatron.numerics.gemm import quantize_weight_stack
from fp8flow_megatron.numerics.swiglu import (
    weighted_swiglu,
    weighted_swiglu_backward,
    weighted_swiglu_quant,
    weighted_swiglu_quant_backward,
)

N, F = 37, 200  # rows not a multiple of anything, F = 128 + 72: partial last blocks in every quantizer

SPECIALS = {"inf": float("inf"), "-inf": float("-inf"), "nan": float("nan")}
FINITE = {
    "normal": None,
    "zeros": 0.0,
    "fp32_max": 3.4028234663852886e38,  # the largest finite: scale 1, saturates, not a non-finite value
    "tiny": 1e-40,  # fp32 subnormal: an infinite 448/amax, clamped to 2^127, still finite data
}


def _quantizer_input(name, seed=0):
    """(call(flag) -> the quantizer's outputs as a flat list of tensors, a tensor the call quantizes: poisoning it
    poisons the quantizer's input)."""
    g = torch.Generator().manual_seed(seed)
    if name == "quantize_1x128":
        x = torch.randn(N, F, generator=g)
        return (lambda flag: _flat(quantize_1x128(x, flag))), x
    if name == "quantize_128x128":
        x = torch.randn(2 * 128 + 5, F, generator=g)
        return (lambda flag: _flat(quantize_128x128(x, flag))), x
    if name == "quantize_weight_stack":
        ws = [torch.randn(130, F, generator=g) * 0.02 for _ in range(3)]
        return (lambda flag: [t for s in quantize_weight_stack(ws, flag) for t in (s.data.view(torch.uint8), s.scale_inv)]), ws[2]
    raise KeyError(name)


def _flat(q):
    return [q.data.view(torch.uint8), q.scale_inv]


def _flag():
    return torch.zeros(1, dtype=torch.int32)


PLAIN = ["quantize_1x128", "quantize_128x128", "quantize_weight_stack"]


@pytest.mark.parametrize("where", ["first", "last", "middle"])
@pytest.mark.parametrize("special", list(SPECIALS))
@pytest.mark.parametrize("name", PLAIN)
def test_plain_quantizers_flag_inf_and_nan(name, special, where):
    call, x = _quantizer_input(name)
    r, c = {"first": (0, 0), "last": (x.shape[0] - 1, x.shape[1] - 1), "middle": (x.shape[0] // 2, 130)}[where]
    x[r, c] = SPECIALS[special]
    flag = _flag()
    call(flag)
    assert int(flag) == 1, (name, special, where)


@pytest.mark.parametrize("value", list(FINITE))
@pytest.mark.parametrize("name", PLAIN)
def test_plain_quantizers_leave_the_flag_down_on_finite_data(name, value):
    call, x = _quantizer_input(name)
    if FINITE[value] is not None:
        x[:, : x.shape[1] // 2] = FINITE[value]
    flag = _flag()
    call(flag)
    assert int(flag) == 0, (name, value)


@pytest.mark.parametrize("name", PLAIN)
def test_the_flag_changes_no_code_or_scale(name):
    call, x = _quantizer_input(name)
    x[3, 7], x[4, 100] = float("nan"), float("inf")
    flag = _flag()
    for a, b in zip(call(None), call(flag)):
        assert torch.equal(a, b)
    assert int(flag) == 1


@pytest.mark.parametrize("name", PLAIN)
def test_a_raised_flag_stays_raised_on_finite_data(name):
    call, _ = _quantizer_input(name)
    flag = torch.ones(1, dtype=torch.int32)  # raised earlier in the step
    call(flag)
    assert int(flag) == 1


def _swiglu_inputs(seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    fc1_out = (torch.randn(N, 2 * F, generator=g) * 2).to(dtype)
    probs = torch.rand(N, generator=g)
    grad = (torch.randn(N, F, generator=g) * 1e-3).to(dtype)
    return fc1_out, probs, grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("special", list(SPECIALS))
@pytest.mark.parametrize("where", ["gate", "linear", "probs"])
def test_swiglu_forward_flags_what_reaches_its_quantizer(where, special, dtype):
    fc1_out, probs, _ = _swiglu_inputs(dtype=dtype)
    if where == "probs":
        probs[5] = SPECIALS[special]
    else:
        fc1_out[5, 3 + (F if where == "linear" else 0)] = SPECIALS[special]
    flag = _flag()
    weighted_swiglu_quant(fc1_out, probs, flag)
    expected = int(not torch.isfinite(weighted_swiglu(fc1_out, probs)).all())
    # silu(-inf) = -inf * sigmoid(-inf) = -inf * 0 = NaN: every special reaches the quantizer as inf or NaN
    assert expected == 1 and int(flag) == expected, (where, special)


def test_swiglu_forward_flags_an_overflow_of_finite_inputs():
    fc1_out, probs, _ = _swiglu_inputs()
    fc1_out[2, 0], fc1_out[2, F] = 3e38, 3e38  # silu(a) * b overflows fp32
    flag = _flag()
    weighted_swiglu_quant(fc1_out, probs, flag)
    assert int(flag) == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("special", list(SPECIALS))
@pytest.mark.parametrize("where", ["grad", "gate", "linear"])
def test_swiglu_backward_flags_what_reaches_its_quantizer(where, special, dtype):
    fc1_out, probs, grad = _swiglu_inputs(seed=1, dtype=dtype)
    if where == "grad":
        grad[4, F - 1] = SPECIALS[special]
    else:
        fc1_out[4, F - 1 + (F if where == "linear" else 0)] = SPECIALS[special]
    flag = _flag()
    weighted_swiglu_quant_backward(grad, fc1_out, probs, flag)
    expected = int(not torch.isfinite(weighted_swiglu_backward(grad, fc1_out, probs)[0]).all())
    assert int(flag) == expected, (where, special)
    if where == "grad" or special == "nan":
        assert expected == 1


@pytest.mark.parametrize("fn", ["forward", "backward"])
def test_swiglu_finite_data_leaves_the_flag_down(fn):
    fc1_out, probs, grad = _swiglu_inputs(seed=2)
    fc1_out[0] = 0.0
    fc1_out[1, :5] = 1e-40
    flag = _flag()
    if fn == "forward":
        weighted_swiglu_quant(fc1_out, probs, flag)
    else:
        weighted_swiglu_quant_backward(grad, fc1_out, probs, flag)
    assert int(flag) == 0


def test_empty_inputs_leave_the_flag_down():
    flag = _flag()
    quantize_1x128(torch.zeros(0, 256), flag)
    quantize_128x128(torch.zeros(0, 256), flag)
    weighted_swiglu_quant(torch.zeros(0, 256), torch.zeros(0), flag)
    assert int(flag) == 0


@pytest.mark.parametrize(
    "flag, error",
    [
        (torch.zeros(1, dtype=torch.int64), TypeError),
        (torch.zeros(2, dtype=torch.int32), TypeError),
        (torch.zeros(1), TypeError),
        (0, TypeError),
        (torch.zeros(1, dtype=torch.int32, device="meta"), ValueError),
    ],
    ids=["int64", "two_elements", "float", "python_int", "other_device"],
)
def test_a_bad_flag_is_refused(flag, error):
    with pytest.raises(error, match="nonfinite_flag"):
        quantize_1x128(torch.ones(2, 128), flag)
