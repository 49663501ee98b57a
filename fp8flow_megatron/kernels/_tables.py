"""Small device tables of host-known values that stay the same from call to call (the addresses of the expert
weights, of megatron's per-expert main_grad buffers), made once and reused.

Why: a table copied per call costs host time (a pinned staging buffer, a copy launch) on every GEMM, and a CUDA graph
would capture the pinned source address, which the caching host allocator hands out again later. Keyed on the
values themselves, a cached table is always right: new addresses make a new table.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from typing import Iterator, List, Sequence

import torch

from ..numerics.format import host_to_device

_MAX_TABLES = 256  # a few per MoE layer (fc1 / fc2 weights, fc1 / fc2 main_grads); old ones are dropped first
_TABLES: "OrderedDict[tuple, torch.Tensor]" = OrderedDict()
_RETAINERS: List[List[torch.Tensor]] = []


@contextlib.contextmanager
def retain_tables() -> Iterator[List[torch.Tensor]]:
    """Collect every table handed out while the context is active. A CUDA graph captured meanwhile reads those tables
    by address at every replay, so its owner keeps the list: the LRU above may drop a table, and its memory must not
    be handed to another tensor while the graph lives."""
    kept: List[torch.Tensor] = []
    _RETAINERS.append(kept)
    try:
        yield kept
    finally:
        _RETAINERS.remove(kept)


def cached_int64_table(values: Sequence[int], device: torch.device) -> torch.Tensor:
    """int64 [len(values)] on `device` holding `values`, made by one non-blocking copy the first time these exact
    values are asked for on this device, then reused (never written: callers must not modify it)."""
    device = torch.device(device)
    key = (device.type, device.index, tuple(int(v) for v in values))
    table = _TABLES.get(key)
    if table is None:
        table = host_to_device(torch.tensor(key[2], dtype=torch.int64), device)
        _TABLES[key] = table
        if len(_TABLES) > _MAX_TABLES:
            _TABLES.popitem(last=False)
    else:
        _TABLES.move_to_end(key)
    for kept in _RETAINERS:
        kept.append(table)
    return table
