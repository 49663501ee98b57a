"""Weighted SwiGLU fused with 1x128 quantization, forward and backward (pure torch spec).

fc1 output [N, 2F] holds the gate in its first F columns and the linear half in the last F (megatron's layout for
TEGroupedMLP's fc1 weight). Routing probabilities are multiplied in after the activation (megatron's
weighted_bias_swiglu), and their gradient is returned. Everything is computed in fp32 from the bf16 inputs; only the
result is rounded, straight to FP8 (no BF16 intermediate). The fp32 formulas (the order matters for kernel twins):
    s = sigmoid(a), silu = a * s, h = silu * b * p
    backward, with g the incoming gradient: gp = g * p, da = gp * b * (s + silu * (1 - s)), db = gp * silu,
    dp = sum_f(g * silu * b)
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from .format import Fp8Blockwise
from .quantize import quantize_1x128


def _split(fc1_out: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    if fc1_out.dim() != 2 or fc1_out.shape[1] % 2:
        raise ValueError(f"fc1_out must be [N, 2F], got shape {tuple(fc1_out.shape)}")
    f = fc1_out.shape[1] // 2
    x = fc1_out.to(torch.float32)
    return x[:, :f], x[:, f:]


def weighted_swiglu(fc1_out: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """fp32 [N, F]: silu(a) * b * p (no quantization; the high-precision reference of the fused op)."""
    a, b = _split(fc1_out)
    return a * torch.sigmoid(a) * b * probs.to(torch.float32).unsqueeze(1)


def weighted_swiglu_quant(
    fc1_out: torch.Tensor, probs: torch.Tensor, nonfinite_flag: Optional[torch.Tensor] = None
) -> Fp8Blockwise:
    """fc1_out [N, 2F] bf16/fp32, probs [N] fp32 -> FP8 (1x128) [N, F], the fc2 input.
    nonfinite_flag: None, or a 1-element int32 tensor set to 1 when the quantizer's fp32 input (silu(a) * b * p) holds
    an inf or NaN, whether it came in with fc1_out or arose in the product."""
    return quantize_1x128(weighted_swiglu(fc1_out, probs), nonfinite_flag)


def weighted_swiglu_backward(
    grad_out: torch.Tensor, fc1_out: torch.Tensor, probs: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor]:
    """grad_out [N, F] (fc2 dgrad, bf16/fp32), fc1_out [N, 2F], probs [N] ->
    (grad_fc1_out fp32 [N, 2F] before quantization, grad_probs [N] fp32)."""
    a, b = _split(fc1_out)
    g = grad_out.to(torch.float32)
    p = probs.to(torch.float32).unsqueeze(1)
    s = torch.sigmoid(a)
    silu = a * s
    gp = g * p
    da = gp * b * (s + silu * (1 - s))
    db = gp * silu
    dp = (g * silu * b).sum(dim=1)
    return torch.cat([da, db], dim=1), dp


def weighted_swiglu_quant_backward(
    grad_out: torch.Tensor, fc1_out: torch.Tensor, probs: torch.Tensor, nonfinite_flag: Optional[torch.Tensor] = None
) -> Tuple[Fp8Blockwise, torch.Tensor]:
    """grad_out [N, F] (fc2 dgrad, bf16/fp32), fc1_out [N, 2F], probs [N] ->
    (grad_fc1_out FP8 1x128 [N, 2F] for the fc1 dgrad/wgrad GEMMs, grad_probs [N] fp32).
    nonfinite_flag: None, or a 1-element int32 tensor set to 1 when [da | db] (the quantizer's input) holds an inf or
    NaN. grad_probs is not quantized and not checked here (it stays fp32 and reaches the router's own gradient)."""
    grad_fc1_out, dp = weighted_swiglu_backward(grad_out, fc1_out, probs)
    return quantize_1x128(grad_fc1_out, nonfinite_flag), dp
