"""CPU-only checks (no GPU marker): the kernels package imports without CUDA or Triton, and every kernel refuses CPU
tensors with a message that points at the numerics twin."""

import pytest
import torch

import fp8flow_megatron.kernels as kernels
from fp8flow_megatron.numerics import quantize_1x128


def test_public_names():
    assert all(not name.startswith("_") for name in kernels.__all__)
    assert all(callable(getattr(kernels, name)) for name in kernels.__all__)


@pytest.mark.parametrize(
    "call",
    [
        lambda: kernels.quantize_1x128_triton(torch.zeros(2, 128)),
        lambda: kernels.scaling_aware_transpose_cuda(quantize_1x128(torch.zeros(2, 128))),
        lambda: kernels.permute_pad_rows_triton(quantize_1x128(torch.zeros(2, 128)), torch.tensor([1, -1])),
        lambda: kernels.unpermute_unpad_rows_triton(torch.zeros(2, 8), torch.tensor([[0], [1]])),
        lambda: kernels.weighted_swiglu_quant_triton(torch.zeros(2, 256), torch.zeros(2)),
        lambda: kernels.weighted_swiglu_quant_backward_triton(torch.zeros(2, 128), torch.zeros(2, 256), torch.zeros(2)),
    ],
    ids=["quantize", "transpose", "permute", "unpermute", "swiglu_fwd", "swiglu_bwd"],
)
def test_cpu_tensors_are_refused(call):
    with pytest.raises(ValueError, match="numerics"):
        call()
