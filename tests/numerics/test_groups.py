"""The sync-free layout on CPU: RowGroups (counts, offsets and tile starts computed by torch ops), the device-built
routing maps over a worst-case buffer (routing_rows_static) and the varlen GEMM twins, each against the host-count
functions they replace (bit for bit on the groups' rows; the tail rows are -1 in the maps and zero in GEMM outputs)."""

import pytest
import torch

from fp8flow_megatron.numerics import quantize_1x128, quantize_128x128
from fp8flow_megatron.numerics.gemm import (
    Fp8BlockwiseStack,
    fp8_grouped_gemm_nt,
    fp8_grouped_wgrad,
    fp8_varlen_gemm_nt,
    fp8_varlen_wgrad,
)
from fp8flow_megatron.numerics.groups import RowGroups, max_padded_rows, max_tiles
from fp8flow_megatron.numerics.permute import routing_rows, routing_rows_static

SPLITS = [[16, 0, 48, 32], [0, 0, 64, 0], [128, 256, 16, 0], [0, 0, 0, 0], [1040], [5, 0, 37, 130], [1], [0] * 9 + [3]]


@pytest.mark.parametrize("m_splits", SPLITS)
@pytest.mark.parametrize("tail", [0, 1, 130])
def test_row_groups_offsets_and_tiles(m_splits, tail):
    num_rows = sum(m_splits) + tail
    g = RowGroups.from_counts(torch.tensor(m_splits), num_rows)
    h = RowGroups.from_splits(m_splits, "cpu", num_rows)
    starts, tiles = [0], [0]
    for m in m_splits:
        starts.append(starts[-1] + m)
        tiles.append(tiles[-1] + -(-m // 128))
    for r in (g, h):
        assert r.offsets.tolist() == starts and r.tiles.tolist() == tiles and r.counts.tolist() == m_splits
        assert r.offsets.dtype == r.tiles.dtype == torch.int64 and len(r) == len(m_splits) and r.num_rows == num_rows
        # the worst-case grid covers the groups' tiles and the tail's
        assert tiles[-1] + -(-tail // 128) <= r.max_tiles == max_tiles(num_rows, len(m_splits))
        assert r.host_splits() == m_splits
        # the GEMMs' tile table: tile t of the groups belongs to the group whose tiles hold it (never an empty one)
        want = [e for e, m in enumerate(m_splits) for _ in range(-(-m // 128))]
        assert r.tile_groups.shape == (r.max_tiles,) and r.tile_groups[: len(want)].tolist() == want
        assert bool((r.tile_groups[len(want):] == len(m_splits) - 1).all())
    assert h.align == (16 if all(m % 16 == 0 for m in m_splits) else 1)


def test_max_tiles_bounds_every_layout():
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        e = int(torch.randint(1, 20, (1,), generator=g))
        num_rows = int(torch.randint(0, 3000, (1,), generator=g))
        cuts = torch.sort(torch.randint(0, num_rows + 1, (e,), generator=g)).values.tolist()
        counts = [b - a for a, b in zip([0] + cuts[:-1], cuts)]
        tail = num_rows - sum(counts)
        assert sum(-(-m // 128) for m in counts) + -(-tail // 128) <= max_tiles(num_rows, e)


def test_host_splits_checks_the_contract():
    with pytest.raises(ValueError, match="at most num_rows=10"):
        RowGroups.from_counts(torch.tensor([8, 8]), 10).host_splits()
    with pytest.raises(ValueError, match="multiples of align=16"):
        RowGroups.from_counts(torch.tensor([16, 8]), 32, align=16).host_splits()
    with pytest.raises(ValueError, match="negative"):
        RowGroups.from_splits([4, -1], "cpu")


def _routing_map(t, e, topk, seed, starve=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(t, e, generator=g)
    logits[:, :starve] -= 100.0  # experts 0 .. starve - 1 receive nothing
    idx = logits.topk(topk, dim=1).indices
    return torch.zeros(t, e, dtype=torch.bool).scatter(1, idx, True)


@pytest.mark.parametrize("t,e,topk,starve", [(37, 8, 2, 0), (64, 4, 1, 0), (1, 8, 2, 0), (50, 16, 3, 10), (0, 4, 2, 0)])
@pytest.mark.parametrize("align", [1, 16])
def test_routing_rows_static_equals_routing_rows_plus_tail(t, e, topk, starve, align):
    rm = _routing_map(t, e, topk, seed=t + e, starve=starve)
    src, prob_src, dst, padded = routing_rows(rm, align)
    num_rows = max_padded_rows(t * topk, e, align)
    s_src, s_prob, s_dst, s_padded = routing_rows_static(rm, align, num_rows)
    n_pad = sum(padded)
    assert s_src.shape == s_prob.shape == (num_rows,) and n_pad <= num_rows
    assert s_padded.tolist() == padded and s_padded.dtype == torch.int64
    assert torch.equal(s_src[:n_pad], src) and torch.equal(s_prob[:n_pad], prob_src) and torch.equal(s_dst, dst)
    assert bool((s_src[n_pad:] == -1).all()) and bool((s_prob[n_pad:] == -1).all())


def _operands(m_splits, tail, n, k, seed):
    g = torch.Generator().manual_seed(seed)
    num_rows = sum(m_splits) + tail
    x = quantize_1x128(torch.randn(num_rows, k, generator=g) * 3)
    dy = quantize_1x128(torch.randn(num_rows, n, generator=g) * 1e-3)
    w = Fp8BlockwiseStack.quantize([torch.randn(n, k, generator=g) * 0.02 for _ in m_splits], quantize_128x128)
    return x, dy, w, RowGroups.from_counts(torch.tensor(m_splits), num_rows)


def _head(q, end):
    from fp8flow_megatron.numerics import Fp8Blockwise

    return Fp8Blockwise(q.data[:end], q.scale_inv[:end], q.block)


@pytest.mark.parametrize("m_splits", SPLITS)
@pytest.mark.parametrize("tail", [0, 3])
def test_varlen_gemm_twin_equals_grouped_gemm_with_zero_tail(m_splits, tail):
    n, k = 200, 320
    x, _, w, groups = _operands(m_splits, tail, n, k, seed=len(m_splits) + tail)
    end = sum(m_splits)
    for dtype in (torch.float32, torch.bfloat16):
        y = fp8_varlen_gemm_nt(x, w, groups, dtype)
        assert y.shape == (end + tail, n) and y.dtype == dtype
        assert torch.equal(y[:end], fp8_grouped_gemm_nt(_head(x, end), w, m_splits, dtype))
        assert float(y[end:].abs().sum()) == 0.0
    if end + tail:
        with pytest.raises(ValueError, match="the row groups describe"):
            fp8_varlen_gemm_nt(_head(x, end + tail - 1), w, groups)


@pytest.mark.parametrize("m_splits", SPLITS)
@pytest.mark.parametrize("accumulate", [None, False, True])
def test_varlen_wgrad_twin_equals_grouped_wgrad(m_splits, accumulate):
    n, k = 136, 256
    x, dy, _, groups = _operands(m_splits, 5, n, k, seed=3 + len(m_splits))
    end = sum(m_splits)
    if accumulate is None:
        assert torch.equal(fp8_varlen_wgrad(dy, x, groups), fp8_grouped_wgrad(_head(dy, end), _head(x, end), m_splits))
        return
    g = torch.Generator().manual_seed(1)
    before = [torch.randn(n, k, generator=g) for _ in m_splits]
    got, want = [b.clone() for b in before], [b.clone() for b in before]
    fp8_varlen_wgrad(dy, x, groups, out=got, accumulate=accumulate)
    fp8_grouped_wgrad(_head(dy, end), _head(x, end), m_splits, out=want, accumulate=accumulate)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
