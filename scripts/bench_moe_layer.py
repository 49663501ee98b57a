"""One DeepSeek-V2-Lite MoE layer, forward + backward on one GPU (EP=1): BF16 vs TE blockwise FP8 vs FP8-Flow, side by
side in one process, same weights and inputs.

    source .gpu-bundle/setup.sh && python scripts/bench_moe_layer.py [--tokens 16384] [--iters 20] [--write BENCHMARKS.md]

Variants (megatron-core MoELayer, alltoall dispatcher, 64 experts top-6, moe_ffn 1408, 2 shared experts, hidden 2048):
  bf16            stock TEGroupedMLP, BF16, TE fused permute
  te_blockwise    stock TEGroupedMLP under TE Float8BlockScaling (E4M3) with megatron's Fp8Padding
  fp8flow         FP8FlowMoELayer: FP8 dispatch, fused kernels, TE grouped GEMMs on pre-quantized FP8
  fp8flow_recomp  the same with --moe-expert-recompute
Reported per variant: median fwd+bwd time (CUDA events), peak memory above the resident tensors, activation memory
(allocated after forward), standalone quantize/cast/transpose kernel launches per fwd+bwd (torch.profiler, names
listed), and the relative L2 error of output, input grad, router grad and expert-weight grads vs an fp32 layer.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
from collections import Counter
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# kernels that convert precision or layout outside a GEMM (what the recipe is about); GEMM kernels are excluded
CAST_RE = re.compile(r"quantiz|cast|transpose|dequant|cvt_|_to_fp8|fp8_cast|swiglu_quant", re.I)
GEMM_RE = re.compile(r"gemm|cutlass|xmma|nvjet|cublas|sm90", re.I)


def build_layer(variant: str, args):
    from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec
    from megatron.core.transformer.spec_utils import build_module
    from megatron.core.transformer.transformer_config import TransformerConfig

    from fp8flow_megatron.megatron.spec import fp8flow_moe_spec

    fp32 = variant == "fp32"
    fp8 = variant in ("te_blockwise", "fp8flow", "fp8flow_recomp")
    flow = variant.startswith("fp8flow")
    cfg = TransformerConfig(
        num_layers=1, hidden_size=2048, num_attention_heads=16, ffn_hidden_size=10944, num_moe_experts=64,
        moe_router_topk=6, moe_ffn_hidden_size=1408, moe_shared_expert_intermediate_size=2816,
        moe_router_dtype="fp32", moe_router_pre_softmax=True, moe_router_score_function="softmax",
        moe_aux_loss_coeff=1e-3, moe_router_load_balancing_type="aux_loss", moe_token_dispatcher_type="alltoall",
        moe_grouped_gemm=True, moe_permute_fusion=not flow and not fp32, gated_linear_unit=True, activation_func=F.silu,
        bias_activation_fusion=not fp32, add_bias_linear=False, params_dtype=torch.float32 if fp32 else torch.bfloat16,
        bf16=not fp32, fp8="e4m3" if fp8 else None, fp8_recipe="blockwise" if fp8 else "delayed",
        hidden_dropout=0.0, attention_dropout=0.0, init_method_std=0.006,
    )
    cfg.moe_fp8_flow = flow
    cfg.moe_expert_recompute = variant == "fp8flow_recomp"
    spec = get_moe_module_spec(use_te=True, num_experts=64, moe_grouped_gemm=True)
    if flow:
        spec = fp8flow_moe_spec(spec)
    layer = build_module(spec, config=cfg).cuda()
    return layer, fp8


def fp8_context(enabled: bool):
    import contextlib

    if not enabled:
        return contextlib.nullcontext()
    import transformer_engine.pytorch as te
    from transformer_engine.common.recipe import Float8BlockScaling, Format

    return te.fp8_autocast(enabled=True, fp8_recipe=Float8BlockScaling(fp8_format=Format.E4M3))


def fwd_bwd(layer, fp8, x, g):
    x = x.detach().requires_grad_()
    with fp8_context(fp8):
        y, _ = layer(x)
    y.backward(g)
    return y, x


def grads(layer):
    w1 = torch.cat([p.grad.float().flatten() for n, p in layer.named_parameters() if "experts.linear_fc1.weight" in n])
    w2 = torch.cat([p.grad.float().flatten() for n, p in layer.named_parameters() if "experts.linear_fc2.weight" in n])
    return layer.router.weight.grad.float(), w1, w2


def rel(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def run_variant(variant, state, x, g, ref, args):
    layer, fp8 = build_layer(variant, args)
    missing = layer.load_state_dict(state, strict=False)
    assert not [k for k in missing.missing_keys if "_extra_state" not in k], missing
    xv, gv = x.to(torch.bfloat16), g.to(torch.bfloat16)
    y, xg = fwd_bwd(layer, fp8, xv, gv)  # warm-up (also allocates .grad: resident from here on)
    errs = {"out": rel(y, ref["y"]), "dx": rel(xg.grad, ref["dx"])}
    r, w1, w2 = grads(layer)
    errs.update(drouter=rel(r, ref["drouter"]), dw_fc1=rel(w1, ref["w1"]), dw_fc2=rel(w2, ref["w2"]))
    for _ in range(3):
        fwd_bwd(layer, fp8, xv, gv)
    torch.cuda.synchronize()
    # memory: peak above resident, and what the forward leaves alive for backward
    del y, xg
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    xx = xv.detach().requires_grad_()
    with fp8_context(fp8):
        yy, _ = layer(xx)
    act = torch.cuda.memory_allocated() - base
    yy.backward(gv)
    del yy, xx
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    # time
    times = []
    for _ in range(args.iters):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fwd_bwd(layer, fp8, xv, gv)
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e))
    # kernels
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU], with_stack=False) as prof:
        fwd_bwd(layer, fp8, xv, gv)
        torch.cuda.synchronize()
    if args.profile:
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18, max_name_column_width=70))
    cuda_events = [evt for evt in prof.events() if evt.device_type == torch.autograd.DeviceType.CUDA]
    names = Counter(evt.name for evt in cuda_events)
    kernel_us = Counter()
    for evt in cuda_events:
        kernel_us[evt.name] += evt.device_time
    if args.profile:
        total = sum(kernel_us.values()) / 1e3
        print(f"--- {variant}: {total:.2f} ms of kernel time in one fwd+bwd (wall median {statistics.median(times):.2f} ms)")
        for n, us in kernel_us.most_common(12):
            print(f"    {us / 1e3:7.3f} ms  x{names[n]:4d}  {n[:110]}")
    casts = {n: c for n, c in names.items() if CAST_RE.search(n) and not GEMM_RE.search(n)}
    del layer
    torch.cuda.empty_cache()
    return {
        "ms": statistics.median(times),
        "peak_gib": peak / 2**30,
        "act_gib": act / 2**30,
        "casts": sum(casts.values()),
        "cast_names": casts,
        "errs": errs,
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--variants", default="bf16,te_blockwise,fp8flow,fp8flow_recomp")
    ap.add_argument("--profile", action="store_true", help="print the top kernels by GPU time per variant")
    ap.add_argument("--write", default=None, help="append the table to this markdown file")
    args = ap.parse_args()

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    dist.init_process_group("nccl", rank=0, world_size=1)
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    parallel_state.initialize_model_parallel(1, 1, expert_model_parallel_size=1)
    model_parallel_cuda_manual_seed(0)
    torch.manual_seed(0)

    # fp32 reference and the shared weights / inputs
    ref_layer, _ = build_layer("fp32", args)
    state = {k: v for k, v in ref_layer.state_dict().items() if "_extra_state" not in k}
    seq = args.tokens // 4
    x = torch.randn(seq, 4, 2048, device="cuda")
    g = torch.randn(seq, 4, 2048, device="cuda") * 1e-2
    y, xg = fwd_bwd(ref_layer, False, x, g)
    r, w1, w2 = grads(ref_layer)
    ref = {"y": y.detach(), "dx": xg.grad, "drouter": r, "w1": w1, "w2": w2}
    del ref_layer
    torch.cuda.empty_cache()

    results = {}
    for variant in args.variants.split(","):
        results[variant] = run_variant(variant, state, x, g, ref, args)
        print(f"{variant}: done ({results[variant]['ms']:.2f} ms)", flush=True)

    bf16 = results.get("bf16")
    lines = [
        f"### MoE layer fwd+bwd, DeepSeek-V2-Lite shapes, {args.tokens} tokens, EP=1 — {torch.cuda.get_device_name(0)}",
        "",
        f"`source .gpu-bundle/setup.sh && python scripts/bench_moe_layer.py --tokens {args.tokens} --iters {args.iters}`",
        "",
        "| variant | median ms | vs BF16 | peak GiB (above resident) | activation GiB | vs BF16 act | standalone cast/quant/transpose launches | rel err out | dx | d router | dW fc1 | dW fc2 |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for v, res in results.items():
        e = res["errs"]
        speed = f"{bf16['ms'] / res['ms']:.2f}x" if bf16 else "-"
        act = f"{res['act_gib'] / bf16['act_gib']:.2f}x" if bf16 else "-"
        lines.append(
            f"| {v} | {res['ms']:.2f} | {speed} | {res['peak_gib']:.2f} | {res['act_gib']:.2f} | {act} | {res['casts']} | "
            f"{e['out']:.2e} | {e['dx']:.2e} | {e['drouter']:.2e} | {e['dw_fc1']:.2e} | {e['dw_fc2']:.2e} |"
        )
    lines.append("")
    lines.append("Standalone conversion kernels per fwd+bwd (name: launches):")
    lines.append("")
    for v, res in results.items():
        listed = ", ".join(f"`{n[:80]}`: {c}" for n, c in sorted(res["cast_names"].items(), key=lambda t: -t[1])) or "none"
        lines.append(f"- {v}: {listed}")
    table = "\n".join(lines)
    print(table)
    if args.write:
        with open(args.write, "a") as f:
            f.write("\n" + table + "\n")


if __name__ == "__main__":
    main()
