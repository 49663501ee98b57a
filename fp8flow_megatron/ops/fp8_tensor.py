"""Fp8FlowTensor: an FP8 payload that autograd sees as a high-precision tensor of the same shape.

The casting-free dataflow passes FP8 codes + scales between autograd Functions (dispatcher stages, experts), while the
gradients flowing back are ordinary BF16 tensors of the logical shape -- or Fp8FlowTensors themselves on the
combine-gradient path. A wrapper subclass gives autograd the logical shape/dtype/device it checks, and keeps the
codes and scales in `.fp8`. Only our own Functions read the payload; any other aten op on it falls back to the
dequantized tensor (correct, but it is a cast, so it is logged once).
"""

from __future__ import annotations

import logging

import torch
from torch.utils._pytree import tree_map

from ..numerics import Fp8Blockwise, dequantize

log = logging.getLogger(__name__)
_aten = torch.ops.aten
_warned_ops = set()


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
        if func not in _warned_ops:
            _warned_ops.add(func)
            log.warning("fp8flow: %s on an FP8 payload falls back to dequantize (an extra cast)", func)

        def unwrap(t):
            return t.dequantize() if isinstance(t, Fp8FlowTensor) else t

        return func(*tree_map(unwrap, args), **tree_map(unwrap, kwargs))


def as_fp8(t: torch.Tensor):
    """The payload if t is an Fp8FlowTensor, else None."""
    return t.fp8 if isinstance(t, Fp8FlowTensor) else None
