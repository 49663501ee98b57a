"""Autograd Functions of the FP8 dispatch/combine path: quantize once, move FP8 rows, and quantize the combine
gradient once.

Forward:  x (bf16) --quantize (cast #1)--> FP8 --permute(+pad)--> FP8 --all-to-all--> FP8 --chunk sort + pad--> experts
          experts (bf16) --unpad + unsort--> bf16 --all-to-all--> bf16 --unpermute (sum over top-k)--> out (bf16)
Backward: d out (bf16) --quantize (cast #2)--> FP8 --permute--> FP8 --all-to-all--> FP8 --sort + pad--> experts' dY
          experts' dX (bf16) --unpad + unsort--> bf16 --all-to-all--> bf16 --unpermute--> bf16 --> dx (straight through)
Row moves take index maps built by fp8flow_megatron.numerics.permute (routing_rows, chunk_sort_pad_rows).
Both casts raise the non-finite guard's flag of their site (ops/nonfinite.py) on every iteration.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from .backend import backend_for
from .fp8_tensor import Fp8FlowTensor
from .nonfinite import guard
from .telemetry import monitor


def _plain(g: torch.Tensor) -> torch.Tensor:
    return g.dequantize() if isinstance(g, Fp8FlowTensor) else g


def _gather(x: torch.Tensor, src_rows: torch.Tensor) -> torch.Tensor:
    """Row gather with zero padding rows; FP8 stays FP8."""
    b = backend_for(x.device)
    if isinstance(x, Fp8FlowTensor):
        out, _ = b.permute_pad_rows(x.fp8, src_rows)
        return Fp8FlowTensor(out, x.dtype)
    out, _ = b.permute_pad_rows(x, src_rows)
    return out


def _quantize(x2d: torch.Tensor, site: str, direction: str) -> Fp8FlowTensor:
    q = backend_for(x2d.device).quantize_1x128(x2d, guard.flag(site, direction, x2d.device))
    monitor.observe(site, x2d, q)
    return Fp8FlowTensor(q, x2d.dtype)


class _QuantizeTokens(torch.autograd.Function):
    """Cast #1. Backward is straight-through: the BF16 gradient of the tokens passes unchanged."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, site: str):
        return _quantize(x, site, "forward")

    @staticmethod
    def backward(ctx, grad):
        return _plain(grad), None


def quantize_tokens(x: torch.Tensor, site: str = "tokens") -> Fp8FlowTensor:
    """x [T, H] bf16/fp32 -> Fp8FlowTensor [T, H] (1x128 FP8 payload, logical dtype of x)."""
    return _QuantizeTokens.apply(x, site)


class _PermuteRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, src_rows, dst_rows):
        ctx.save_for_backward(dst_rows)
        return _gather(x, src_rows)

    @staticmethod
    def backward(ctx, grad):
        (dst_rows,) = ctx.saved_tensors
        g = _plain(grad)
        return backend_for(g.device).unpermute_unpad_rows(g, dst_rows), None, None


def permute_rows(x: torch.Tensor, src_rows: torch.Tensor, dst_rows: torch.Tensor) -> torch.Tensor:
    """out[i] = x[src_rows[i]] (zero row where -1); FP8 in, FP8 out.

    dst_rows [N_in, S] lists, for each input row, the output rows it was copied to (-1 for none); the backward sums
    those gradient rows (in slot order, fp32) into the input row's gradient.
    """
    return _PermuteRows.apply(x, src_rows, dst_rows)


class _UnpermuteRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, dst_rows, src_rows, quantize_grad, site):
        ctx.save_for_backward(src_rows)
        ctx.quantize_grad, ctx.site = quantize_grad, site
        return backend_for(y.device).unpermute_unpad_rows(_plain(y), dst_rows)

    @staticmethod
    def backward(ctx, grad):
        (src_rows,) = ctx.saved_tensors
        if ctx.quantize_grad and not isinstance(grad, Fp8FlowTensor):
            grad = _quantize(grad.contiguous(), ctx.site, "backward")  # cast #2: the combine gradient, once
        return _gather(grad, src_rows), None, None, None, None


def unpermute_rows(
    y: torch.Tensor, dst_rows: torch.Tensor, src_rows: torch.Tensor, quantize_grad: bool = False, site: str = "combine_grad"
) -> torch.Tensor:
    """out[t] = sum_s y[dst_rows[t, s]] (fp32 accumulation, y's dtype out); padding rows are never read.

    src_rows [N_y] is the inverse map (the output row each y row came from, -1 for padding); the backward gathers the
    gradient rows by it -- in FP8, quantizing the incoming gradient first when quantize_grad is set.
    """
    return _UnpermuteRows.apply(y, dst_rows, src_rows, quantize_grad, site)


def _payload_parts(x: torch.Tensor):
    """The row-aligned tensors that carry x: FP8 codes (as bytes) + fp32 scales for an Fp8FlowTensor, else x."""
    if isinstance(x, Fp8FlowTensor):
        return [x.fp8.data.view(torch.uint8), x.fp8.scale_inv]
    return [x]


def _payload_from_parts(like: torch.Tensor, parts):
    if isinstance(like, Fp8FlowTensor):
        data, scale_inv = parts
        return Fp8FlowTensor(type(like.fp8)(data.view(torch.float8_e4m3fn), scale_inv, like.fp8.block), like.dtype)
    return parts[0]


