"""One DeepSeek-V2-Lite MoE layer, forward + backward: BF16 vs TE blockwise FP8 vs FP8-Flow, side by side in one run,
same weights and inputs. EP=1 on one GPU, or experts spread over N GPUs of one host (EP=N, one process per GPU).

    source .gpu-bundle/setup.sh && python scripts/bench_moe_layer.py [--tokens 16384] [--iters 20] [--write BENCHMARKS.md]
    source .gpu-bundle/setup.sh && torchrun --nproc-per-node 8 scripts/bench_moe_layer.py --ep 8 [--tokens 16384] \
        [--iters 20] [--write BENCHMARKS.md]
    source .gpu-bundle/setup.sh && python scripts/bench_moe_layer.py --variants bf16,te_blockwise,fp8flow_triton \
        --cuda-graph --microbatches 1,8 --iters 10      # training steps, and the CUDA-graphed FP8-Flow layer

Variants (megatron-core MoELayer, alltoall dispatcher, 64 experts top-6, moe_ffn 1408, 2 shared experts, hidden 2048):
  bf16            stock TEGroupedMLP, BF16, TE fused permute
  te_blockwise    stock TEGroupedMLP under TE Float8BlockScaling (E4M3) with megatron's Fp8Padding
  fp8flow         FP8FlowMoELayer: FP8 dispatch, fused kernels, the default GEMM engine (--moe-fp8-flow-gemm auto:
                  TE's grouped GEMM with <= 32 local experts, i.e. EP >= 2 here, else the single-launch Triton kernels)
  fp8flow_recomp  the same with --moe-expert-recompute
  fp8flow_transient_wt (_triton, ...)  the same with --disable-parameter-transpose-cache: no FP8 weight copy
                  held, each GEMM's codes made right before it (weights quantized twice per linear per fwd+bwd)
  fp8flow_triton, fp8flow_te (and fp8flow_recomp_triton / _te)  an engine forced: the Triton kernels, or TE's
                  grouped GEMM on the pre-quantized FP8
  <fp8flow variant>_graph  --cuda-graph: the same layer with --moe-fp8-flow-cuda-graph (EP=1, Triton engine, no
                  expert recompute), captured at its second call; --microbatches N[,M]: per-step tables of one weight
                  re-quantization + N fwd+bwd with wall, host-issue and kernel time (scripts/bench_moe_layer_steps.py)
  fp8flow_te_grouped, fp8flow_recomp_te_grouped  the te_grouped engine: TE's single-launch grouped-tensor GEMM on the
                  pre-quantized FP8, counts on the device; needs Hopper and a run-time cuBLASLt >= 13.6 (LD_PRELOAD
                  one), skipped with te_grouped_support()'s reason otherwise
  <any fp8flow variant>_noguard  the same with the non-finite guard off (FP8FLOW_NONFINITE_GUARD=0: no flag is passed
                  to the quantizers); --guard-ab adds one per fp8flow variant and reports the guard's cost
Every timed fwd+bwd is a training step of one micro-batch: the FP8 weight caches (TE's, FP8-Flow's) are marked stale
first, as megatron's schedule does, so weight quantization is counted (--frozen-weights: quantized once, as in the
tables before 2026-12-01).
The non-finite guard (ops/nonfinite.py) is on in every fp8flow variant without _noguard, as in training: the flags
are raised inside the timed fwd+bwd, and guard.check() -- once per step in training, where the loss is read -- runs
after each timed call, outside the CUDA events, timed on the host (check µs).
Reported per variant: median fwd+bwd time (CUDA events), resident memory (parameters, grads, FP8 weight caches,
inputs) and the peak above it, activation memory
(allocated after forward), standalone quantize/cast/transpose kernel launches per fwd+bwd (torch.profiler, names
listed), and the relative L2 error of output, input grad, router grad and expert-weight grads vs an fp32 layer.
--memory-snapshot DIR adds what is alive at each variant's peak per allocation site (the allocator's history from the
layer's build to the memory measurement, scripts/memory_at_peak.py), the variants side by side.

EP=N (--ep N under torchrun, N in 2, 4, 8, ...; megatron expert_model_parallel_size=N over NCCL, TP=PP=1): each rank
holds 64/N experts and --tokens tokens (tokens are per GPU). Times and peak memory are the maximum over ranks (the
slowest rank sets the step). Added columns:
  a2a ms          NCCL all-to-all kernel time per fwd+bwd (torch.profiler, kernels named SendRecv / AllToAll; the
                  other NCCL kernels -- the split-size all-gather -- are listed under the table), max over ranks. It
                  includes the time a rank waits inside the kernel for its peers.
  a2a MB/rank     bytes handed to all-to-all per fwd+bwd (forward dispatch + combine + backward), mean over ranks; the
                  local chunk of each exchange counts too, so this is an upper bound on the bytes on the wire.
  dispatch vs BF16  forward dispatch bytes (tokens, FP8 scales, probs) relative to the bf16 variant (target <= 0.53x)
The fp32 reference is an EP=N fp32 layer with the same weights: every parameter comes from a generator seeded by its
global name (routed expert i of rank r is global expert r * 64/N + i), so the model does not depend on N. Rank r's
tokens come from seed 1000 + r. Errors are over the global batch: output and input grad over all ranks' tokens, the
router grad summed over ranks (what the data-parallel reduction would give), expert-weight grads concatenated.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import re
import statistics
import sys
import zlib
from collections import Counter
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
from bench_moe_layer_steps import GRAPH, format_steps_table, measure_steps, parse_microbatches, with_graph_variants  # noqa: E402

# kernels that convert precision or layout outside a GEMM (what the recipe is about); GEMM kernels are excluded
CAST_RE = re.compile(r"quantiz|cast|transpose|dequant|cvt_|_to_fp8|fp8_cast|swiglu_quant", re.IGNORECASE)
GEMM_RE = re.compile(r"gemm|cutlass|xmma|nvjet|cublas|sm90", re.IGNORECASE)
# NCCL implements all_to_all_single as grouped send/recv: its kernel is ncclDevKernel_SendRecv
A2A_RE = re.compile(r"SendRecv|AllToAll|all_to_all", re.IGNORECASE)
NCCL_RE = re.compile(r"nccl", re.IGNORECASE)

NUM_EXPERTS = 64
HIDDEN = 2048
INIT_STD = 0.006
WEIGHT_SEED = 0
INPUT_SEED = 1000
PROFILED_ITERS_EP = 3  # NCCL kernel times vary more than compute: average a few fwd+bwd at EP > 1


def build_layer(variant: str, args):
    from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    from fp8flow_megatron.megatron.compat import build_mlp
    from fp8flow_megatron.megatron.spec import fp8flow_moe_spec

    variant = variant.removesuffix(NOGUARD)  # the guard is switched in run_variant, not in the layer
    graphed = variant.endswith(GRAPH)
    variant = variant.removesuffix(GRAPH)
    fp32 = variant == "fp32"
    fp8 = variant == "te_blockwise" or variant.startswith("fp8flow")
    flow = variant.startswith("fp8flow")
    cfg = TransformerConfig(
        num_layers=1, hidden_size=HIDDEN, num_attention_heads=16, ffn_hidden_size=10944, num_moe_experts=NUM_EXPERTS,
        moe_router_topk=6, moe_ffn_hidden_size=1408, moe_shared_expert_intermediate_size=2816,
        moe_router_dtype="fp32", moe_router_pre_softmax=True, moe_router_score_function="softmax",
        moe_aux_loss_coeff=1e-3, moe_router_load_balancing_type="aux_loss", moe_token_dispatcher_type="alltoall",
        moe_grouped_gemm=True, moe_permute_fusion=not flow and not fp32, gated_linear_unit=True, activation_func=F.silu,
        bias_activation_fusion=not fp32, add_bias_linear=False, params_dtype=torch.float32 if fp32 else torch.bfloat16,
        bf16=not fp32, fp8="e4m3" if fp8 else None, fp8_recipe="blockwise" if fp8 else "delayed",
        hidden_dropout=0.0, attention_dropout=0.0, init_method_std=INIT_STD, expert_model_parallel_size=args.ep,
    )
    cfg.moe_fp8_flow = flow
    cfg.moe_expert_recompute = flow and "recomp" in variant
    cfg.disable_parameter_transpose_cache = flow and "_transient_wt" in variant
    cfg.moe_fp8_flow_gemm = next((e for e in ("te_grouped", "te", "triton") if variant.endswith("_" + e)), "auto")
    cfg.moe_fp8_flow_cuda_graph = graphed
    spec = get_moe_module_spec(use_te=True, num_experts=NUM_EXPERTS, moe_grouped_gemm=True)
    if flow:
        spec = fp8flow_moe_spec(spec)
    layer = build_mlp(spec, cfg).cuda()
    return layer, fp8


def fp8_context(enabled: bool):
    if not enabled:
        return contextlib.nullcontext()
    import transformer_engine.pytorch as te
    from transformer_engine.common.recipe import Float8BlockScaling, Format

    return te.fp8_autocast(enabled=True, fp8_recipe=Float8BlockScaling(fp8_format=Format.E4M3))


class AllToAllBytes:
    """Bytes each rank hands to all-to-all, by phase of a fwd+bwd: dispatch / combine (forward) and backward.

    It wraps torch.distributed.all_to_all_single rather than megatron's `mappings.all_to_all`: the stock dispatcher
    binds `all_to_all` at import (`from megatron.core.tensor_parallel import all_to_all`) and megatron's backward calls
    `_AllToAll.apply` directly, so a wrapper of the module attribute would see only FP8-Flow's traffic. Every megatron
    all-to-all, stock or FP8-Flow, forward or backward, ends in `torch.distributed.all_to_all_single`, which mappings
    looks up at call time. The phase comes from wrapping the dispatcher's token_dispatch / token_combine.
    """

    PHASES = ("dispatch", "combine", "backward", "other")

    def __init__(self):
        self.counting = False
        self.phase = "other"
        self.bytes = Counter()
        self._all_to_all_single = None

    def install(self):
        if self._all_to_all_single is None:
            self._all_to_all_single = dist.all_to_all_single
            dist.all_to_all_single = self._counted

    def _counted(self, output, input, *args, **kwargs):
        if self.counting:
            self.bytes[self.phase] += input.numel() * input.element_size()
        return self._all_to_all_single(output, input, *args, **kwargs)

    @contextlib.contextmanager
    def in_phase(self, phase: str):
        previous, self.phase = self.phase, phase
        try:
            yield
        finally:
            self.phase = previous

    def label_dispatcher(self, layer):
        dispatcher = layer.token_dispatcher
        for method, phase in (("token_dispatch", "dispatch"), ("token_combine", "combine")):
            setattr(dispatcher, method, self._labelled(getattr(dispatcher, method), phase))

    def _labelled(self, fn, phase):
        def call(*args, **kwargs):
            with self.in_phase(phase):
                return fn(*args, **kwargs)

        return call

    def count(self, fn, *args):
        """Bytes per phase of one call of fn(*args)."""
        self.bytes.clear()
        self.counting = True
        try:
            fn(*args)
        finally:
            self.counting = False
        return {p: self.bytes[p] for p in self.PHASES}


A2A = AllToAllBytes()


NEW_STEP = True  # --frozen-weights turns it off
NOGUARD = "_noguard"  # variant suffix: the same variant with the non-finite guard off


def new_step(layer):
    """What megatron's schedule does at the first micro-batch of a training step (set_is_first_microbatch): every
    module that caches FP8 weights -- megatron's TE linears, FP8-Flow's experts -- quantizes them anew. Each timed
    fwd+bwd is one step of one micro-batch, so weight quantization is counted, for every variant."""
    modules = layer.__dict__.get("_step_modules")
    if modules is None:
        modules = layer.__dict__["_step_modules"] = [m for m in layer.modules() if hasattr(m, "is_first_microbatch")]
    for m in modules:
        m.is_first_microbatch = True


def fwd_bwd(layer, fp8, x, g, mark_step=None):
    """One fwd+bwd; mark_step (default: not --frozen-weights) gives megatron's step signal first."""
    if NEW_STEP if mark_step is None else mark_step:
        new_step(layer)
    x = x.detach().requires_grad_()
    with fp8_context(fp8):
        y, _ = layer(x)
    with A2A.in_phase("backward"):
        y.backward(g)
    return y, x


