"""Gradient accumulation over micro-batches in bf16 (CPU): with megatron's gradient_accumulation_fusion the FP8-Flow
experts add their weight gradients straight into the fp32 main_grad of megatron's DDP, so 4 micro-batches sum in fp32.

Stated tolerance, relative L2 against the fp64 sum of each micro-batch's own fp32 weight gradient:
  fused (main_grad accumulation)         <= 1e-6 (fp32 summation order only; measured 0 to ~1e-7)
  unfused (bf16 .grad per micro-batch)   <= 1e-2 (each micro-batch's gradient rounded to bf16 first: ~2^-9)
The fused path also runs with --overlap-grad-reduce, whose DDP hook asserts that every parameter got a gradient.
Unfused, each linear's bf16 gradients are added into main_grad inside backward (ops/experts.py,
wgrad_into_main_grad, so they do not outlive their linear): bit-identical to DDP's hook adding the returned .grad.
"""

import torch

from .mcore_env import init_megatron, moe_config, moe_layer, spawn

MICRO_BATCHES = 4


def _ddp_layer(fuse: bool, overlap: bool, seed: int = 5):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    torch.manual_seed(seed)
    config = moe_config(True, num_experts=4, topk=2, params_dtype=torch.bfloat16, bf16=True)
    config.gradient_accumulation_fusion = fuse
    layer = moe_layer(config).to(torch.bfloat16)
    ddp = DistributedDataParallel(
        config, DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=overlap), layer
    )
    return ddp, layer


def _micro_batch(i: int):
    g = torch.Generator().manual_seed(100 + i)
    x = torch.randn(16, 2, 128, generator=g).to(torch.bfloat16)
    w = torch.randn(16, 2, 128, generator=g).to(torch.bfloat16)
    return x, w


def _run(ddp, micro_batches, no_sync: bool):
    ddp.zero_grad_buffer()
    for n, i in enumerate(micro_batches):
        x, w = _micro_batch(i)
        last = n == len(micro_batches) - 1
        ctx = ddp.no_sync() if (no_sync and not last) else torch.enable_grad()
        with ctx:
            y, _ = ddp(x)
            (y.float() * w.float()).sum().backward()
    ddp.finish_grad_sync()


def _expert_main_grads(layer):
    experts = layer.experts
    return [
        getattr(getattr(experts, linear), f"weight{e}").main_grad.double().clone()
        for linear in ("linear_fc1", "linear_fc2")
        for e in range(experts.num_local_experts)
    ]


def _rel(got, ref):
    return max(float((g - r).norm() / r.norm().clamp_min(1e-30)) for g, r in zip(got, ref))


def _worker(rank, world_size, port):
    init_megatron(rank, world_size, port, ep=1, seed=7)
    # reference: each micro-batch's fp32 weight gradient on its own (one micro-batch into a zeroed main_grad), summed
    # in fp64
    ddp, layer = _ddp_layer(fuse=True, overlap=False)
    ref = None
    for i in range(MICRO_BATCHES):
        _run(ddp, [i], no_sync=False)
        grads = _expert_main_grads(layer)
        ref = grads if ref is None else [r + g for r, g in zip(ref, grads)]
    out, main_grads = {}, {}
    runs = (("fused", True, False, True), ("fused_overlap", True, True, True), ("unfused", False, False, True),
            ("unfused_overlap", False, True, True), ("unfused_hook", False, False, False))  # fmt: skip
    for name, fuse, overlap, early in runs:
        ddp, layer = _ddp_layer(fuse=fuse, overlap=overlap)
        layer.experts.wgrad_into_main_grad = early
        _run(ddp, list(range(MICRO_BATCHES)), no_sync=overlap)
        main_grads[name] = _expert_main_grads(layer)
        out[name] = _rel(main_grads[name], ref)
        weights = [p for n, p in layer.experts.named_parameters()]
        out[f"{name}_grads_dropped"] = all(p.grad is None for p in weights)
        out[f"{name}_flag"] = all(getattr(p, "grad_added_to_main_grad", False) for p in weights)
    # unfused, the early add into main_grad is exactly what DDP's hook does with the returned bf16 .grad
    out["unfused_early_equals_hook"] = all(
        torch.equal(a, b) for name in ("unfused", "unfused_overlap") for a, b in zip(main_grads[name], main_grads["unfused_hook"])
    )
    return out


def test_bf16_gradient_accumulation_sums_expert_wgrad_in_fp32(tmp_path):
    out = spawn(_worker, 1)[0]
    assert out["fused"] <= 1e-6, out
    assert out["fused_overlap"] <= 1e-6, out
    assert out["unfused"] <= 1e-2, out
    # fused: TE's protocol -- the gradient went into main_grad and the DDP hook dropped the dummy .grad
    assert out["fused_flag"] and out["fused_grads_dropped"] and out["fused_overlap_grads_dropped"], out
    assert out["unfused_overlap"] <= 1e-2 and out["unfused_hook"] <= 1e-2, out
    # unfused: the bf16 gradients went into main_grad inside backward (the hook dropped the dummy), bit-identical to
    # the hook adding them; with wgrad_into_main_grad off the hook adds them (and no flag is set)
    assert out["unfused_early_equals_hook"], out
    assert out["unfused_flag"] and out["unfused_grads_dropped"] and out["unfused_overlap_grads_dropped"], out
    assert not out["unfused_hook_flag"] and out["unfused_hook_grads_dropped"], out