def _as_rows(t: torch.Tensor) -> torch.Tensor:
    """[N, ...] -> [N, prod(...)] (a 1-D [N] becomes [N, 1]; N may be 0)."""
    return t.reshape(t.shape[0], math.prod(t.shape[1:]))


def _row_words(parts):
    """Each part as [N, words] of one word dtype (int32 when every row is a multiple of 4 bytes, else bytes): views of
    the contiguous tensors, so they can be concatenated along the row in one kernel."""
    parts = [p.contiguous() for p in parts]
    widths = [math.prod(p.shape[1:]) * p.element_size() for p in parts]
    word, size = (torch.int32, 4) if all(w % 4 == 0 for w in widths) else (torch.uint8, 1)
    return [p.view(torch.uint8).view(p.shape[0], w).view(word) for p, w in zip(parts, widths)], [w // size for w in widths]


def _all_to_all_rows(parts, group, output_splits: Sequence[int], input_splits: Sequence[int]):
    """All-to-all of tensors that share their row split: parts[0] (the bulk: FP8 codes or a token gradient) goes
    alone, zero-copy; the small rest (fp32 scales, probs, prob gradients) is packed row by row into one buffer and goes
    in a second collective.

    Why: every all-to-all is a rendezvous of the EP ranks, and unpacked the FP8 dispatch would take 3 (codes, scales,
    probs) where stock megatron takes 2. Packing the bulk too was measured slower at EP=8 (H200): the concat and the
    slicing copies of ~200-400 MB per exchange cost ~3.6 ms per fwd+bwd, more than the collectives they saved.
    """
    from megatron.core.tensor_parallel.mappings import all_to_all

    bulk, small = parts[0], parts[1:]
    out = [all_to_all(group, bulk.contiguous(), output_splits, input_splits)]
    if len(small) == 1:
        out.append(all_to_all(group, small[0].contiguous(), output_splits, input_splits))
    elif small:
        words, widths = _row_words(small)
        received = all_to_all(group, torch.cat(words, dim=1), output_splits, input_splits)
        col = 0
        for p, w in zip(small, widths):
            # flat first: a one-row slice counts as contiguous but keeps the buffer's row stride, which a dtype view
            # refuses
            piece = received[:, col : col + w].contiguous().view(-1)
            out.append(piece.view(torch.uint8).view(p.dtype).view((received.shape[0],) + tuple(p.shape[1:])))
            col += w
    return out


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, output_splits, input_splits):
        ctx.group, ctx.output_splits, ctx.input_splits = group, output_splits, input_splits
        return _payload_from_parts(x, _all_to_all_rows(_payload_parts(x), group, output_splits, input_splits))

    @staticmethod
    def backward(ctx, grad):
        parts = _all_to_all_rows(_payload_parts(grad), ctx.group, ctx.input_splits, ctx.output_splits)
        return _payload_from_parts(grad, parts), None, None, None


def all_to_all(x: torch.Tensor, group, output_splits: Optional[Sequence[int]], input_splits: Optional[Sequence[int]]):
    """Megatron's all_to_all for BF16 tensors and FP8 payloads (codes, then fp32 scales: 1 + 4/128 bytes per
    element); the backward moves the gradient the same way, FP8 if it is FP8."""
    return _AllToAll.apply(x, group, output_splits, input_splits)


class _AllToAllTokensProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, probs, group, output_splits, input_splits):
        ctx.group, ctx.output_splits, ctx.input_splits = group, output_splits, input_splits
        out = _all_to_all_rows(_payload_parts(x) + [_as_rows(probs)], group, output_splits, input_splits)
        return _payload_from_parts(x, out[:-1]), out[-1].reshape((out[-1].shape[0],) + tuple(probs.shape[1:]))

    @staticmethod
    def backward(ctx, grad_x, grad_probs):
        # autograd materializes a zero gradient for an output that received none, so both are tensors here
        parts = _payload_parts(grad_x) + [_as_rows(grad_probs)]
        out = _all_to_all_rows(parts, ctx.group, ctx.input_splits, ctx.output_splits)
        probs_grad = out[-1].reshape((out[-1].shape[0],) + tuple(grad_probs.shape[1:]))
        return _payload_from_parts(grad_x, out[:-1]), probs_grad, None, None, None


def all_to_all_tokens_probs(x: torch.Tensor, probs: torch.Tensor, group, output_splits, input_splits):
    """The dispatch all-to-all: tokens x [N, H] (an FP8 payload or a plain tensor) and their routing probs [N] (rows
    aligned with x). Two collectives, as stock megatron: the FP8 codes, and the scales + probs packed together; the
    backward returns the token gradient and the prob gradient in two."""
    return _AllToAllTokensProbs.apply(x, probs, group, output_splits, input_splits)


def permute_probs(probs: torch.Tensor, prob_src: torch.Tensor) -> torch.Tensor:
    """probs_out[i] = probs.reshape(-1)[prob_src[i]], 0 where prob_src is -1 (autograd through plain indexing)."""
    flat = probs.reshape(-1)
    picked = flat.index_select(0, prob_src.clamp(min=0))
    return torch.where(prob_src >= 0, picked, torch.zeros_like(picked))