def grads(layer):
    # the name match also takes the shared experts' fc1/fc2 (their names end in "experts.linear_fc1.weight"): the dW
    # columns have always included them
    w1 = torch.cat([p.grad.float().flatten() for n, p in layer.named_parameters() if "experts.linear_fc1.weight" in n])
    w2 = torch.cat([p.grad.float().flatten() for n, p in layer.named_parameters() if "experts.linear_fc2.weight" in n])
    router = layer.router.weight.grad.float()
    if dist.get_world_size() > 1:  # each rank holds the router grad of its own tokens: sum to the global batch's
        router = router.clone()
        dist.all_reduce(router)
    return router, w1, w2


def rel(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def global_rel(a, b) -> float:
    """Relative L2 error over the concatenation of every rank's a and b."""
    if dist.get_world_size() == 1:
        return rel(a, b)
    sums = torch.stack([(a.float() - b.float()).square().sum(), b.float().square().sum()])
    dist.all_reduce(sums)
    return math.sqrt(float(sums[0] / sums[1]))


def across_ranks(values, op) -> list:
    """Reduce a list of floats over ranks (identity on one rank)."""
    if dist.get_world_size() == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device="cuda")
    dist.all_reduce(t, op=op)
    return t.tolist()


def global_expert_name(name: str, ep_rank: int, num_local: int) -> str:
    """experts.linear_fc1.weight{i} (TEGroupedMLP's local expert i) -> ...weight{ep_rank * num_local + i}."""
    m = re.fullmatch(r"(experts\.linear_fc[12]\.weight)(\d+)", name)
    return f"{m[1]}{ep_rank * num_local + int(m[2])}" if m else name


