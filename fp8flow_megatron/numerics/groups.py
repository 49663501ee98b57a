"""RowGroups: rows of a buffer grouped by expert, described by tensors on the buffer's device (no host counts).

The sync-free layout of the expert GEMMs: a buffer of `num_rows` rows -- a worst-case bound the host knows, e.g.
tokens * topk + experts * (align - 1) -- holds expert e's rows at offsets[e] .. offsets[e + 1]; rows from
offsets[E] to num_rows (the tail) belong to no expert. The real counts never leave the device: the grouped kernels
launch worst-case grids and every program reads the offsets to find its expert and row range. The numerics twins read
them on the host (they are the CPU spec).

Conventions shared by every varlen GEMM, its twin and the transposes:
  counts  int64 [E]      rows of each group (zeros allowed), each a multiple of `align`
  offsets int64 [E + 1]  offsets[0] = 0, offsets[e + 1] = offsets[e] + counts[e]; offsets[E] <= num_rows
  tiles   int64 [E + 1]  first 128-row tile of each group when every group is cut into 128-row tiles from its own start
                         (tiles[e + 1] - tiles[e] = ceil(counts[e] / 128)); also the first 128-row block of each group's
                         column-wise scales in the scaling-aware transpose (compact: split e at block tiles[e])
  tile_groups int64 [max_tiles]  the group of each 128-row tile t < tiles[E] (the GEMMs' tile table, built on the
                         device by one searchsorted), E - 1 for the tiles past them (unused there)
  num_rows, align, max_tiles: host ints. max_tiles bounds tiles[E] plus the 128-row tiles of the tail, so a grid of
                         max_tiles programs along M covers every group and the tail whatever the counts are.
Outputs of the varlen GEMMs have num_rows rows; their tail rows are zero (written by the kernels), so every
downstream op may treat them as padding rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch

from .format import BLOCK, ceil_div


def max_padded_rows(num_pairs: int, num_groups: int, align: int) -> int:
    """Worst-case rows of `num_pairs` rows split into `num_groups` groups each padded up to a multiple of align."""
    return int(num_pairs) + int(num_groups) * (int(align) - 1)


def max_tiles(num_rows: int, num_groups: int) -> int:
    """A bound on tiles[E] + ceil((num_rows - offsets[E]) / 128) for any counts summing to at most num_rows:
    sum_e ceil(m_e / 128) + ceil(tail / 128) < num_rows / 128 + E + 1, so ceil(num_rows / 128) + E suffices."""
    return ceil_div(int(num_rows), BLOCK) + int(num_groups)


@dataclass(frozen=True, eq=False)
class RowGroups:
    counts: torch.Tensor  # int64 [E]
    offsets: torch.Tensor  # int64 [E + 1]
    tiles: torch.Tensor  # int64 [E + 1]
    tile_groups: torch.Tensor  # int64 [max_tiles]
    num_rows: int
    align: int
    max_tiles: int

    @classmethod
    def from_counts(cls, counts: torch.Tensor, num_rows: int, align: int = 1) -> "RowGroups":
        """From per-group row counts on any device, with torch ops on that device (no host read, no sync).

        counts: int tensor [E]; the caller guarantees sum(counts) <= num_rows and that every count is a multiple of
        align (the twins check both; the kernels trust them)."""
        counts = counts.reshape(-1).to(torch.int64)
        zero = counts.new_zeros(1)
        offsets = torch.cat([zero, torch.cumsum(counts, 0)])
        tiles = torch.cat([zero, torch.cumsum((counts + (BLOCK - 1)) // BLOCK, 0)])
        return cls._with_tile_groups(counts, offsets, tiles, num_rows, align)

    @classmethod
    def _with_tile_groups(cls, counts, offsets, tiles, num_rows, align) -> "RowGroups":
        e = counts.numel()
        bound = max_tiles(num_rows, e)
        # tile t belongs to the first group whose tiles end after t: empty groups (end == start) are skipped
        t = torch.arange(bound, dtype=torch.int64, device=counts.device)
        tile_groups = torch.searchsorted(tiles[1:], t, right=True).clamp_(max=max(e - 1, 0))
        return cls(counts, offsets, tiles, tile_groups, int(num_rows), int(align), bound)

    @classmethod
    def from_splits(
        cls, m_splits: Sequence[int], device, num_rows: Optional[int] = None, align: Optional[int] = None
    ) -> "RowGroups":
        """From host row counts (EP > 1, where the counts are on the host already, and tests): counts, offsets and
        tiles computed on the host and moved in one small copy (pinned, non-blocking: no sync). num_rows defaults to
        sum(m_splits); align to 16 when every count is a multiple of 16 (the GEMMs' fast path), else 1."""
        from .format import host_to_device

        splits = [int(s) for s in m_splits]
        if any(s < 0 for s in splits):
            raise ValueError(f"RowGroups.from_splits: negative row count in {splits}")
        if num_rows is None:
            num_rows = sum(splits)
        if sum(splits) > num_rows:
            raise ValueError(f"RowGroups.from_splits: {splits} sum to more than num_rows={num_rows}")
        if align is None:
            align = 16 if all(s % 16 == 0 for s in splits) else 1
        e = len(splits)
        offsets, tiles = [0], [0]
        for s in splits:
            offsets.append(offsets[-1] + s)
            tiles.append(tiles[-1] + ceil_div(s, BLOCK))
        table = host_to_device(torch.tensor(splits + offsets + tiles, dtype=torch.int64), device)
        return cls._with_tile_groups(table[:e], table[e : 2 * e + 1], table[2 * e + 1 :], num_rows, align)

    @property
    def num_groups(self) -> int:
        return self.counts.numel()

    def __len__(self) -> int:  # the number of groups, as len(m_splits) of a host list
        return self.num_groups

    @property
    def device(self) -> torch.device:
        return self.counts.device

    def host_splits(self, op: str = "RowGroups") -> List[int]:
        """The counts as host ints, checked against the contract. Reads device memory (a sync on CUDA): for the
        numerics twins and the TE engine only, never on the sync-free path."""
        splits = [int(s) for s in self.counts.tolist()]
        if any(s < 0 for s in splits) or sum(splits) > self.num_rows:
            raise ValueError(f"{op}: group counts {splits} must be >= 0 and sum to at most num_rows={self.num_rows}")
        if self.align > 1 and any(s % self.align for s in splits):
            raise ValueError(f"{op}: group counts {splits} are not all multiples of align={self.align}")
        return splits


def zero_tail_rows(y: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """y [num_rows, N] with rows offsets[-1] .. num_rows - 1 (the tail, past every group) set to zero, in place;
    offsets: int64 [E + 1] (RowGroups.offsets). Returns y. Reads offsets[-1] on the host (the CPU spec)."""
    y[int(offsets[-1]) :] = 0
    return y
