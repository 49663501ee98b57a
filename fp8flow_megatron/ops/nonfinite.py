"""The non-finite guard: every FP8-Flow quantizer raises a flag in device memory when its input holds an inf or NaN,
and the trainer reads all flags once per iteration.

Why: E4M3 has no infinity, so the quantizers saturate ±inf to ±448 and encode NaN like any other value; after the
cast nothing downstream (megatron's NaN check of the loss included) can tell where the first inf or NaN came from, or
that one came at all. The quantizers already compute each block's amax, which says whether the block is finite, so
raising a flag costs no extra pass over the data and no host sync (kernels/quantize.py: one atomic per program that
saw one; numerics/format.py's mark_nonfinite in the spec).

Sites (one int32 slot per (site, direction), "layer{N}/{site}" as in ops/telemetry.py):
  forward:  tokens (cast #1, before dispatch), fc1_weight / fc2_weight (the 128x128 weight quantization, on the
            first micro-batch of each step), swiglu_out (the fc2 input; also its recompute)
  backward: combine_grad (cast #2), expert_out_grad (only for callers that hand the experts a BF16 gradient),
            dswiglu_out (the fc1 output gradient)
What a check covers: everything quantized since the previous check -- all micro-batches of the iteration, their
backward passes and recompute (the slots are OR-ed, never cleared by a quantizer). With several processes every rank
joins one all-reduce (MAX over the world) inside check(), so all ranks raise together, each naming the sites it saw
(or the rank that saw them), instead of one rank stopping while its peers wait in the next collective.

FP8FLOW_NONFINITE_GUARD=0 in the environment (or `guard.enabled = False`) turns the flags off -- for measuring what
they cost (scripts/bench_moe_layer.py); the product keeps them on.
"""

from __future__ import annotations

import os
from typing import Dict, List, Optional, Tuple

import torch

from .telemetry import split_site

DIRECTIONS = ("forward", "backward")
ENV_SWITCH = "FP8FLOW_NONFINITE_GUARD"
# Order in which a step meets the sites (per layer: forward in layer order, then backward in reverse layer order), so
# the first site listed in an error is the earliest one that saw an inf or NaN -- usually where it entered.
_FORWARD_ORDER = ("tokens", "fc1_weight", "fc2_weight", "swiglu_out")
_BACKWARD_ORDER = ("expert_out_grad", "combine_grad", "dswiglu_out")
_INITIAL_SLOTS = 256


