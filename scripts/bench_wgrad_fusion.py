"""Expert wgrad with and without megatron's gradient_accumulation_fusion, on one DeepSeek-V2-Lite MoE layer wrapped in
megatron's DistributedDataParallel (bf16 parameters, fp32 main_grad), side by side in one process.

    source .gpu-bundle/setup.sh && python scripts/bench_wgrad_fusion.py [--tokens 16384] [--micro-batches 4] [--iters 10]
        [--variants bf16,fp8flow_triton,fp8flow_te]

A step is what megatron's train_step does to this layer: zero_grad_buffer, the first micro-batch marks a new step (the
FP8 weights are quantized), --micro-batches fwd+bwd (no_sync), finish_grad_sync. Fused: the FP8-Flow experts add their
fp32 weight gradients straight into main_grad; unfused: they make a bf16 [E, N, K] gradient per linear and
micro-batch, added into main_grad right after that linear's wgrad (ops/experts.py wgrad_into_main_grad, the add DDP's
hook would otherwise do after the whole backward). Reported: median step time (CUDA events), peak memory above the
resident tensors, and the relative L2 difference of the experts' main_grad from the fused run's.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import bench_moe_layer as layer_bench  # noqa: E402


def build(variant: str, fuse: bool, state, args):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    layer, fp8 = layer_bench.build_layer(variant, args)
    layer.load_state_dict(state, strict=False)
    layer.config.gradient_accumulation_fusion = fuse
    for m in layer.modules():  # read at construction: set on the built experts (and TE's linears) too
        if hasattr(m, "fuse_wgrad_accumulation"):
            m.fuse_wgrad_accumulation = fuse
    ddp = DistributedDataParallel(layer.config, DistributedDataParallelConfig(grad_reduce_in_fp32=True), layer)
    return ddp, layer, fp8


def step(ddp, layer, fp8, xs, g):
    ddp.zero_grad_buffer()
    layer_bench.new_step(layer)
    with ddp.no_sync():
        for x in xs[:-1]:
            _fwd_bwd(layer, fp8, x, g)
    _fwd_bwd(layer, fp8, xs[-1], g)
    ddp.finish_grad_sync()


def _fwd_bwd(layer, fp8, x, g):
    x = x.detach().requires_grad_()
    with layer_bench.fp8_context(fp8):
        y, _ = layer(x)
    y.backward(g)


def expert_main_grads(layer):
    return torch.cat([p.main_grad.float().flatten() for n, p in layer.named_parameters() if n.startswith("experts.")])


def run(variant, fuse, state, xs, g, args):
    ddp, layer, fp8 = build(variant, fuse, state, args)
    for _ in range(2):
        step(ddp, layer, fp8, xs, g)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step(ddp, layer, fp8, xs, g)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    grads = expert_main_grads(layer).clone()
    times = []
    for _ in range(args.iters):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        step(ddp, layer, fp8, xs, g)
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e))
    del ddp, layer
    torch.cuda.empty_cache()
    return {"ms": statistics.median(times), "peak_gib": peak / 2**30, "grads": grads}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=16384, help="tokens per micro-batch")
    ap.add_argument("--micro-batches", type=int, default=4)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--variants", default="bf16,fp8flow_triton,fp8flow_te",
                    help="bench_moe_layer.py variants; bf16 (stock TEGroupedMLP) gives the vs-bf16 column")
    args = ap.parse_args()
    args.ep = 1
    layer_bench.init_distributed(args)
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    parallel_state.initialize_model_parallel(1, 1)
    model_parallel_cuda_manual_seed(0)
    torch.manual_seed(0)
    ref_layer, _ = layer_bench.build_layer("fp32", args)
    state = {k: v for k, v in ref_layer.state_dict().items() if "_extra_state" not in k}
    del ref_layer
    seq = args.tokens // 4
    xs = [torch.randn(seq, 4, layer_bench.HIDDEN, device="cuda").bfloat16() for _ in range(args.micro_batches)]
    g = (torch.randn(seq, 4, layer_bench.HIDDEN, device="cuda") * 1e-2).bfloat16()
    device = torch.cuda.get_device_name(0)
    print(f"### Expert wgrad into main_grad (gradient_accumulation_fusion), {args.micro_batches} micro-batches x "
          f"{args.tokens} tokens, DeepSeek-V2-Lite layer, bf16 + DDP fp32 main_grad — {device}\n")
    print(f"`source .gpu-bundle/setup.sh && python scripts/bench_wgrad_fusion.py --tokens {args.tokens} "
          f"--micro-batches {args.micro_batches} --iters {args.iters}`\n")
    results = {}
    for variant in args.variants.split(","):
        fused = run(variant, True, state, xs, g, args)
        unfused = run(variant, False, state, xs, g, args)
        unfused["diff"] = float((unfused["grads"] - fused["grads"]).norm() / fused["grads"].norm())
        fused["diff"] = 0.0
        results[variant] = {"on": fused, "off": unfused}
        print(f"{variant}: fused {fused['ms']:.2f} ms, unfused {unfused['ms']:.2f} ms", flush=True)
    # bf16 (stock TEGroupedMLP, TE's own fuse_wgrad_accumulation) is the baseline a Megatron user compares against
    base = results.get("bf16")
    print("\n| engine | fusion | step ms (median) | vs unfused | vs bf16 (same fusion) | peak GiB above resident | "
          "main_grad rel diff vs fused |")
    print("|---|---|---|---|---|---|---|")
    for variant, rows in results.items():
        for name, r in rows.items():
            vs_bf16 = f"{base[name]['ms'] / r['ms']:.2f}x" if base else "-"
            print(f"| {variant} | {name} | {r['ms']:.2f} | {rows['off']['ms'] / r['ms']:.2f}x | {vs_bf16} | "
                  f"{r['peak_gib']:.2f} | {r['diff']:.2e} |")


if __name__ == "__main__":
    main()
