"""ops.dispatch's all-to-all of row-aligned tensors: the bulk (FP8 codes, a token gradient) goes alone and the small
rest (fp32 scales, probs, prob gradients) is packed into one buffer of 4-byte words (bytes when a row is not a multiple
of 4 bytes); everything comes back apart, bit for bit. The exchange across real ranks is covered end to end by
tests/megatron/test_moe_layer_ep.py (EP=4/8 bit-identical to EP=1); here a one-rank group, where megatron's
all_to_all returns its input, isolates the packing."""

import pytest
import torch

from fp8flow_megatron.numerics import dequantize, quantize_1x128
from fp8flow_megatron.ops import dispatch
from fp8flow_megatron.ops.fp8_tensor import Fp8FlowTensor


class _OneRankGroup:
    def size(self):
        return 1


@pytest.mark.parametrize("odd_width", [False, True])
@pytest.mark.parametrize("rows", [0, 1, 37])
def test_packed_rows_round_trip_bitwise(rows, odd_width):
    g = torch.Generator().manual_seed(rows)
    codes = torch.randint(0, 256, (rows, 256), dtype=torch.uint8, generator=g)
    scales = torch.rand(rows, 2, generator=g)
    probs = torch.rand(rows, 1, generator=g)
    grad = torch.randn(rows, 256, generator=g).bfloat16()
    parts = [codes, scales, probs, grad]
    if odd_width:  # a 2-byte row: the packed buffer falls back to bytes
        parts.append(torch.randn(rows, 1, generator=g).bfloat16())
    out = dispatch._all_to_all_rows(parts, _OneRankGroup(), [rows], [rows])
    for got, ref in zip(out, parts):
        assert got.dtype == ref.dtype and got.shape == ref.shape
        assert torch.equal(got.view(torch.uint8), ref.view(torch.uint8))


def test_tokens_probs_all_to_all_forward_and_backward_keep_fp8_and_grads():
    x = torch.randn(6, 256)
    fp8 = Fp8FlowTensor(quantize_1x128(x), torch.bfloat16)
    probs = torch.rand(6, requires_grad=True)
    tokens, probs_out = dispatch.all_to_all_tokens_probs(fp8, probs, _OneRankGroup(), [6], [6])
    assert isinstance(tokens, Fp8FlowTensor)
    assert torch.equal(tokens.fp8.data.view(torch.uint8), fp8.fp8.data.view(torch.uint8))
    assert torch.equal(tokens.fp8.scale_inv, fp8.fp8.scale_inv)
    assert torch.equal(probs_out, probs)
    (probs_out * torch.arange(6.0)).sum().backward()
    assert torch.equal(probs.grad, torch.arange(6.0))


def test_tokens_probs_all_to_all_backward_with_one_output_unused():
    x = torch.randn(5, 256, requires_grad=True)
    probs = torch.rand(5, requires_grad=True)
    tokens, _ = dispatch.all_to_all_tokens_probs(x, probs, _OneRankGroup(), [5], [5])
    (tokens * 2).sum().backward()
    assert torch.equal(x.grad, torch.full_like(x, 2.0))
    assert torch.equal(probs.grad, torch.zeros_like(probs))  # the missing prob gradient moved back as zeros


@pytest.mark.parametrize("op", [lambda t: torch.mul(t, 2), lambda t: t.sum(), lambda t: t.float(), lambda t: torch.cat([t, t])],
                         ids=["mul", "sum", "to_float", "cat"])
def test_an_aten_op_on_an_fp8_payload_is_an_error_naming_it(op):
    fp8 = Fp8FlowTensor(quantize_1x128(torch.randn(4, 128)), torch.bfloat16)
    with pytest.raises(TypeError, match=r"fp8flow: aten\..* was called on an FP8 payload .*\.dequantize\(\)"):
        op(fp8)
    assert torch.equal(fp8.dequantize(), dequantize(fp8.fp8).to(torch.bfloat16))  # the explicit conversion
    assert isinstance(fp8.detach(), Fp8FlowTensor)  # autograd's own aliasing keeps the payload