class NonfiniteGuard:
    """Registry of the flag slots and the once-per-iteration check. One instance (`guard`) serves the process."""

    def __init__(self) -> None:
        self.enabled = os.environ.get(ENV_SWITCH, "1").strip().lower() not in ("0", "off", "false", "no")
        self._slot: Dict[Tuple[str, str], int] = {}  # (site, direction) -> slot
        self._names: List[Tuple[str, str]] = []  # slot -> (site, direction)
        self._buffers: Dict[torch.device, torch.Tensor] = {}  # device -> int32 [capacity], 1 where flagged
        self._views: Dict[Tuple[str, str, torch.device], torch.Tensor] = {}

    def flag(self, site: str, direction: str, device) -> Optional[torch.Tensor]:
        """The int32 [1] view (on `device`) that the quantizer at (site, direction) raises; None while disabled.

        Fetch it right before each quantization and do not keep it: a buffer that runs out of slots is replaced by
        a larger one (its flags copied, in stream order)."""
        if not self.enabled:
            return None
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:  # "cuda" and "cuda:0" must share one buffer
            device = torch.device("cuda", torch.cuda.current_device())
        view = self._views.get((site, direction, device))
        if view is not None:
            return view
        if direction not in DIRECTIONS:
            raise ValueError(f"nonfinite guard: direction must be one of {DIRECTIONS}, got {direction!r}")
        slot = self._slot.get((site, direction))
        if slot is None:
            slot = self._slot[(site, direction)] = len(self._names)
            self._names.append((site, direction))
        view = self._buffer(device)[slot : slot + 1]
        self._views[(site, direction, device)] = view
        return view

    def _buffer(self, device: torch.device) -> torch.Tensor:
        buf = self._buffers.get(device)
        need = len(self._names)
        if buf is not None and buf.numel() >= need:
            return buf
        capacity = max(_INITIAL_SLOTS, 2 * need)
        grown = torch.zeros(capacity, dtype=torch.int32, device=device)
        if buf is not None:
            grown[: buf.numel()].copy_(buf)  # flags raised before the growth are kept
            self._views = {k: v for k, v in self._views.items() if k[2] != device}
        self._buffers[device] = grown
        return grown

    def buffer_address(self, device) -> int:
        """The address of the flag buffer on `device` (0 if none yet): a CUDA graph captured while the guard is on
        raises flags at this address, so it is valid only while the buffer has not grown into a new one."""
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        buf = self._buffers.get(device)
        return 0 if buf is None else buf.data_ptr()

    # --------------------------------------------------------------------------------------------------- check
    def check(self, iteration: int, phase: str = "training", group=None, collective: bool = True) -> None:
        """Raise FloatingPointError if any quantizer met an inf or NaN since the last check, then clear the flags.

        Call it once per iteration, on every rank, where the loop reads the loss (that read synchronizes anyway):
        one device->host copy of the flags, plus, when torch.distributed is initialized, one all-reduce (MAX) of two
        int32 over `group` (default: the world), so that every rank raises together. iteration: named in the message
        (1-based, as logged); phase: "training", or "evaluation" for a check after an evaluation. collective=False:
        this rank's flags only, no collective -- for a rank that is failing already (its peers may not be checking).
        """
        initialized = torch.distributed.is_available() and torch.distributed.is_initialized()
        distributed = collective and initialized
        if not self._buffers and not distributed:
            return
        device, on_device = self._check_device(distributed, group)
        flags = self._flags_on(device)
        local = flags.amax().view(1) if flags.numel() else torch.zeros(1, dtype=torch.int32, device=device)
        rank = torch.distributed.get_rank() if initialized else 0
        # [any rank flagged, highest flagged rank + 1]: one MAX reduction also names a rank to the ranks that saw none
        status = torch.cat([local, local * (rank + 1)])
        if distributed and on_device:
            torch.distributed.all_reduce(status, op=torch.distributed.ReduceOp.MAX, group=group)
        host = torch.cat([status, flags]).cpu()  # the one device->host copy (and sync)
        status_host, flags_host = host[:2].clone(), host[2:]
        if distributed and not on_device:  # gloo: reduce the host copy, no second sync
            torch.distributed.all_reduce(status_host, op=torch.distributed.ReduceOp.MAX, group=group)
        if int(status_host[0]) == 0:
            return
        self.reset()
        seen = [self._names[i] for i in flags_host.nonzero().flatten().tolist()]
        flagged_rank = int(status_host[1]) - 1
        raise FloatingPointError(_message(seen, iteration, phase, flagged_rank, rank if initialized else None))

    def _check_device(self, distributed: bool, group) -> Tuple[torch.device, bool]:
        """(device the check works on, whether the all-reduce runs there): NCCL reduces CUDA tensors, gloo host ones."""
        nccl = distributed and "nccl" in str(torch.distributed.get_backend(group))
        if self._buffers:
            device = next(iter(self._buffers))
        elif nccl:  # a rank that quantized nothing (yet) still joins the collective
            device = torch.device("cuda", torch.cuda.current_device())
        else:
            device = torch.device("cpu")
        return device, nccl and device.type == "cuda"

    def _flags_on(self, device: torch.device) -> torch.Tensor:
        """int32 [number of slots] on `device`: each slot OR-ed over the devices this process quantized on (one in
        practice; a buffer made before later slots were registered is shorter and lacks them)."""
        n = len(self._names)
        parts = [b[: min(n, b.numel())].to(device) for b in self._buffers.values()]
        if len(parts) == 1 and parts[0].numel() == n:
            return parts[0]
        flags = torch.zeros(n, dtype=torch.int32, device=device)
        for p in parts:
            flags[: p.numel()] = torch.maximum(flags[: p.numel()], p)
        return flags

    def reset(self) -> None:
        """Clear every flag (no check). For tests and for loops that recover from a caught error."""
        for b in self._buffers.values():
            b.zero_()


def _order(name: Tuple[str, str]):
    site, direction = name
    layer, what = split_site(site)
    digits = "".join(c for c in (layer or "") if c.isdigit())
    number = int(digits) if digits else -1
    if direction == "forward":
        rank = _FORWARD_ORDER.index(what) if what in _FORWARD_ORDER else len(_FORWARD_ORDER)
        return (0, number, rank, site)
    rank = _BACKWARD_ORDER.index(what) if what in _BACKWARD_ORDER else len(_BACKWARD_ORDER)
    return (1, -number, rank, site)


def describe(site: str, direction: str) -> str:
    """'layer3/swiglu_out', 'forward' -> "'swiglu_out' of MoE layer3 in the forward pass"."""
    layer, what = split_site(site)
    return f"'{what}'" + (f" of MoE {layer}" if layer else "") + f" in the {direction} pass"


def _message(seen, iteration: int, phase: str, flagged_rank: int, rank: Optional[int]) -> str:
    when = f"iteration {iteration}" if phase == "training" else f"the {phase} after iteration {iteration}"
    hint = (
        "FP8 cannot represent them (inf saturates to ±448, NaN is encoded silently), so the run stops here. Check the "
        "learning rate / loss scale and the data, or run with --no-moe-fp8-flow to see whether the model diverges "
        "without FP8."
    )
    if not seen:  # another rank saw it; every rank raises so that none waits in a collective
        return (
            f"fp8flow: non-finite values (inf or NaN) reached an FP8 quantizer on rank {flagged_rank} during {when}; "
            f"that rank's error names the layer, site and pass. {hint}"
        )
    first, *rest = sorted(seen, key=_order)
    where = f" on rank {rank}" if rank is not None else ""
    msg = f"fp8flow: non-finite values (inf or NaN) reached the FP8 quantizer at {describe(*first)} of {when}{where}"
    if rest:
        msg += "; also at " + ", ".join(describe(*n) for n in sorted(rest, key=_order))
    return f"{msg}. {hint}"


guard = NonfiniteGuard()
