"""permute_pad_rows_triton / unpermute_unpad_rows_triton vs their numerics twins, bit for bit."""

import pytest
import torch

from fp8flow_megatron.kernels import permute_pad_rows_triton, unpermute_unpad_rows_triton
from fp8flow_megatron.numerics import Fp8Blockwise, quantize_1x128
from fp8flow_megatron.numerics.permute import (
    chunk_sort_pad_maps,
    chunk_sort_pad_rows,
    permute_pad_rows,
    routing_rows,
    unpermute_unpad_rows,
)

from .compare import assert_bitwise_equal

pytestmark = pytest.mark.gpu


def _routing(tokens, experts, topk, seed, empty=(), one_expert=None):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(tokens, experts, generator=g)
    for e in empty:
        logits[:, e] = -1e9
    if one_expert is not None:
        logits[:, one_expert] = 1e9
    top = logits.topk(min(topk, experts), dim=1).indices
    routing_map = torch.zeros(tokens, experts, dtype=torch.bool).scatter_(1, top, True)
    probs = torch.rand(tokens, experts, generator=g) * routing_map
    return routing_map, probs


def _compact_slots(dst_rows, probs, topk):
    """[T, E] maps -> [T, topk] in the same (expert) order, -1 where a token has fewer slots."""
    order = torch.sort((dst_rows < 0).to(torch.int8), dim=1, stable=True).indices[:, :topk]
    return dst_rows.gather(1, order), probs.gather(1, order)


ROUTINGS = [
    # tokens, experts, topk, empty experts, all tokens on one expert
    (0, 8, 2, (), None),
    (1, 8, 2, (), None),
    (37, 7, 2, (3,), None),
    (500, 64, 6, (0, 5, 63), None),
    (300, 16, 1, (), 4),
]


@pytest.mark.parametrize("hidden", [1, 300, 2048])
@pytest.mark.parametrize("routing", ROUTINGS, ids=lambda r: f"T{r[0]}E{r[1]}k{r[2]}")
def test_permute_pad_fp8_matches_twin(routing, hidden):
    tokens, experts, topk, empty, one = routing
    routing_map, probs = _routing(tokens, experts, topk, seed=tokens + hidden, empty=empty, one_expert=one)
    src_rows, prob_src, _, padded = routing_rows(routing_map, align=16)
    x = quantize_1x128(torch.randn(tokens, hidden) * 10)
    xg = Fp8Blockwise(x.data.cuda(), x.scale_inv.cuda())
    got, got_p = permute_pad_rows_triton(xg, src_rows.cuda(), probs.cuda(), prob_src.cuda())
    ref, ref_p = permute_pad_rows(x, src_rows, probs, prob_src)
    case = f"T={tokens} E={experts} top{topk} H={hidden} padded={sum(padded)}"
    assert_bitwise_equal(got.data.view(torch.uint8), ref.data.view(torch.uint8), case + " codes")
    assert_bitwise_equal(got.scale_inv, ref.scale_inv, case + " scale_inv")
    assert_bitwise_equal(got_p, ref_p, case + " probs")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.uint8])
def test_permute_pad_plain_tensor_matches_twin(dtype):
    routing_map, probs = _routing(200, 9, 3, seed=1, empty=(2,))
    src_rows, _, _, _ = routing_rows(routing_map, align=16)
    x = (torch.randn(200, 333) * 5).to(dtype)
    x[0, 0] = -0.0 if dtype != torch.uint8 else 0
    got, got_p = permute_pad_rows_triton(x.cuda(), src_rows.cuda())
    ref, _ = permute_pad_rows(x, src_rows)
    assert got_p is None
    assert_bitwise_equal(got, ref, f"plain {dtype}")


def test_permute_pad_chunk_sort_map():
    # The post-all-to-all order [rank][local expert] -> [local expert][rank], padded to 16; probs via src_rows.
    split_sizes = torch.tensor([[3, 0, 17], [0, 0, 5], [40, 1, 0]])
    src_rows, padded = chunk_sort_pad_rows(split_sizes, align=16)
    n = int(split_sizes.sum())
    x = quantize_1x128(torch.randn(n, 256))
    probs = torch.rand(n)
    got, got_p = permute_pad_rows_triton(Fp8Blockwise(x.data.cuda(), x.scale_inv.cuda()), src_rows.cuda(), probs.cuda())
    ref, ref_p = permute_pad_rows(x, src_rows, probs)
    assert_bitwise_equal(got.data.view(torch.uint8), ref.data.view(torch.uint8), "chunk sort codes")
    assert_bitwise_equal(got.scale_inv, ref.scale_inv, "chunk sort scale_inv")
    assert_bitwise_equal(got_p, ref_p, "chunk sort probs")


@pytest.mark.parametrize("split_sizes", [[[3, 0, 17], [0, 0, 5], [40, 1, 0]], [[0, 0], [0, 0]], [[0, 900, 0, 0]] * 8])
def test_chunk_sort_pad_maps_on_cuda_equal_cpu_without_sync(split_sizes):
    # The EP>1 dispatcher builds these maps between the token all-to-all and the experts; a stream sync there would
    # stall every step. "error" turns any synchronizing CUDA call inside into an exception.
    sizes = torch.tensor(split_sizes)
    ref_src, ref_dst, ref_padded = chunk_sort_pad_maps(sizes, align=16)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        src, dst, padded = chunk_sort_pad_maps(sizes, align=16, device="cuda")
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert padded == ref_padded
    assert torch.equal(src.cpu(), ref_src) and torch.equal(dst.cpu(), ref_dst)


@pytest.mark.parametrize("slots", ["experts", "topk"])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("dtype,out_dtype", [(torch.bfloat16, None), (torch.float32, None), (torch.bfloat16, torch.float32)])
@pytest.mark.parametrize("routing", ROUTINGS, ids=lambda r: f"T{r[0]}E{r[1]}k{r[2]}")
def test_unpermute_unpad_matches_twin(routing, dtype, out_dtype, weighted, slots):
    tokens, experts, topk, empty, one = routing
    routing_map, probs = _routing(tokens, experts, topk, seed=tokens + 5, empty=empty, one_expert=one)
    _, _, dst_rows, padded = routing_rows(routing_map, align=16)
    if slots == "topk":
        dst_rows, probs = _compact_slots(dst_rows, probs, topk)
    y = (torch.randn(sum(padded), 2048) * 3).to(dtype)
    p = probs if weighted else None
    got = unpermute_unpad_rows_triton(y.cuda(), dst_rows.cuda(), None if p is None else p.cuda(), out_dtype)
    ref = unpermute_unpad_rows(y, dst_rows, p, out_dtype)
    assert_bitwise_equal(got, ref, f"unpermute T={tokens} E={experts} {dtype}->{out_dtype} weighted={weighted} {slots}")


def test_unpermute_odd_hidden():
    routing_map, probs = _routing(50, 5, 2, seed=3)
    _, _, dst_rows, padded = routing_rows(routing_map, align=16)
    y = torch.randn(sum(padded), 2500).bfloat16()  # two column programs, the second partial
    got = unpermute_unpad_rows_triton(y.cuda(), dst_rows.cuda(), probs.cuda())
    assert_bitwise_equal(got, unpermute_unpad_rows(y, dst_rows, probs), "unpermute H=2500")
