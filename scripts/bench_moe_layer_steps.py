"""Training-step timing and the CUDA-graph variants of scripts/bench_moe_layer.py (split out to keep it under 600 lines).

A step, as megatron's schedule runs it: the step signal (set_is_first_microbatch: every FP8 weight cache --
TE's, FP8-Flow's -- quantizes anew) once, then N micro-batches of fwd+bwd, gradients accumulating.
`--microbatches 1,8` times steps of N = 1 and N = 8 per variant; each row reports, per step and per micro-batch:
  wall ms     CUDA events around the step (median over --iters steps)
  host ms     host time to issue the step: from the first launch to the return of the last backward, before the
              synchronize (median); wall ~ host means the step is host-issue bound
  kernel ms   sum of the CUDA kernels' device time in one step (torch.profiler); wall - kernel is the idle GPU time
`--cuda-graph` adds `<variant>_graph` after each FP8-Flow variant that supports capture (EP=1, Triton GEMM engine, no
expert recompute: fp8flow at EP=1 with 64 experts resolves to Triton, and fp8flow_triton): the same layer with
--moe-fp8-flow-cuda-graph (megatron/cuda_graph.py), captured at its second training call (inside the bench's
warm-up) and checked against the fp32 reference like every variant.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable, Dict, List, Sequence

import torch

GRAPH = "_graph"  # variant suffix: the same variant with --moe-fp8-flow-cuda-graph
WARMUP_STEPS = 2


def supports_graph(variant: str, ep: int) -> bool:
    """Whether <variant>_graph exists: FP8-Flow at EP=1 on the Triton engine, without expert recompute."""
    if ep != 1 or not variant.startswith("fp8flow") or "recomp" in variant or variant.endswith(GRAPH):
        return False
    return not variant.endswith(("_te", "_te_grouped"))  # "fp8flow" (auto) resolves to Triton with 64 local experts


def with_graph_variants(variants: Sequence[str], ep: int) -> List[str]:
    """The variant list with <variant>_graph right after each variant that supports capture."""
    return [w for v in variants for w in ([v, v + GRAPH] if supports_graph(v, ep) else [v])]


def parse_microbatches(text: str) -> List[int]:
    values = [int(v) for v in text.split(",") if v.strip()]
    if not values or any(v < 1 for v in values):
        raise SystemExit(f"--microbatches {text!r}: give positive counts, e.g. 1,8")
    return values


def make_step(new_step: Callable, fwd_bwd: Callable, layer, fp8, x, g, microbatches: int) -> Callable[[], None]:
    """One training step of `microbatches` fwd+bwd with one weight re-quantization (the step signal) first."""

    def step() -> None:
        new_step(layer)
        for _ in range(microbatches):
            fwd_bwd(layer, fp8, x, g, mark_step=False)

    return step


def time_steps(step: Callable[[], None], iters: int) -> Dict[str, float]:
    """Median wall (CUDA events) and host-issue (perf_counter, before the sync) time of a step, in ms."""
    for _ in range(WARMUP_STEPS):
        step()
    torch.cuda.synchronize()
    wall, host = [], []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        t0 = time.perf_counter()
        step()
        host.append((time.perf_counter() - t0) * 1e3)
        end.record()
        torch.cuda.synchronize()
        wall.append(start.elapsed_time(end))
    return {"wall_ms": statistics.median(wall), "host_ms": statistics.median(host)}


def kernel_ms(step: Callable[[], None]) -> float:
    """Device time of every CUDA kernel (and memcpy/memset) of one step, summed (torch.profiler; NCCL ranges
    excluded as in bench_moe_layer.profile_kernels). Kernels replayed from a CUDA graph are reported per kernel by
    CUPTI on CUDA 12+; an older stack reports none for them (then the column reads ~0 for _graph variants)."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    events = [e for e in prof.events()
              if e.device_type == torch.autograd.DeviceType.CUDA and not e.name.startswith("nccl:")]  # fmt: skip
    return sum(e.device_time for e in events) / 1e3


def measure_steps(new_step, fwd_bwd, layer, fp8, x, g, microbatches: Sequence[int], iters: int) -> Dict[int, dict]:
    """{N: {wall_ms, host_ms, kernel_ms}} per step for each micro-batch count N."""
    out = {}
    for n in microbatches:
        step = make_step(new_step, fwd_bwd, layer, fp8, x, g, n)
        row = time_steps(step, iters)
        row["kernel_ms"] = kernel_ms(step)
        out[n] = row
    return out


def format_steps_table(results: dict, args) -> str:
    """Markdown: one row per (variant, N), per step and per micro-batch, with ratios to bf16 and to the eager twin."""
    device = torch.cuda.get_device_name(0)
    counts = sorted({n for res in results.values() for n in res.get("steps", {})})
    if not counts:
        return ""
    command = (f"python scripts/bench_moe_layer.py --variants {args.variants} --microbatches {args.microbatches_text} "
               f"--iters {args.iters} --tokens {args.tokens}" + (" --cuda-graph" if args.cuda_graph else ""))
    header = ["variant", "micro-batches N", "step ms (wall)", "per micro-batch ms", "host issue ms / step",
              "kernel ms / step", "wall - kernel ms", "vs BF16", "vs eager twin"]
    lines = [f"### MoE layer training steps (one weight re-quantization + N fwd+bwd), {args.tokens} tokens per "
             f"micro-batch, EP={args.ep} — {device}", "", f"`source .gpu-bundle/setup.sh && {command}`", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for n in counts:
        bf16 = results.get("bf16", {}).get("steps", {}).get(n)
        for variant, res in results.items():
            row = res.get("steps", {}).get(n)
            if row is None:
                continue
            twin = results.get(variant.removesuffix(GRAPH), {}).get("steps", {}).get(n) if variant.endswith(GRAPH) else None
            cells = [variant, str(n), f"{row['wall_ms']:.2f}", f"{row['wall_ms'] / n:.2f}", f"{row['host_ms']:.2f}",
                     f"{row['kernel_ms']:.2f}", f"{row['wall_ms'] - row['kernel_ms']:.2f}",
                     f"{bf16['wall_ms'] / row['wall_ms']:.2f}x" if bf16 else "-",
                     f"{twin['wall_ms'] / row['wall_ms']:.2f}x" if twin else "-"]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