def seeded_state(layer, ep_rank: int, num_local: int) -> dict:
    """This rank's slice of a model that does not depend on EP: each parameter drawn from a CUDA generator seeded by
    its global name, with megatron's init std (output layers: std / sqrt(2 * num_layers))."""
    state = {k: v for k, v in layer.state_dict().items() if "_extra_state" not in k}
    for name, p in layer.named_parameters():
        key = global_expert_name(name, ep_rank, num_local)
        gen = torch.Generator(device=p.device)
        gen.manual_seed(WEIGHT_SEED * 2**32 + zlib.crc32(key.encode()))
        std = INIT_STD / math.sqrt(2.0) if "linear_fc2" in name else INIT_STD
        state[name] = torch.randn(p.shape, generator=gen, device=p.device, dtype=torch.float32) * std
    return state


def rank_inputs(args, rank: int):
    """Rank r's tokens and output gradient, from seed INPUT_SEED + r (the global batch is the ranks' batches)."""
    gen = torch.Generator(device="cuda")
    gen.manual_seed(INPUT_SEED + rank)
    seq = args.tokens // 4
    x = torch.randn(seq, 4, HIDDEN, device="cuda", generator=gen)
    g = torch.randn(seq, 4, HIDDEN, device="cuda", generator=gen) * 1e-2
    return x, g


