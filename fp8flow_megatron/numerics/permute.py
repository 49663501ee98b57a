"""Token permutation with per-expert padding, and its reverse, on FP8 codes + 1x128 scales + probs (pure torch spec).

Two data movers cover every permutation of the MoE dataflow, each one pass over the rows:
  permute_pad_rows      out[i] = x[src_rows[i]], or a zero row where src_rows[i] == -1 (padding); probs alongside.
                        Used for: tokens -> expert-major order (EP=1: straight into the padded GEMM layout), the
                        post-all-to-all chunk sort + pad, and the FP8 combine gradient in backward.
  unpermute_unpad_rows  out[t] = sum_s y[dst_rows[t, s]] (weighted by probs[t, s] if given) over slots s with
                        dst_rows[t, s] >= 0, accumulated in fp32 in slot order. Drops padding rows by never reading
                        them. Used for the BF16 combine and for the BF16 dgrad of the dispatched input.
The index maps are bookkeeping built from the routing map and split sizes (routing_rows, chunk_sort_pad_rows; the
dispatcher uses chunk_sort_pad_maps, the vectorized form of the latter that also gives the inverse map).
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import torch

from .format import Fp8Blockwise, ROWWISE_1X128, ceil_div, host_to_device


def _gather_zero_pad(x: torch.Tensor, src_rows: torch.Tensor) -> torch.Tensor:
    valid = src_rows >= 0
    out = x.new_zeros((src_rows.numel(),) + tuple(x.shape[1:]))
    if x.dtype == torch.float8_e4m3fn:  # index ops on fp8 are not implemented everywhere; move the bytes
        out.view(torch.uint8)[valid] = x.view(torch.uint8).index_select(0, src_rows[valid])
    else:
        out[valid] = x.index_select(0, src_rows[valid])
    return out


def permute_pad_rows(
    x: Union[Fp8Blockwise, torch.Tensor],
    src_rows: torch.Tensor,
    probs: Optional[torch.Tensor] = None,
    prob_src: Optional[torch.Tensor] = None,
) -> Tuple[Union[Fp8Blockwise, torch.Tensor], Optional[torch.Tensor]]:
    """Gather rows (FP8 codes and their 1x128 scales together, or a plain tensor) with zero padding rows.

    x:        Fp8Blockwise (1x128) with data [N_in, H], or a tensor [N_in, H] of any dtype.
    src_rows: int64 [N_out]; source row of each output row, -1 for a padding row (zero codes, scale_inv 1, prob 0).
    probs:    optional fp32 1-D tensor; probs_out[i] = probs[prob_src[i]] (prob_src defaults to src_rows).
    prob_src: optional int64 [N_out] index into probs (-1 where src_rows is -1).
    Returns (x_out [N_out, H] of x's kind, probs_out [N_out] fp32 or None).
    """
    src_rows = src_rows.to(torch.int64)
    if isinstance(x, Fp8Blockwise):
        if x.block != ROWWISE_1X128:
            raise ValueError(f"permute_pad_rows needs 1x128 row-wise FP8, got block {x.block}")
        data = _gather_zero_pad(x.data, src_rows)
        scale_inv = _gather_zero_pad(x.scale_inv, src_rows)
        scale_inv[src_rows < 0] = 1.0  # a zero row's scale is 1, as quantize gives for an all-zero block
        out: Union[Fp8Blockwise, torch.Tensor] = Fp8Blockwise(data, scale_inv, ROWWISE_1X128)
    else:
        out = _gather_zero_pad(x, src_rows)
    probs_out = None
    if probs is not None:
        idx = src_rows if prob_src is None else prob_src.to(torch.int64)
        probs_out = _gather_zero_pad(probs.reshape(-1), idx)
    return out, probs_out


def unpermute_unpad_rows(
    y: torch.Tensor, dst_rows: torch.Tensor, probs: Optional[torch.Tensor] = None, out_dtype: Optional[torch.dtype] = None
) -> torch.Tensor:
    """Reduce permuted rows back to tokens, skipping padding rows.

    y:        [N_pad, H] bf16 or fp32 (expert outputs, or dgrad of the permuted input).
    dst_rows: int64 [T, S]; the rows of y that belong to token t (S = experts or top-k slots), -1 for none.
    probs:    optional [T, S] weights applied to each row before summing.
    Returns [T, H] in out_dtype (default y.dtype): fp32 sum over s = 0..S-1 in order, then one rounding.
    """
    dst_rows = dst_rows.to(torch.int64)
    t, s_slots = dst_rows.shape
    acc = torch.zeros(t, y.shape[1], dtype=torch.float32, device=y.device)
    for s in range(s_slots):
        idx = dst_rows[:, s]
        valid = idx >= 0
        rows = y.index_select(0, idx.clamp(min=0)).to(torch.float32)
        if probs is not None:
            rows = rows * probs[:, s].to(torch.float32).unsqueeze(1)
        acc = acc + torch.where(valid.unsqueeze(1), rows, torch.zeros_like(rows))
    return acc.to(out_dtype or y.dtype)


def pad_counts(tokens_per_expert: Sequence[int], align: int) -> List[int]:
    """Per-expert row counts rounded up to a multiple of align (an empty expert stays empty)."""
    return [ceil_div(int(n), align) * align for n in tokens_per_expert]


def routing_rows(routing_map: torch.Tensor, align: int = 1) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, List[int]]:
    """Index maps that send tokens to expert-major order, each expert padded to a multiple of align.

    routing_map: bool [T, E]. Within an expert, tokens keep ascending order (megatron's permute order).
    Returns (src_rows [N_pad] token of each row or -1, prob_src [N_pad] index into probs.reshape(-1) = t*E + e or -1,
             dst_rows [T, E] row of (t, e) or -1, padded_counts [E] (host ints)).
    Vectorized: one host read of the per-expert counts (the padded sizes are needed on the host anyway).
    """
    t, e = routing_map.shape
    device = routing_map.device
    counts_dev = routing_map.sum(dim=0)
    counts = counts_dev.tolist()
    padded = pad_counts(counts, align)
    n_pad = sum(padded)
    # Everything after the one host read stays on the device without further syncs: the padded starts are computed
    # there, and nonzero_static takes the pair count the host already knows.
    padded_dev = (counts_dev + (align - 1)) // align * align
    pad_start = torch.cumsum(padded_dev, 0) - padded_dev
    start = torch.cumsum(counts_dev, 0) - counts_dev
    # [N, 2] (expert, token), expert-major, tokens ascending
    pairs = torch.nonzero_static(routing_map.t(), size=sum(counts), fill_value=-1)
    ex, tok = pairs[:, 0], pairs[:, 1]
    rank_in_expert = torch.arange(pairs.shape[0], device=device) - start[ex]
    rows = pad_start[ex] + rank_in_expert
    src_rows = torch.full((n_pad,), -1, dtype=torch.int64, device=device)
    prob_src = torch.full((n_pad,), -1, dtype=torch.int64, device=device)
    dst_rows = torch.full((t, e), -1, dtype=torch.int64, device=device)
    src_rows[rows] = tok
    prob_src[rows] = tok * e + ex
    dst_rows[tok, ex] = rows
    return src_rows, prob_src, dst_rows, padded


def routing_rows_static(
    routing_map: torch.Tensor, align: int, num_rows: int
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """routing_rows without any host read: the same maps laid into a buffer of num_rows rows, a bound the host knows
    (max_padded_rows(tokens * topk, experts, align) for a router that picks at most topk experts per token).

    routing_map: bool [T, E], at most num_rows - E * (align - 1) True entries (not checked: that would be a sync).
    Returns (src_rows [num_rows] token of each row or -1, prob_src [num_rows] t*E + e or -1, dst_rows [T, E] row of
             (t, e) or -1, padded_counts int64 [E] on routing_map's device).
    Rows 0 .. sum(padded_counts) - 1 are exactly routing_rows(routing_map, align)'s; the rows after them (the tail)
    are -1 in src_rows and prob_src, i.e. zero padding rows after the permute, and no dst_rows entry points there.
    Torch ops only (cumsums, a scatter), O(T * E) like megatron's routing map itself; no sync on CUDA.
    """
    t, e = routing_map.shape
    device = routing_map.device
    # [E, T]: each expert's tokens contiguous, so the scan below runs along the innermost dim. torch's scan over the
    # outer dim of [T, E] keeps only E columns in flight and took 2.8 ms at T = 16,384, E = 64 on an H200.
    taken_t = routing_map.t().contiguous().to(torch.int32)
    counts = taken_t.sum(dim=1, dtype=torch.int64)
    padded = (counts + (align - 1)) // align * align
    pad_start = torch.cumsum(padded, 0) - padded
    # expert-major, tokens ascending within an expert (megatron's permute order): rank of (t, e) among e's tokens
    rank = (torch.cumsum(taken_t, dim=1, dtype=torch.int64) - 1).t().contiguous()
    dst_rows = torch.where(routing_map, pad_start.unsqueeze(0) + rank, torch.full_like(rank, -1))
    # scatter into num_rows + 1 slots: unrouted pairs all land in the last one, which is then cut off
    target = torch.where(routing_map, dst_rows, torch.full_like(dst_rows, num_rows)).reshape(-1)
    tok = torch.arange(t, dtype=torch.int64, device=device).unsqueeze(1).expand(t, e).reshape(-1)
    flat = torch.arange(t * e, dtype=torch.int64, device=device)
    src_rows = torch.full((num_rows + 1,), -1, dtype=torch.int64, device=device)
    prob_src = torch.full((num_rows + 1,), -1, dtype=torch.int64, device=device)
    src_rows.scatter_(0, target, torch.where(routing_map.reshape(-1), tok, -1))
    prob_src.scatter_(0, target, torch.where(routing_map.reshape(-1), flat, -1))
    return src_rows[:num_rows], prob_src[:num_rows], dst_rows, padded


def compact_dst_rows(dst_rows: torch.Tensor, num_slots: int) -> torch.Tensor:
    """The same rows in num_slots slots per token: each token's rows in their slot order, then -1.

    dst_rows:  int64 [T, S] rows of each token, -1 for none (routing_rows' [T, E] map), at most num_slots >= 1 rows
               per token (the router's topk).
    Returns int64 [T, num_slots], contiguous (dst_rows itself when num_slots >= S).
    unpermute_unpad_rows sums a token's rows in slot order and a -1 slot adds nothing (fp32 acc + 0.0 is acc: the
    accumulator starts at +0 and never becomes -0), so it gives the same bits from either map, iterating over topk
    slots instead of E (the Triton kernel's two launches in the V2-Lite layer, T = 16,384, E = 64, topk = 6, H200:
    0.80 -> 0.22 ms).
    A token with more than num_slots rows makes the scatter index out of bounds, an error, not a dropped row. Torch
    ops only (an innermost-dim scan, a scatter); no sync on CUDA.
    """
    if num_slots < 1:
        raise ValueError(f"compact_dst_rows: num_slots must be >= 1 (the router's topk), got {num_slots}")
    t, s = dst_rows.shape
    if num_slots >= s:
        return dst_rows
    valid = dst_rows >= 0
    slot = torch.cumsum(valid, dim=1, dtype=torch.int64) - 1
    # -1 entries all go to the extra column num_slots, cut off below; overflowing rows jump past it
    slot = torch.where(valid, torch.where(slot < num_slots, slot, slot + 1), num_slots)
    out = torch.full((t, num_slots + 1), -1, dtype=torch.int64, device=dst_rows.device)
    out.scatter_(1, slot, dst_rows.to(torch.int64))
    return out[:, :num_slots].contiguous()


def chunk_sort_pad_rows(split_sizes: torch.Tensor, align: int = 1) -> Tuple[torch.Tensor, List[int]]:
    """Index map from the post-all-to-all order [source rank][local expert] to [local expert][source rank], each local
    expert padded to a multiple of align.

    split_sizes: int [R, L], rows received from rank r for local expert l, stored rank-major.
    Returns (src_rows [N_pad] with -1 for padding rows, padded_counts [L]).
    """
    sizes = split_sizes.to(torch.int64).cpu()
    r, l = sizes.shape
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), sizes.flatten().cumsum(0)])[:-1].view(r, l)
    counts = sizes.sum(dim=0).tolist()
    padded = pad_counts(counts, align)
    pieces = []
    for ex in range(l):
        for rank in range(r):
            n = int(sizes[rank, ex])
            pieces.append(torch.arange(int(offsets[rank, ex]), int(offsets[rank, ex]) + n))
        pieces.append(torch.full((padded[ex] - counts[ex],), -1, dtype=torch.int64))
    src_rows = torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.int64)
    return src_rows, padded


def chunk_sort_pad_maps(
    split_sizes: torch.Tensor, align: int = 1, device: Union[str, torch.device] = "cpu"
) -> Tuple[torch.Tensor, torch.Tensor, List[int]]:
    """chunk_sort_pad_rows and its inverse, built on `device` without a stream sync (what the EP>1 dispatcher uses).

    split_sizes: host int [R, L] (rows received from rank r for local expert l, stored rank-major).
    Returns (src_rows [N_pad] int64 on device: the received row of each output row, -1 for padding -- equal to
             chunk_sort_pad_rows(split_sizes, align)[0];
             dst_rows [N_in, 1] int64 on device: the output row of each received row (its inverse);
             padded_counts [L] host ints).
    Only R*L chunk offsets are computed on the host; the per-row maps are expanded on the device (one
    repeat_interleave with a host-known output size, one scatter), so no O(rows) host work or pageable copy sits on
    the step's critical path.
    """
    sizes = torch.as_tensor(split_sizes, dtype=torch.int64).cpu()
    if sizes.dim() != 2:
        raise ValueError(f"chunk_sort_pad_maps: split_sizes must be [ranks, local experts], got shape {tuple(sizes.shape)}")
    counts = sizes.sum(dim=0).tolist()
    padded = pad_counts(counts, align)
    padded_t = torch.tensor(padded, dtype=torch.int64)
    chunk_rows = sizes.flatten()  # chunk c = rank * L + expert, in received (rank-major) order
    src_start = chunk_rows.cumsum(0) - chunk_rows
    # output start of chunk (r, e): expert e's padded start + the rows earlier ranks sent to e
    dst_start = ((padded_t.cumsum(0) - padded_t).unsqueeze(0) + (sizes.cumsum(0) - sizes)).flatten()
    n_in, n_pad = int(chunk_rows.sum()), sum(padded)
    chunk_rows_dev = host_to_device(chunk_rows, device)
    shift_dev = host_to_device(dst_start - src_start, device)
    received = torch.arange(n_in, dtype=torch.int64, device=device)
    dst = received + torch.repeat_interleave(shift_dev, chunk_rows_dev, output_size=n_in)
    src = torch.full((n_pad,), -1, dtype=torch.int64, device=device)
    src[dst] = received
    return src, dst.unsqueeze(1), padded
