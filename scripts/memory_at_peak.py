"""What is allocated at the peak: a torch CUDA memory snapshot replayed to its highest point, live bytes grouped by
where they were allocated (issue 16 item 4: account for every GB above BF16).

    python scripts/memory_at_peak.py SNAPSHOT.pickle [SNAPSHOT2.pickle ...] [--top 25] [--label NAME ...]

A snapshot comes from `torch.cuda.memory._snapshot()` with allocation history on -- e.g. Megatron-LM's
`--record-memory-history --memory-snapshot-path PATH` (100,000 events with Python stacks, dumped at every logging
iteration), or `torch.cuda.memory._record_memory_history(max_entries=...)` in your own loop. The snapshot's
`segments` give what is allocated when it was taken; walking its `device_traces` backwards (undoing each alloc,
redoing each completed free) gives the allocated bytes at every event of the window, and the blocks alive at the
highest one. Each block is attributed to the innermost frame of its allocation stack that is in this package,
megatron or TransformerEngine (a C++-only stack -- autograd's built-in backward ops -- to its innermost autograd
node, else to its innermost frame outside the allocator); blocks allocated before the window report their size only
("before the trace window"). With several snapshots the sites are lined up in one table, columns in order.

Bytes are the requested sizes the trace records (torch.cuda.max_memory_allocated() counts the allocator's rounded
blocks: up to ~1 MiB more per large block), and a block stays alive until its free completes (as in torch's
MemoryViz; the allocator's own counter drops at the free request). The peak found is the window's: when the window
(the last N events) does not reach back to the run's peak, it is lower; the report prints the window's event count.
"""

from __future__ import annotations

import argparse
import pickle
import sys
from collections import defaultdict
from typing import Dict, List, Optional, Sequence, Tuple

# innermost frame from these paths names the site (in order of preference)
SITE_PATHS = ("fp8flow_megatron", "megatron", "transformer_engine")
BEFORE_WINDOW = "(before the trace window)"


def frame_site(frames: Optional[Sequence[dict]]) -> str:
    """'path:line function' of the innermost frame in any of SITE_PATHS (else of the innermost frame; frames[0] is
    innermost, as torch records them): megatron's code called from this package's is megatron's site, this package's
    kernels called from megatron are ours."""
    if not frames:
        return "(no stack recorded)"
    for f in frames:
        name = str(f.get("filename", ""))
        for key in SITE_PATHS:
            if key in name:
                return _fmt(f, key)
    # C++ only (autograd's engine thread runs built-in backward ops with no Python stack): the innermost autograd
    # node names the op that allocated (e.g. torch::autograd::generated::MmBackward0::apply), else the innermost
    # frame outside the allocator and the stack unwinder
    for f in frames:
        if "autograd::" in str(f.get("name", "")) and "autograd::Engine" not in str(f.get("name", "")):
            return _fmt(f, None)
    for f in frames:
        if not str(f.get("name", "")).startswith(_CPP_BOILERPLATE):
            return _fmt(f, None)
    return _fmt(frames[0], None)


_CPP_BOILERPLATE = ("torch::unwind", "torch::CapturedTraceback", "c10::cuda::CUDACachingAllocator", "c10::",
                    "torch::cuda::", "??")  # fmt: skip


def _fmt(f: dict, key: Optional[str]) -> str:
    name = str(f.get("filename", "?"))
    if key and key in name:
        name = name[name.rindex(key):]
    else:
        name = name.rsplit("/", 1)[-1]
    return f"{name}:{f.get('line', '?')} {f.get('name', '?')}"


def _live_blocks(snapshot: dict, device: int) -> Dict[int, Tuple[int, Optional[list]]]:
    """addr -> (requested bytes, allocation frames) of every block allocated when the snapshot was taken."""
    live = {}
    for seg in snapshot.get("segments", []):
        if seg.get("device", 0) != device:
            continue
        for blk in seg.get("blocks", []):
            if blk.get("state") in ("active_allocated", "active_pending_free"):
                # requested bytes, as the trace events count them (a block's "size" is rounded up)
                live[blk["address"]] = (blk.get("requested_size", blk["size"]), blk.get("frames") or [])
    return live


