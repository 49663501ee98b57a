"""Fp8FlowTensor: an FP8 payload that autograd sees as a high-precision tensor of the same shape.

The casting-free dataflow passes FP8 codes + scales between autograd Functions (dispatcher stages, experts), while the
gradients flowing back are ordinary BF16 tensors of the logical shape -- or Fp8FlowTensors themselves on the
combine-gradient path. A wrapper subclass gives autograd the logical shape/dtype/device it checks, and keeps the
codes and scales in `.fp8`. Only our own Functions read the payload; any other aten op on it is an error naming the
op (no silent dequantize: that would be an extra cast, and a sign that something outside the FP8-Flow dataflow took
the dispatcher's output for a plain tensor). `.dequantize()` is the explicit conversion.
"""

from __future__ import annotations

import torch
from torch.utils._pytree import tree_leaves

from ..numerics import Fp8Blockwise, dequantize

_aten = torch.ops.aten


class Fp8FlowTensor(torch.Tensor):
    """Logical [M, K] tensor of dtype `dtype` whose value is dequantize(fp8); the payload is `self.fp8`."""

    fp8: Fp8Blockwise

    @staticmethod
    def __new__(cls, fp8: Fp8Blockwise, dtype: torch.dtype):
        t = torch.Tensor._make_wrapper_subclass(
            cls, fp8.data.shape, dtype=dtype, device=fp8.data.device, requires_grad=False
        )
        t.fp8 = fp8
        return t

    def __repr__(self) -> str:  # never dequantize just to print
        return f"Fp8FlowTensor(shape={tuple(self.shape)}, dtype={self.dtype}, block={self.fp8.block})"

    def dequantize(self) -> torch.Tensor:
        return dequantize(self.fp8).to(self.dtype)

    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (_aten.detach.default, _aten.alias.default):
            src = args[0]
            return Fp8FlowTensor(src.fp8, src.dtype)
        payload = next(a for a in tree_leaves((args, kwargs)) if isinstance(a, Fp8FlowTensor))
        raise TypeError(
            f"fp8flow: {func} was called on an FP8 payload ({payload!r}). Only FP8-Flow's own autograd Functions read "
            f"these (dispatcher -> experts -> combine); something else (a hook, a custom layer or a patch) used one as a "
            f"plain tensor. Fix: call .dequantize() on it explicitly where a high-precision tensor is meant (an extra "
            f"cast), or run without --moe-fp8-flow to check that the code works on the stock layer."
        )


def as_fp8(t: torch.Tensor):
    """The payload if t is an Fp8FlowTensor, else None."""
    return t.fp8 if isinstance(t, Fp8FlowTensor) else None
