"""The FP8-Flow expert MLP as one autograd Function: fc1 -> weighted SwiGLU + quant -> fc2, with FP8 dgrad/wgrad.

Forward   x_fp8 (1x128) @ W1 (128x128) -> y1 bf16 [N, 2F] -> weighted SwiGLU + 1x128 quant (fused) -> a_fp8 [N, F]
          a_fp8 @ W2 -> y2 [N, H] (bf16)
Backward  dY2 arrives FP8 (the combine gradient, quantized once upstream)
          fc2 dgrad: dY2 @ W2^T -> dA [N, F];   fc2 wgrad: T(dY2) . T(a_fp8) per expert
          dSwiGLU + quant (fused) -> dY1 fp8 [N, 2F] and d probs
          fc1 dgrad: dY1 @ W1^T -> dX [N, H];   fc1 wgrad: T(dY1) . T(x_fp8) per expert
T(.) is the scaling-aware transpose (row-wise FP8 -> column-wise FP8 from the codes), never a BF16 copy. Weights are
quantized 128x128 once per optimizer step (cached while the parameter is unchanged); W^T is the exact 128x128
block transpose. Expert-level recompute keeps only x_fp8 (needed for wgrad anyway) and re-runs fc1 -> SwiGLU+quant.
"""

from __future__ import annotations

from typing import Sequence, Tuple

import torch

from ..numerics import Fp8Blockwise
from .backend import backend_for
from .fp8_tensor import Fp8FlowTensor
from .gemm_engine import gemm_engine_for
from .telemetry import monitor


class WeightQuantCache:
    """128x128 FP8 copies of expert weights (in the GEMM engine's form: both usages), requantized only when a weight
    changes.

    A parameter's version counter moves on every in-place update (optimizer step, checkpoint load), so the cache
    follows TE's is_first_microbatch semantics without being told: micro-batches within a step reuse the codes.
    """

    def __init__(self) -> None:
        self._entries = {}

    def get_group(self, weights, engine):
        """All experts' weights of one linear in the engine's form (a list, or one stacked buffer), requantized when
        any of them changed."""
        key = (tuple(id(w) for w in weights), engine.name)
        stamp = tuple((w._version, w.data_ptr(), tuple(w.shape)) for w in weights)
        hit = self._entries.get(key)
        if hit is not None and hit[0] == stamp:
            return hit[1]
        with torch.no_grad():
            w_q = engine.quantize_weights(weights)
        self._entries[key] = (stamp, w_q)
        return w_q


def _pack(q: Fp8Blockwise) -> Tuple[torch.Tensor, torch.Tensor]:
    return q.data, q.scale_inv


def _unpack(data: torch.Tensor, scale_inv: torch.Tensor) -> Fp8Blockwise:
    return Fp8Blockwise(data, scale_inv)


def _fc1_act(b, engine, x_q, probs, w1, m_splits, out_dtype):
    y1 = engine.fprop(x_q, w1, m_splits, out_dtype)
    a_q = b.weighted_swiglu_quant(y1, probs)
    return y1, a_q


class _Fp8FlowExperts(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, probs, m_splits, recompute, cache, engine_name, *weights):
        num_experts = len(m_splits)
        w1, w2 = weights[:num_experts], weights[num_experts:]
        b, engine = backend_for(x.device), gemm_engine_for(x.device, engine_name, num_experts)
        x_q = x.fp8
        out_dtype = x.dtype
        w1_q = cache.get_group(w1, engine)
        w2_q = cache.get_group(w2, engine)
        y1, a_q = _fc1_act(b, engine, x_q, probs, w1_q, m_splits, out_dtype)
        y2 = engine.fprop(a_q, w2_q, m_splits, out_dtype)
        ctx.m_splits, ctx.recompute, ctx.cache, ctx.out_dtype = list(m_splits), recompute, cache, out_dtype
        ctx.num_experts, ctx.engine_name = num_experts, engine_name
        saved = [*_pack(x_q), probs]
        if not recompute:
            saved += [y1, *_pack(a_q)]
        ctx.save_for_backward(*saved, *weights)
        return y2

    @staticmethod
    def backward(ctx, grad_y2):
        n_e = ctx.num_experts
        saved = ctx.saved_tensors
        x_q, probs = _unpack(saved[0], saved[1]), saved[2]
        rest = saved[3:]
        b, engine = backend_for(grad_y2.device), gemm_engine_for(grad_y2.device, ctx.engine_name, ctx.num_experts)
        m_splits, out_dtype = ctx.m_splits, ctx.out_dtype
        if ctx.recompute:
            weights = rest
        else:
            y1, a_q, weights = rest[0], _unpack(rest[1], rest[2]), rest[3:]
        w1, w2 = weights[:n_e], weights[n_e:]
        w1_q = ctx.cache.get_group(w1, engine)
        w2_q = ctx.cache.get_group(w2, engine)
        if ctx.recompute:
            y1, a_q = _fc1_act(b, engine, x_q, probs, w1_q, m_splits, out_dtype)

        if isinstance(grad_y2, Fp8FlowTensor):
            g2_q = grad_y2.fp8
        else:  # a BF16 gradient: only when the caller did not route the FP8 combine gradient here
            g2_q = b.quantize_1x128(grad_y2.contiguous())
            monitor.observe("expert_out_grad", grad_y2, g2_q)

        grad_a = engine.dgrad(g2_q, w2_q, m_splits, out_dtype)
        dw2 = engine.wgrad(g2_q, a_q, m_splits, w2[0].dtype) if n_e else []
        g1_q, grad_probs = b.weighted_swiglu_quant_backward(grad_a, y1, probs)
        grad_x = engine.dgrad(g1_q, w1_q, m_splits, out_dtype)
        dw1 = engine.wgrad(g1_q, x_q, m_splits, w1[0].dtype) if n_e else []
        return (grad_x, grad_probs.to(probs.dtype), None, None, None, None, *dw1, *dw2)


def fp8_flow_experts(
    x: Fp8FlowTensor,
    probs: torch.Tensor,
    m_splits: Sequence[int],
    fc1_weights: Sequence[torch.Tensor],
    fc2_weights: Sequence[torch.Tensor],
    recompute: bool = False,
    cache: WeightQuantCache = None,
    gemm_engine: str = "auto",
) -> torch.Tensor:
    """Grouped SwiGLU expert MLP on FP8 input.

    x:           Fp8FlowTensor [N, H] (1x128), rows grouped by expert, each group padded to the GEMM alignment.
    probs:       [N] fp32 routing weights (0 on padding rows); receives a gradient.
    m_splits:    rows per expert (python ints, summing to N).
    fc1_weights: per expert [2F, H] (gate rows first); fc2_weights: per expert [H, F].
    gemm_engine: "triton" (one launch per GEMM for all experts), "te" (TE's grouped GEMM) or "auto" (by the number
                 of experts: ops.gemm_engine.resolve_gemm_engine); CPU always runs the reference.
    Returns y [N, H] in x's logical dtype.
    """
    if not isinstance(x, Fp8FlowTensor):
        raise TypeError("fp8_flow_experts needs the FP8 payload from the FP8-Flow dispatcher (an Fp8FlowTensor)")
    return _Fp8FlowExperts.apply(
        x, probs, list(m_splits), recompute, cache or WeightQuantCache(), gemm_engine, *fc1_weights, *fc2_weights
    )
