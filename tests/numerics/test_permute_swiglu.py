"""The permute/pad and SwiGLU twins against independent references: megatron-core's own (unfused, pure torch) permute /
unpermute, and autograd through F.silu."""

import pytest
import torch
import torch.nn.functional as F

from fp8flow_megatron.numerics import dequantize, quantize_1x128
from fp8flow_megatron.numerics.permute import (
    chunk_sort_pad_maps,
    chunk_sort_pad_rows,
    compact_dst_rows,
    permute_pad_rows,
    routing_rows,
    unpermute_unpad_rows,
)
from fp8flow_megatron.numerics.swiglu import weighted_swiglu, weighted_swiglu_quant, weighted_swiglu_quant_backward


def _routing(t, e, k, seed=0, hot=None):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(t, e, generator=g)
    if hot is not None:
        logits[:, hot] += 100
    rm = torch.zeros(t, e, dtype=torch.bool)
    if t:
        rm.scatter_(1, logits.topk(k, dim=1).indices, True)
    return rm, torch.softmax(logits, -1)


@pytest.mark.parametrize("t,e,k,hot", [(0, 4, 2, None), (1, 4, 2, None), (37, 8, 2, None), (64, 8, 1, 3), (50, 6, 3, None)])
def test_permute_matches_megatron_and_pads(t, e, k, hot):
    from megatron.core.transformer.moe.moe_utils import permute, unpermute

    rm, probs = _routing(t, e, k, hot=hot)
    x = torch.randn(t, 256)
    # num_out_tokens: 0.19 requires it; [:3]: 0.19 also returns tokens_per_expert and padding info
    ref_x, ref_p, sorted_idx = permute(x, rm, probs=probs, num_out_tokens=int(rm.sum()))[:3]
    src, prob_src, dst, padded = routing_rows(rm, align=1)
    out, p = permute_pad_rows(x, src, probs, prob_src)
    assert torch.equal(out, ref_x) and torch.equal(p, ref_p)
    # padded: each expert a multiple of 16, zero rows with prob 0 and FP8 scale 1, data rows unchanged
    q = quantize_1x128(x)
    src16, prob_src16, dst16, padded16 = routing_rows(rm, align=16)
    assert all(n % 16 == 0 for n in padded16) and sum(padded16) == len(src16)
    assert padded16 == [-(-int(c) // 16) * 16 for c in rm.sum(0)]
    q_out, p16 = permute_pad_rows(q, src16, probs, prob_src16)
    pad = src16 < 0
    assert torch.all(q_out.data.view(torch.uint8)[pad] == 0) and torch.all(q_out.scale_inv[pad] == 1)
    assert torch.all(p16[pad] == 0)
    assert torch.equal(dequantize(q_out)[~pad], dequantize(q)[src16[~pad]])
    # unpermute: sum of each token's expert rows, padding never read
    y = torch.randn(len(src16), 256)
    y[pad] = float("nan")  # would poison the sum if read
    got = unpermute_unpad_rows(y, dst16)
    ref = unpermute(y[~pad], sorted_idx, restore_shape=x.shape, routing_map=rm)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("t,e,k,drop", [(0, 4, 2, 0.0), (1, 4, 2, 0.0), (37, 8, 2, 0.0), (64, 8, 1, 0.0), (300, 64, 6, 0.0),
                                         (300, 64, 6, 0.3), (50, 6, 6, 0.0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compact_dst_rows_keeps_rows_in_order_and_unpermute_bits(t, e, k, drop, dtype):
    # drop: some routed pairs removed (a token with fewer than topk rows, as after token dropping)
    rm, _ = _routing(t, e, k, seed=t + e)
    if drop:
        rm &= torch.rand(t, e, generator=torch.Generator().manual_seed(1)) >= drop
    src, _, dst, _ = routing_rows(rm, align=16)
    compact = compact_dst_rows(dst, k)
    assert compact.shape == (t, min(k, e)) and compact.dtype == torch.int64 and compact.is_contiguous()
    # independent reference: each token's valid rows in expert order, then -1
    for tok in range(t):
        rows = [int(r) for r in dst[tok] if r >= 0]
        assert compact[tok].tolist() == rows + [-1] * (compact.shape[1] - len(rows))
    y = torch.randn(len(src), 384).to(dtype)
    bits = torch.int32 if dtype == torch.float32 else torch.int16  # torch.equal alone would take -0 == +0
    assert torch.equal(unpermute_unpad_rows(y, compact).view(bits), unpermute_unpad_rows(y, dst).view(bits))


def test_compact_dst_rows_refuses_more_rows_than_slots():
    rm, _ = _routing(16, 8, 3)
    _, _, dst, _ = routing_rows(rm, align=1)
    with pytest.raises(RuntimeError, match="out of bounds"):
        compact_dst_rows(dst, 2)  # 3 rows per token into 2 slots: an error, never a dropped row
    with pytest.raises(ValueError, match="num_slots must be >= 1"):
        compact_dst_rows(dst, 0)


def test_chunk_sort_pad_rows_orders_by_expert_then_rank():
    sizes = torch.tensor([[2, 0, 1], [3, 1, 0]])  # rank-major [R=2, L=3]
    src, padded = chunk_sort_pad_rows(sizes, align=4)
    # received rows: r0e0 {0,1}, r0e2 {2}, r1e0 {3,4,5}, r1e1 {6}
    assert padded == [8, 4, 4]
    assert src.tolist() == [0, 1, 3, 4, 5, -1, -1, -1, 6, -1, -1, -1, 2, -1, -1, -1]


CHUNK_SPLITS = {
    "mixed": [[2, 0, 1], [3, 1, 0]],
    "empty_expert": [[5, 0, 7], [0, 0, 9], [16, 0, 1]],
    "one_hot_expert": [[0, 40, 0, 0]] * 8,
    "no_rows": [[0, 0], [0, 0]],
    "one_rank": [[3, 17, 16, 0]],
    "aligned": [[16, 32], [48, 0]],
}


@pytest.mark.parametrize("align", [1, 4, 16])
@pytest.mark.parametrize("name", list(CHUNK_SPLITS))
def test_chunk_sort_pad_maps_equals_loop_reference_and_inverts(name, align):
    sizes = torch.tensor(CHUNK_SPLITS[name])
    src, dst, padded = chunk_sort_pad_maps(sizes, align=align)
    ref_src, ref_padded = chunk_sort_pad_rows(sizes, align=align)
    assert padded == ref_padded
    assert src.dtype == dst.dtype == torch.int64
    assert src.tolist() == ref_src.tolist()
    n_in = int(sizes.sum())
    assert dst.shape == (n_in, 1)
    # dst is the inverse: every received row lands once, on the output row whose source it is
    assert sorted(dst.flatten().tolist()) == sorted(i for i, s in enumerate(ref_src.tolist()) if s >= 0)
    assert all(src[d].item() == i for i, d in enumerate(dst.flatten().tolist()))


def test_chunk_sort_pad_maps_rejects_flat_splits():
    with pytest.raises(ValueError, match=r"\[ranks, local experts\]"):
        chunk_sort_pad_maps(torch.tensor([1, 2, 3]))


def test_weighted_swiglu_forward_and_backward_match_autograd():
    torch.manual_seed(0)
    n, f = 40, 256
    x = torch.randn(n, 2 * f, dtype=torch.float64)
    p = torch.rand(n, dtype=torch.float64)
    xr, pr = x.clone().requires_grad_(), p.clone().requires_grad_()
    a, b = xr.chunk(2, dim=-1)
    ref = F.silu(a) * b * pr.unsqueeze(1)
    g = torch.randn(n, f, dtype=torch.float64)
    ref.backward(g)
    h = weighted_swiglu(x.float(), p.float())
    torch.testing.assert_close(h.double(), ref.detach(), rtol=1e-5, atol=1e-6)
    assert torch.equal(weighted_swiglu_quant(x.float(), p.float()).data.view(torch.uint8), quantize_1x128(h).data.view(torch.uint8))
    dq, dp = weighted_swiglu_quant_backward(g.float(), x.float(), p.float())
    assert dq.data.shape == (n, 2 * f)
    exact = torch.cat([xr.grad[:, :f], xr.grad[:, f:]], dim=1)
    rel = (dequantize(dq).double() - exact).norm() / exact.norm()
    assert rel < 0.04  # one E4M3 rounding of the fp32 gradient
    torch.testing.assert_close(dp.double(), pr.grad, rtol=1e-4, atol=1e-5)