def measure_errors(layer, fp8, x, g, ref):
    y, xg = fwd_bwd(layer, fp8, x, g)  # the warm-up call (also allocates .grad: resident from here on)
    errs = {"out": global_rel(y, ref["y"]), "dx": global_rel(xg.grad, ref["dx"])}
    r, w1, w2 = grads(layer)
    errs.update(drouter=global_rel(r, ref["drouter"]), dw_fc1=global_rel(w1, ref["w1"]), dw_fc2=global_rel(w2, ref["w2"]))
    return errs


def measure_memory(layer, fp8, x, g):
    """(peak above resident, what the forward leaves alive for backward, resident) in bytes; resident: what is
    allocated between calls (parameters, their .grad, FP8 weight caches, the inputs)."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    xx = x.detach().requires_grad_()
    with fp8_context(fp8):
        yy, _ = layer(xx)
    act = torch.cuda.memory_allocated() - base
    yy.backward(g)
    del yy, xx
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base, act, base


def measure_times(layer, fp8, x, g, iters):
    """(fwd+bwd ms per call, non-finite guard check µs per call -- empty while the guard is off)."""
    import time

    from fp8flow_megatron.ops.nonfinite import guard

    times, check_us = [], []
    for i in range(iters):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fwd_bwd(layer, fp8, x, g)
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e))
        if guard.enabled:  # the trainer's once-per-step check, after the step's sync (as after the loss read)
            t0 = time.perf_counter()
            guard.check(i + 1)
            check_us.append((time.perf_counter() - t0) * 1e6)
    return times, check_us


def measure_guard_interleaved(layer, fp8, x, g, iters):
    """The guard's cost on one layer, free of drift between runs: `iters` rounds, each one fwd+bwd with the guard on
    and one with it off, in alternating order (on-off, off-on, ...). Returns the per-round ratios on/off, so that
    their spread (the quartiles) shows how much of the median cost is noise. Both kernel specializations
    (HAS_FLAG on and off) are compiled by the warm-up round."""
    from fp8flow_megatron.ops.nonfinite import guard

    def timed(enabled):
        guard.enabled = enabled
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fwd_bwd(layer, fp8, x, g)
        e.record()
        torch.cuda.synchronize()
        if enabled:
            guard.check(1)
        return s.elapsed_time(e)

    was = guard.enabled
    try:
        timed(True), timed(False)  # warm-up: both specializations compiled
        ratios = []
        for i in range(iters):
            order = (True, False) if i % 2 == 0 else (False, True)
            ms = {enabled: timed(enabled) for enabled in order}
            ratios.append(ms[True] / ms[False])
        return ratios
    finally:
        guard.enabled = was


def profile_kernels(variant, layer, fp8, x, g, iters, args, median_ms):
    """Per fwd+bwd: launches of each CUDA kernel and its GPU time (µs), averaged over `iters` profiled calls."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU], with_stack=False) as prof:
        for _ in range(iters):
            fwd_bwd(layer, fp8, x, g)
        torch.cuda.synchronize()
    show = args.profile and dist.get_rank() == 0
    if show:
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18, max_name_column_width=70))
    # The profiler also reports each collective as a device-side range named "nccl:<op>" (record_param_comms) with
    # the same duration as its ncclDevKernel_*; counting both doubled the NCCL times (a2a ms before this filter).
    cuda_events = [
        evt for evt in prof.events()
        if evt.device_type == torch.autograd.DeviceType.CUDA and not evt.name.startswith("nccl:")
    ]  # fmt: skip
    launches = Counter(evt.name for evt in cuda_events)
    kernel_us = Counter()
    for evt in cuda_events:
        kernel_us[evt.name] += evt.device_time
    launches = Counter({n: c // iters for n, c in launches.items()})
    kernel_us = Counter({n: us / iters for n, us in kernel_us.items()})
    if show:
        total = sum(kernel_us.values()) / 1e3
        print(f"--- {variant}: {total:.2f} ms of kernel time in one fwd+bwd (wall median {median_ms:.2f} ms)")
        for n, us in kernel_us.most_common(12):
            print(f"    {us / 1e3:7.3f} ms  x{launches[n]:4d}  {n[:110]}")
    return launches, kernel_us


def run_variant(variant, state, x, g, ref, args):
    from fp8flow_megatron.ops.nonfinite import guard

    guard_was = guard.enabled
    guard.enabled = guard_was and not variant.endswith(NOGUARD)
    try:
        return _run_variant(variant, state, x, g, ref, args)
    finally:
        guard.enabled = guard_was


def _run_variant(variant, state, x, g, ref, args):
    if args.memory_snapshot:  # from before the layer is built: every resident block gets its allocation stack
        torch.cuda.memory._record_memory_history(max_entries=args.memory_snapshot_events)
    layer, fp8 = build_layer(variant, args)
    missing = layer.load_state_dict(state, strict=False)
    assert not [k for k in missing.missing_keys if "_extra_state" not in k], missing
    A2A.label_dispatcher(layer)
    xv, gv = x.to(torch.bfloat16), g.to(torch.bfloat16)
    errs = measure_errors(layer, fp8, xv, gv, ref)
    for _ in range(3):
        fwd_bwd(layer, fp8, xv, gv)
    peak, act, resident = measure_memory(layer, fp8, xv, gv)
    if args.memory_snapshot:  # the window ends with measure_memory's fwd+bwd (scripts/memory_at_peak.py reads it)
        os.makedirs(args.memory_snapshot, exist_ok=True)
        torch.cuda.memory._dump_snapshot(snapshot_path(args, variant))
        torch.cuda.memory._record_memory_history(enabled=None)
    times, check_us = measure_times(layer, fp8, xv, gv, args.iters)
    guard_ratios = (
        measure_guard_interleaved(layer, fp8, xv, gv, args.iters)
        if args.guard_ab and variant.startswith("fp8flow") and not variant.endswith(NOGUARD) else None
    )
    a2a_bytes = A2A.count(fwd_bwd, layer, fp8, xv, gv)
    profiled = 1 if args.ep == 1 else PROFILED_ITERS_EP
    launches, kernel_us = profile_kernels(variant, layer, fp8, xv, gv, profiled, args, statistics.median(times))
    steps = measure_steps(new_step, fwd_bwd, layer, fp8, xv, gv, args.microbatches, args.iters) if args.microbatches else {}
    casts = {n: c for n, c in launches.items() if CAST_RE.search(n) and not GEMM_RE.search(n) and not NCCL_RE.search(n)}
    nccl = {n: (launches[n], us) for n, us in kernel_us.items() if NCCL_RE.search(n) or A2A_RE.search(n)}
    a2a_ms = sum(us for n, us in kernel_us.items() if A2A_RE.search(n)) / 1e3
    del layer
    torch.cuda.empty_cache()
    ms, peak, act, resident, a2a_ms = across_ranks([statistics.median(times), peak, act, resident, a2a_ms], dist.ReduceOp.MAX)
    world = dist.get_world_size()
    mean_bytes = [b / world for b in across_ranks([a2a_bytes[p] for p in A2A.PHASES], dist.ReduceOp.SUM)]
    return {
        "ms": ms,
        "peak_gib": peak / 2**30,
        "resident_gib": resident / 2**30,
        "act_gib": act / 2**30,
        "casts": sum(casts.values()),
        "cast_names": casts,
        "errs": errs,
        "a2a_ms": a2a_ms,
        "a2a_bytes": dict(zip(A2A.PHASES, mean_bytes)),
        "nccl_kernels": nccl,
        "check_us": statistics.median(check_us) if check_us and variant.startswith("fp8flow") else None,
        "guard_ratios": guard_ratios,
        "steps": steps,
    }


def init_distributed(args):
    """One process (EP=1, as before) or torchrun's env:// (one process per GPU); returns this rank."""
    if "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group("nccl", init_method="env://")
    elif args.ep != 1:
        sys.exit(f"--ep {args.ep} runs one process per GPU: torchrun --nproc-per-node {args.ep} {sys.argv[0]} --ep {args.ep}")
    else:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29517")
        dist.init_process_group("nccl", rank=0, world_size=1)
    if dist.get_world_size() != args.ep:
        sys.exit(f"--ep {args.ep} needs exactly {args.ep} processes (TP=PP=1, no data parallelism); got {dist.get_world_size()}")
    if NUM_EXPERTS % args.ep:
        sys.exit(f"--ep {args.ep} must divide the {NUM_EXPERTS} experts")
    return dist.get_rank()


def fp32_reference(args, rank):
    """The shared weights (fp32 master state), this rank's inputs, and the fp32 layer's output and grads on them."""
    ref_layer, _ = build_layer("fp32", args)
    if args.ep == 1:  # EP=1 keeps its original weights and inputs (megatron's init, then the default CUDA generator)
        state = {k: v for k, v in ref_layer.state_dict().items() if "_extra_state" not in k}
        seq = args.tokens // 4
        x = torch.randn(seq, 4, HIDDEN, device="cuda")
        g = torch.randn(seq, 4, HIDDEN, device="cuda") * 1e-2
    else:
        state = seeded_state(ref_layer, rank, NUM_EXPERTS // args.ep)
        ref_layer.load_state_dict(state, strict=False)
        x, g = rank_inputs(args, rank)
    y, xg = fwd_bwd(ref_layer, False, x, g)
    r, w1, w2 = grads(ref_layer)
    ref = {"y": y.detach(), "dx": xg.grad, "drouter": r, "w1": w1, "w2": w2}
    del ref_layer
    torch.cuda.empty_cache()
    return state, x, g, ref


def ratio(a, b) -> str:
    return f"{a / b:.2f}x" if b else "-"


def format_table(results, args) -> str:
    ep = args.ep
    bf16, te = results.get("bf16"), results.get("te_blockwise")
    device = torch.cuda.get_device_name(0)
    if ep == 1:
        title = f"### MoE layer fwd+bwd, DeepSeek-V2-Lite shapes, {args.tokens} tokens, EP=1 — {device}"
        command = f"python scripts/bench_moe_layer.py --tokens {args.tokens} --iters {args.iters}"
        command += " --frozen-weights" if args.frozen_weights else ""
    else:
        title = f"### MoE layer fwd+bwd, DeepSeek-V2-Lite shapes, {args.tokens} tokens per GPU, EP={ep} — {ep}x {device}"
        command = f"torchrun --nproc-per-node {ep} scripts/bench_moe_layer.py --ep {ep} --tokens {args.tokens} --iters {args.iters}"
    header = ["variant", "median ms", "vs BF16"] + (["vs TE blockwise"] if ep > 1 else []) + [
        "resident GiB", "peak GiB (above resident)", "activation GiB", "vs BF16 act", "standalone cast/quant/transpose launches"]
    if ep > 1:
        header += ["a2a ms", "a2a MB/rank", "dispatch MB/rank", "dispatch bytes vs BF16"]
    header += ["rel err out", "dx", "d router", "dW fc1", "dW fc2"]
    lines = [title, "", f"`source .gpu-bundle/setup.sh && {command}`", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for v, res in results.items():
        e = res["errs"]
        cells = [v, f"{res['ms']:.2f}", ratio(bf16["ms"], res["ms"]) if bf16 else "-"]
        if ep > 1:
            cells.append(ratio(te["ms"], res["ms"]) if te else "-")
        cells += [f"{res['resident_gib']:.2f}", f"{res['peak_gib']:.2f}", f"{res['act_gib']:.2f}",
                  ratio(res["act_gib"], bf16["act_gib"]) if bf16 else "-", str(res["casts"])]
        if ep > 1:
            sent = res["a2a_bytes"]
            cells += [f"{res['a2a_ms']:.2f}", f"{sum(sent.values()) / 1e6:.1f}", f"{sent['dispatch'] / 1e6:.1f}",
                      f"{sent['dispatch'] / bf16['a2a_bytes']['dispatch']:.3f}x" if bf16 else "-"]
        cells += [f"{e[k]:.2e}" for k in ("out", "dx", "drouter", "dw_fc1", "dw_fc2")]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Standalone conversion kernels per fwd+bwd (name: launches):", ""]
    for v, res in results.items():
        listed = ", ".join(f"`{n[:80]}`: {c}" for n, c in sorted(res["cast_names"].items(), key=lambda t: -t[1])) or "none"
        lines.append(f"- {v}: {listed}")
    guarded = [(v, v + NOGUARD) for v in results if v.startswith("fp8flow") and v + NOGUARD in results]
    if guarded:
        lines += ["", "Non-finite guard cost (fwd+bwd median with the guard vs the same variant without it; the check "
                  "runs once per step, after the step's sync):", ""]
        for on, off in guarded:
            a, b = results[on]["ms"], results[off]["ms"]
            check = results[on]["check_us"]
            lines.append(f"- {on}: {a:.3f} ms vs {b:.3f} ms without: {100 * (a - b) / b:+.2f}%"
                         + (f"; check {check:.0f} µs per step" if check is not None else ""))
            r = results[on].get("guard_ratios")
            if r and len(r) >= 4:
                q1, med, q3 = statistics.quantiles(r, n=4)
                lines.append(f"  interleaved on the same layer ({len(r)} rounds of one call with and one without): "
                             f"median {100 * (med - 1):+.2f}%, quartiles {100 * (q1 - 1):+.2f}% .. {100 * (q3 - 1):+.2f}%")
    if ep > 1:
        lines += ["", "NCCL kernels per fwd+bwd on rank 0 (name: launches, GPU ms; a2a ms sums the SendRecv/AllToAll ones) "
                  + "and all-to-all MB/rank by phase (dispatch / combine / backward / other):", ""]
        for v, res in results.items():
            listed = ", ".join(f"`{n[:60]}`: {c}, {us / 1e3:.2f} ms" for n, (c, us) in sorted(res["nccl_kernels"].items()))
            phases = " / ".join(f"{res['a2a_bytes'][p] / 1e6:.1f}" for p in AllToAllBytes.PHASES)
            lines.append(f"- {v}: {listed or 'none matched'}; MB {phases}")
    return "\n".join(lines)


def snapshot_path(args, variant: str) -> str:
    return os.path.join(args.memory_snapshot, f"memory_{variant}_rank{dist.get_rank()}.pickle")


def memory_snapshot_report(results, args) -> str:
    """The variants' memory at the peak per allocation site, side by side (scripts/memory_at_peak.py), rank 0's."""
    import pickle

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from memory_at_peak import report

    snaps = []
    for v in results:
        with open(snapshot_path(args, v), "rb") as f:
            snaps.append(pickle.load(f))
    head = (f"### Memory at the peak per allocation site (window: layer build .. the measured fwd+bwd; GB = 1e9 bytes)"
            f"\n\n`--memory-snapshot {args.memory_snapshot}`; snapshots: {args.memory_snapshot}/memory_<variant>_rank0.pickle\n\n")  # fmt: skip
    return head + report(snaps, list(results), top=args.memory_snapshot_top)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=16384, help="tokens per GPU")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--ep", type=int, default=1, help="expert-parallel size; > 1 under torchrun, one process per GPU")
    ap.add_argument("--variants", default="bf16,te_blockwise,fp8flow,fp8flow_recomp,fp8flow_triton,fp8flow_te,"
                                          "fp8flow_te_grouped,fp8flow_recomp_te_grouped")
    ap.add_argument("--profile", action="store_true", help="print the top kernels by GPU time per variant")
    ap.add_argument("--write", default=None, help="append the table to this markdown file (rank 0)")
    ap.add_argument("--guard-ab", action="store_true",
                    help="also run each fp8flow variant with the non-finite guard off (<variant>_noguard), right after "
                         "it, and report the guard's cost")
    ap.add_argument("--frozen-weights", action="store_true",
                    help="quantize weights only once (the tables before 2026-12-01): leaves weight quantization out")
    ap.add_argument("--microbatches", default=None,
                    help="N[,M]: also time training steps of one weight re-quantization + N fwd+bwd (e.g. 1,8)")
    ap.add_argument("--cuda-graph", action="store_true",
                    help="add <variant>_graph (--moe-fp8-flow-cuda-graph) after each FP8-Flow variant that supports it")
    ap.add_argument("--memory-snapshot", default=None, metavar="DIR",
                    help="record the CUDA allocator's history per variant (layer build .. the memory measurement), "
                         "dump it to DIR/memory_<variant>_rank<r>.pickle, and print what is alive at each variant's "
                         "peak per allocation site (scripts/memory_at_peak.py)")
    ap.add_argument("--memory-snapshot-events", type=int, default=200000, help="allocator events kept per variant")
    ap.add_argument("--memory-snapshot-top", type=int, default=30, help="allocation sites listed")
    args = ap.parse_args()
    args.microbatches_text = args.microbatches or ""
    args.microbatches = parse_microbatches(args.microbatches) if args.microbatches else []
    global NEW_STEP
    NEW_STEP = not args.frozen_weights

    rank = init_distributed(args)
    A2A.install()
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    parallel_state.initialize_model_parallel(1, 1, expert_model_parallel_size=args.ep)
    model_parallel_cuda_manual_seed(0)
    torch.manual_seed(0)

    state, x, g, ref = fp32_reference(args, rank)
    results = {}
    variants = args.variants.split(",")
    if args.cuda_graph:
        variants = with_graph_variants(variants, args.ep)
    if args.guard_ab:
        variants = [w for v in variants for w in ([v, v + NOGUARD] if v.startswith("fp8flow") and not v.endswith(NOGUARD) else [v])]
    skipped = {}
    for variant in variants:
        if variant.removesuffix(NOGUARD).endswith("_te_grouped"):
            from fp8flow_megatron.ops.te_grouped_gemm import te_grouped_support

            ok, reason = te_grouped_support()
            if not ok:  # the same answer on every rank (same host, same libraries)
                skipped[variant] = reason
                if rank == 0:
                    print(f"{variant}: skipped ({reason})", flush=True)
                continue
        results[variant] = run_variant(variant, state, x, g, ref, args)
        if rank == 0:
            print(f"{variant}: done ({results[variant]['ms']:.2f} ms)", flush=True)

    if rank == 0:
        table = format_table(results, args)
        if args.microbatches:
            table += "\n\n" + format_steps_table(results, args)
        table += "".join(f"\n\n{v}: skipped ({why})" for v, why in skipped.items())
        if args.memory_snapshot:
            table += "\n\n" + memory_snapshot_report(results, args)
        print(table)
        if args.write:
            with open(args.write, "a") as f:
                f.write("\n" + table + "\n")
    dist.barrier(device_ids=[torch.cuda.current_device()])  # rank 0's file write done before any rank exits
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