def peak_state(snapshot: dict, device: int = 0):
    """(peak bytes, {addr: (size, frames)} alive at the peak, end bytes, events in the window) within the trace.

    Backwards from the snapshot's state: an 'alloc' event did not exist before it (removed), a 'free_completed' did
    (added back, with the frames of its alloc when the alloc is in the window)."""
    traces = snapshot.get("device_traces", [])
    events = traces[device] if device < len(traces) else []
    alloc_frames, open_allocs = {}, {}
    for i, ev in enumerate(events):  # pair each completed free with its alloc (for the frames)
        if ev["action"] == "alloc":
            open_allocs[ev["addr"]] = ev.get("frames") or []
        elif ev["action"] == "free_completed":
            alloc_frames[i] = open_allocs.pop(ev["addr"], None)
    live = _live_blocks(snapshot, device)
    total = end = sum(size for size, _ in live.values())
    best, best_i = total, len(events)  # index i: the state before event i (len: the snapshot's own state)
    for i in range(len(events) - 1, -1, -1):
        ev = events[i]
        if ev["action"] == "alloc":
            total -= ev["size"]
        elif ev["action"] == "free_completed":
            total += ev["size"]
        else:
            continue
        if total > best:
            best, best_i = total, i
    # replay to best_i
    live = dict(live)
    for i in range(len(events) - 1, best_i - 1, -1):
        ev = events[i]
        if ev["action"] == "alloc":
            live.pop(ev["addr"], None)
        elif ev["action"] == "free_completed":
            live[ev["addr"]] = (ev["size"], alloc_frames.get(i))  # None: allocated before the window
    return best, live, end, len(events)


def by_site(live: Dict[int, Tuple[int, Optional[list]]]) -> Dict[str, Tuple[int, int]]:
    """site -> (bytes, blocks). A block freed in the window whose alloc came before it is BEFORE_WINDOW; one
    allocated without a recorded stack (e.g. by autograd's C++ ops in backward, with Python-only stacks) is
    "(no stack recorded)"."""
    out: Dict[str, List[int]] = defaultdict(lambda: [0, 0])
    for size, frames in live.values():
        site = BEFORE_WINDOW if frames is None else frame_site(frames)
        out[site][0] += size
        out[site][1] += 1
    return {k: (v[0], v[1]) for k, v in out.items()}


def report(snapshots: Sequence[dict], labels: Sequence[str], top: int = 25, device: int = 0) -> str:
    """A markdown table: GB at each snapshot's window peak per allocation site (sites ordered by their largest
    difference to the first snapshot, then by size), and a totals row."""
    results = [peak_state(s, device) for s in snapshots]
    sites = [by_site(live) for _, live, _, _ in results]
    names = set().union(*sites) if sites else set()

    def gb(site, j):
        return sites[j].get(site, (0, 0))[0] / 1e9

    order = sorted(names, key=lambda s: (-max(abs(gb(s, j) - gb(s, 0)) for j in range(len(sites))),
                                         -max(gb(s, j) for j in range(len(sites)))))  # fmt: skip
    lines = ["| allocation site | " + " | ".join(f"{lab} GB" for lab in labels) + " |",
             "|---|" + "---|" * len(labels)]  # fmt: skip
    shown = order[:top]
    for site in shown:
        lines.append(f"| {site} | " + " | ".join(f"{gb(site, j):.3f}" for j in range(len(sites))) + " |")
    rest = [sum(sites[j].get(s, (0, 0))[0] for s in order[top:]) / 1e9 for j in range(len(sites))]
    if order[top:]:
        lines.append(f"| ({len(order) - top} other sites) | " + " | ".join(f"{r:.3f}" for r in rest) + " |")
    lines.append("| **total at the window's peak** | " + " | ".join(f"**{r[0] / 1e9:.3f}**" for r in results) + " |")
    lines.append("| allocated when the snapshot was taken | " + " | ".join(f"{r[2] / 1e9:.3f}" for r in results) + " |")
    lines.append("| alloc/free events in the window | " + " | ".join(str(r[3]) for r in results) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("snapshots", nargs="+")
    p.add_argument("--label", action="append", default=None, help="a column name per snapshot (default: file name)")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--device", type=int, default=0)
    args = p.parse_args(argv)
    labels = args.label or [s.rsplit("/", 1)[-1].rsplit(".", 1)[0] for s in args.snapshots]
    if len(labels) != len(args.snapshots):
        p.error(f"--label given {len(labels)} times for {len(args.snapshots)} snapshots: give one per snapshot")
    snaps = []
    for path in args.snapshots:
        with open(path, "rb") as f:
            snaps.append(pickle.load(f))
    print(report(snaps, labels, args.top, args.device))
    return 0


if __name__ == "__main__":
    sys.exit(main())
