"""The FP8-Flow expert MLP as one autograd Function: fc1 -> weighted SwiGLU + quant -> fc2, with FP8 dgrad/wgrad.

Forward   x_fp8 (1x128) @ W1 (128x128) -> y1 bf16 [N, 2F] -> weighted SwiGLU + 1x128 quant (fused) -> a_fp8 [N, F]
          a_fp8 @ W2 -> y2 [N, H] (bf16)
Backward  dY2 arrives FP8 (the combine gradient, quantized once upstream)
          fc2 dgrad: dY2 @ W2^T -> dA [N, F];   fc2 wgrad: T(dY2) . T(a_fp8) per expert
          dSwiGLU + quant (fused) -> dY1 fp8 [N, 2F] and d probs
          fc1 dgrad: dY1 @ W1^T -> dX [N, H];   fc1 wgrad: T(dY1) . T(x_fp8) per expert
T(.) is the scaling-aware transpose (row-wise FP8 -> column-wise FP8 from the codes), never a BF16 copy. Weights are
quantized 128x128 once per optimizer step: the caller says when a step begins (megatron's is_first_microbatch
protocol, see megatron/experts.py) and the step's micro-batches, their backward passes and recompute reuse the codes;
W^T is the exact 128x128 block transpose. Expert-level recompute keeps only x_fp8 (needed for wgrad anyway) and
re-runs fc1 -> SwiGLU+quant. With fuse_wgrad_accumulation (megatron's gradient_accumulation_fusion) the weight
gradients are accumulated straight into each weight's fp32 `main_grad`, as TE's grouped linear does.
Every quantization here (weights, swiglu_out, dswiglu_out, a BF16 output gradient) raises its site's non-finite guard
flag (ops/nonfinite.py) on an inf or NaN input, on every iteration; the trainer checks the flags once per iteration.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch

from ..numerics import Fp8Blockwise
from ..numerics import swiglu as _swiglu
from ..numerics.groups import RowGroups
from .backend import backend_for
from .fp8_tensor import Fp8FlowTensor
from .gemm_engine import gemm_engine_for
from .nonfinite import guard
from .telemetry import monitor


class WeightQuantCache:
    """128x128 FP8 copies of one layer's expert weights, in the GEMM engine's form (both usages, or the fprop codes
    alone: get_group(columnwise=False)), made when the caller says a new optimizer step began and reused until the
    next one.

    Why not notice weight changes by themselves: megatron's bf16 and distributed optimizers write new weights through
    `param.data` / the DDP parameter buffer, which moves neither the parameter's version counter nor its data pointer,
    so a cache keyed on them stays at the step-0 weights forever (shared/DESIGN.md section 1).
    """

    def __init__(self, persistent: bool = False) -> None:
        self._entries = {}
        self.num_quantizations = 0  # per linear; read by tests and telemetry
        # persistent: a refresh writes the new codes into the buffers already cached (the engine's quantize_weights
        # out=) instead of replacing them, so a CUDA graph captured on those buffers reads every step's weights
        # (ops/graphs.py, megatron/cuda_graph.py). Engines with in-place quantization (Triton) honour it.
        self.persistent = persistent

    def get_group(self, name: str, weights, engine, refresh: bool, guard_site: Optional[str] = None,
                  columnwise: bool = True, hold: bool = True):  # fmt: skip
        """All experts' weights of linear `name` in the engine's form (a list, or one stacked buffer): quantized anew
        when `refresh` (a new optimizer step) or when nothing fitting is cached, else the cached codes. guard_site:
        the non-finite guard site that a quantization raises (forward direction), e.g. "layer2/fc1_weight".
        columnwise=False: without the dgrad's transposed codes, on an engine that can make them in backward
        (`columnwise_in_backward`; the TE engines always keep both). hold=False: quantize now and keep nothing (the
        codes live while the caller holds them; an entry cached earlier for `name` is dropped)."""
        columnwise = columnwise or not getattr(engine, "columnwise_in_backward", False)
        key = (engine.name, len(weights), columnwise)
        hit = self._entries.pop(name, None) if not hold else self._entries.get(name)
        if not refresh and hold and hit is not None and hit[0] == key:
            return hit[1]
        flag = guard.flag(guard_site, "forward", weights[0].device) if guard_site is not None and weights else None
        # an engine without in-place quantization (the CPU reference) replaces the buffers; a graph captured on the
        # old ones notices through addresses() and is captured again
        in_place = (hold and self.persistent and getattr(engine, "quantizes_in_place", False) and hit is not None
                    and hit[0] == key)  # fmt: skip
        kwargs = {} if columnwise else {"columnwise": False}
        with torch.no_grad():
            if in_place:
                w_q = engine.quantize_weights(weights, nonfinite_flag=flag, out=hit[1], **kwargs)
            else:
                w_q = engine.quantize_weights(weights, nonfinite_flag=flag, **kwargs)
        if hold:
            self._entries[name] = (key, w_q)
        self.num_quantizations += 1
        return w_q

    def nbytes(self) -> int:
        """Device bytes the cached FP8 copies hold (codes and scales of every linear), each storage counted once (an
        engine's per-expert views and its stacked buffers share storage)."""
        storages = {}

        def walk(obj, depth=0):
            if isinstance(obj, torch.Tensor):
                st = obj.untyped_storage()
                storages[(obj.device, st.data_ptr())] = st.nbytes()
            elif depth < 4 and isinstance(obj, (tuple, list)):
                for item in obj:
                    walk(item, depth + 1)
            elif depth < 4 and hasattr(obj, "__dict__"):
                for item in vars(obj).values():
                    walk(item, depth + 1)

        for _, group in self._entries.values():
            walk(group)
        return sum(storages.values())

    def addresses(self) -> tuple:
        """The data addresses of every cached buffer (a CUDA graph reading them is valid while these stay)."""
        out = []
        for name in sorted(self._entries):
            stack = self._entries[name][1]
            for part in stack if isinstance(stack, (tuple, list)) else (stack,):
                for t in (getattr(part, "data", None), getattr(part, "scale_inv", None)):
                    if isinstance(t, torch.Tensor):
                        out.append(t.data_ptr())
        return tuple(out)

    def cached(self, name: str):
        """What the last forward of linear `name` used (None before the first one, and when nothing is held:
        get_group(hold=False))."""
        hit = self._entries.get(name)
        return None if hit is None else hit[1]


_DUMMY_WGRAD = {}


def _dummy_wgrad(weight: torch.Tensor) -> torch.Tensor:
    """A zero gradient of the weight's shape, returned after the real one went into main_grad: megatron's DDP hook
    fires on the parameter's gradient accumulation (with --overlap-grad-reduce it asserts a gradient arrived), sees
    grad_added_to_main_grad and drops it. One cached buffer per shape, handed out as fresh detached views so that
    autograd adopts it as `.grad` without a copy (TE's get_dummy_wgrad does the same)."""
    key = (tuple(weight.shape), weight.dtype, weight.device)
    zero = _DUMMY_WGRAD.get(key)
    if zero is None:
        zero = _DUMMY_WGRAD[key] = torch.zeros(weight.shape, dtype=weight.dtype, device=weight.device)
    return zero.detach()


def _main_grads(weights) -> list:
    missing = [i for i, w in enumerate(weights) if getattr(w, "main_grad", None) is None]
    if missing:
        raise RuntimeError(
            "fp8flow: gradient_accumulation_fusion is on but expert weights have no .main_grad (megatron's "
            "DistributedDataParallel creates it). Wrap the model in megatron.core.distributed.DistributedDataParallel, "
            "or turn the fusion off (--no-gradient-accumulation-fusion / config.gradient_accumulation_fusion=False)."
        )
    return [w.main_grad for w in weights]


def _expert_wgrad(engine, g_q, x_q, m_splits, weights, fuse: bool, into_main_grad: bool = True):
    """Weight gradients of one linear: into main_grad (returning dummies) when fusing; unfused, as bf16 gradients,
    returned to autograd -- or, with `into_main_grad` where every weight has megatron DDP's main_grad, added into it
    right away and freed.

    Why the early add: DDP's hook adds each parameter's bf16 .grad into its fp32 main_grad once autograd hands it
    over, which for this single Function is after its whole backward, so fc2's gradients (E*H*F values) would live
    through fc1's dgrad and wgrad. The add here is the hook's (the same bf16 values, the same fp32 add_); the hook then
    gets a dummy and grad_added_to_main_grad, as with fusion."""
    if not weights:
        return []
    if not fuse:
        grads = engine.wgrad(g_q, x_q, m_splits, weights[0].dtype)
        if not (into_main_grad and all(getattr(w, "main_grad", None) is not None for w in weights)):
            return grads
        for w, grad in zip(weights, grads):
            w.main_grad.add_(grad)  # what megatron DDP's backward hook does with a bf16 .grad
            w.grad_added_to_main_grad = True
        del grads
        return [_dummy_wgrad(w) for w in weights]
    main_grads = _main_grads(weights)
    engine.wgrad(g_q, x_q, m_splits, main_grads[0].dtype, accumulate_into=main_grads)
    for w in weights:
        w.grad_added_to_main_grad = True
    return [_dummy_wgrad(w) for w in weights]


def _pack(q: Fp8Blockwise) -> Tuple[torch.Tensor, torch.Tensor]:
    return q.data, q.scale_inv


def _unpack(data: torch.Tensor, scale_inv: torch.Tensor) -> Fp8Blockwise:
    return Fp8Blockwise(data, scale_inv)


def _transient(engine, transient_weights: bool) -> bool:
    """Whether this engine's FP8 weight copies are made where each GEMM uses them and held by nothing else
    (transient_weights on an engine that can make the dgrad operand alone; the TE engines keep both usages)."""
    return transient_weights and getattr(engine, "columnwise_in_backward", False)


def _backward_weights(engine, w_q, weights, transient: bool, dgrad: bool):
    """The weights a GEMM in backward reads: the codes forward used, or (transient) the same codes made now from the
    same weights and held by the caller only for that GEMM -- the transposed codes for a dgrad, the fprop codes for
    the recompute (their non-finite check was forward's)."""
    if not transient:
        return w_q
    with torch.no_grad():
        dense = [w.detach() for w in weights]
        return engine.columnwise_weights(dense) if dgrad else engine.quantize_weights(dense, columnwise=False)


def _release(*tensors: torch.Tensor) -> None:
    """Free the memory of activations this Function made and saved, after their last use in backward: their storage
    is shrunk to nothing (a saved tensor is otherwise held until autograd releases the node). Only a contiguous tensor
    that spans its whole storage (what the kernels return) is released; a part of a larger buffer is left alone."""
    for t in tensors:
        if (t is not None and t.is_contiguous() and t.storage_offset() == 0
                and t.untyped_storage().nbytes() == t.numel() * t.element_size()):  # fmt: skip
            t.untyped_storage().resize_(0)


def _released(t: torch.Tensor) -> bool:
    return t.numel() > 0 and t.untyped_storage().nbytes() == 0


def _fc1_act(b, engine, x_q, probs, w1, m_splits, out_dtype, site_prefix, observe=True):
    """fc1 GEMM, then weighted SwiGLU fused with its quantization (guard site swiglu_out, forward; the recompute in
    backward raises the same slot, as it quantizes the same values). observe: record FP8 health (not on recompute)."""
    y1 = engine.fprop(x_q, w1, m_splits, out_dtype)
    a_q = b.weighted_swiglu_quant(y1, probs, guard.flag(site_prefix + "swiglu_out", "forward", y1.device))
    if observe and monitor.enabled:  # logged iterations only: the spec recomputes the fp32 input
        monitor.observe(site_prefix + "swiglu_out", _swiglu.weighted_swiglu(y1, probs), a_q)
    return y1, a_q


class _Fp8FlowExperts(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, probs, m_splits, recompute, cache, engine_name, refresh, fuse_wgrad, site_prefix,
                transient_weights, wgrad_into_main_grad, *weights):  # fmt: skip
        num_experts = len(m_splits)
        w1, w2 = weights[:num_experts], weights[num_experts:]
        b, engine = backend_for(x.device), gemm_engine_for(x.device, engine_name, num_experts)
        x_q = x.fp8
        out_dtype = x.dtype
        transient = _transient(engine, transient_weights)
        # transient: each linear's fprop codes live from their quantization to their GEMM (fc1's are freed before
        # fc2's are made); nothing FP8 of the weights is held from forward to backward
        kw = dict(columnwise=not transient, hold=not transient)
        w1_q = cache.get_group("fc1", w1, engine, refresh, guard_site=site_prefix + "fc1_weight", **kw)
        y1, a_q = _fc1_act(b, engine, x_q, probs, w1_q, m_splits, out_dtype, site_prefix)
        if transient:
            w1_q = None
        w2_q = cache.get_group("fc2", w2, engine, refresh, guard_site=site_prefix + "fc2_weight", **kw)
        y2 = engine.fprop(a_q, w2_q, m_splits, out_dtype)
        if transient:
            w2_q = None
        ctx.m_splits, ctx.recompute, ctx.out_dtype = m_splits, recompute, out_dtype
        ctx.num_experts, ctx.engine_name, ctx.fuse_wgrad = num_experts, engine_name, fuse_wgrad
        ctx.site_prefix, ctx.transient, ctx.wgrad_into_main_grad = site_prefix, transient, wgrad_into_main_grad
        # The FP8 weights this forward used: backward and recompute must use the same ones (no tensor copies: these
        # are the cache's objects); None when transient (backward makes the same codes again from `weights`).
        ctx.w1_q, ctx.w2_q = w1_q, w2_q
        saved = [*_pack(x_q), probs]
        if not recompute:
            saved += [y1, *_pack(a_q)]
        ctx.save_for_backward(*saved, *weights)
        return y2

    @staticmethod
    def backward(ctx, grad_y2):
        n_e = ctx.num_experts
        saved = ctx.saved_tensors
        x_q, probs = _unpack(saved[0], saved[1]), saved[2]
        rest = saved[3:]
        b, engine = backend_for(grad_y2.device), gemm_engine_for(grad_y2.device, ctx.engine_name, ctx.num_experts)
        m_splits, out_dtype = ctx.m_splits, ctx.out_dtype
        if ctx.recompute:
            weights = rest
        else:
            y1, a_q, weights = rest[0], _unpack(rest[1], rest[2]), rest[3:]
            if _released(y1):
                raise RuntimeError(
                    "fp8flow: the FP8-Flow experts' backward ran a second time over the same graph "
                    "(backward(retain_graph=True)?). It frees its saved activations as it uses them, as TE's linears "
                    "do, so a graph can be backpropagated once. Run the forward again, or use --moe-expert-recompute "
                    "(which keeps only the FP8 input)."
                )
        w1, w2 = weights[:n_e], weights[n_e:]
        w1_q, w2_q = ctx.w1_q, ctx.w2_q
        if ctx.recompute:
            w1_fprop = _backward_weights(engine, w1_q, w1, ctx.transient, dgrad=False)
            y1, a_q = _fc1_act(b, engine, x_q, probs, w1_fprop, m_splits, out_dtype, ctx.site_prefix, observe=False)
            del w1_fprop

        if isinstance(grad_y2, Fp8FlowTensor):
            g2_q = grad_y2.fp8
        else:  # a BF16 gradient: only when the caller did not route the FP8 combine gradient here
            g2_q = b.quantize_1x128(
                grad_y2.contiguous(), guard.flag(ctx.site_prefix + "expert_out_grad", "backward", grad_y2.device)
            )
            monitor.observe(ctx.site_prefix + "expert_out_grad", grad_y2, g2_q)

        # The order and the releases keep backward's peak memory low: each linear's wgrad runs before its dgrad (the
        # wgrad's transposed operands are freed before the dgrad's output and W^T exist), and each activation is freed
        # right after its last use (y1 and a_q would otherwise live until autograd releases this node, after the
        # whole backward; TE's linears free theirs the same way). The results do not depend on the order.
        dw2 = _expert_wgrad(engine, g2_q, a_q, m_splits, w2, ctx.fuse_wgrad, ctx.wgrad_into_main_grad)
        _release(a_q.data, a_q.scale_inv)
        del a_q
        grad_a = engine.dgrad(g2_q, _backward_weights(engine, w2_q, w2, ctx.transient, dgrad=True), m_splits, out_dtype)
        del g2_q
        g1_q, grad_probs = b.weighted_swiglu_quant_backward(
            grad_a, y1, probs, guard.flag(ctx.site_prefix + "dswiglu_out", "backward", grad_a.device)
        )
        if monitor.enabled:  # logged iterations only: the spec recomputes the fp32 input of the quantizer
            monitor.observe(ctx.site_prefix + "dswiglu_out", _swiglu.weighted_swiglu_backward(grad_a, y1, probs)[0], g1_q)
        _release(y1)
        del grad_a, y1
        dw1 = _expert_wgrad(engine, g1_q, x_q, m_splits, w1, ctx.fuse_wgrad, ctx.wgrad_into_main_grad)
        grad_x = engine.dgrad(g1_q, _backward_weights(engine, w1_q, w1, ctx.transient, dgrad=True), m_splits, out_dtype)
        return (grad_x, grad_probs.to(probs.dtype), None, None, None, None, None, None, None, None, None, *dw1, *dw2)


def fp8_flow_experts(
    x: Fp8FlowTensor,
    probs: torch.Tensor,
    m_splits: Sequence[int],
    fc1_weights: Sequence[torch.Tensor],
    fc2_weights: Sequence[torch.Tensor],
    recompute: bool = False,
    cache: WeightQuantCache = None,
    gemm_engine: str = "auto",
    refresh_weights: bool = True,
    fuse_wgrad_accumulation: bool = False,
    telemetry_site_prefix: str = "",
    transient_weights: bool = False,
    wgrad_into_main_grad: bool = True,
) -> torch.Tensor:
    """Grouped SwiGLU expert MLP on FP8 input.

    x:           Fp8FlowTensor [N, H] (1x128), rows grouped by expert, each group padded to the GEMM alignment.
    probs:       [N] fp32 routing weights (0 on padding rows); receives a gradient.
    m_splits:    rows per expert: python ints summing to N, or a numerics.groups.RowGroups (the groups on the
                 device over N worst-case rows, each a multiple of its align; rows past the last group are zero
                 padding and come back as zero rows). With a RowGroups and the "triton" or "te_grouped" engine nothing
                 here reads device memory on the host: the sync-free path. The "te" engine reads a RowGroups' counts
                 (a sync).
    fc1_weights: per expert [2F, H] (gate rows first); fc2_weights: per expert [H, F].
    cache:       the layer's WeightQuantCache (None: a fresh one, i.e. quantize now).
    gemm_engine: "triton" (one launch per GEMM for all experts), "te" (TE's grouped GEMM), "te_grouped" (TE's
                 single-launch grouped-tensor GEMM, ops/te_grouped_gemm.py) or "auto" (by the number
                 of experts: ops.gemm_engine.resolve_gemm_engine); CPU always runs the reference.
    refresh_weights: quantize the weights anew (the first micro-batch of an optimizer step, or evaluation after
                 one); False reuses the cache's codes from earlier in the step.
    fuse_wgrad_accumulation: accumulate the weight gradients into each weight's `main_grad` (megatron's
                 gradient_accumulation_fusion; the autograd gradients returned are zero dummies), else return them.
    telemetry_site_prefix: prepended to the site names of FP8 health telemetry and of the non-finite guard ("layer3/"
                 -> "layer3/swiglu_out", "layer3/fc1_weight").
    transient_weights: hold no FP8 weight copy (megatron's disable_parameter_transpose_cache): each GEMM's codes
                 are made right before it from the weights and freed after -- fc1's and fc2's fprop codes in
                 forward (whatever refresh_weights says), their transposed codes before each dgrad, fc1's fprop
                 codes again for a recompute -- the same codes every time, so the same results; the cache keeps
                 nothing (triton and reference engines; the TE engines keep both usages in the cache). Costs one
                 weight quantization per linear per forward and per backward; saves 2*E*N*K bytes per linear.
    wgrad_into_main_grad: without fusion, where every weight has megatron DDP's `main_grad`, add each linear's
                 bf16 weight gradients into it right after its wgrad (what DDP's hook would do, bit-identical) and
                 return dummies, so they do not outlive their linear; False returns them to autograd (the hook
                 adds them after this backward; the CUDA-graphed layer, whose replays hand on captured gradients).
    Returns y [N, H] in x's logical dtype.
    """
    if not isinstance(x, Fp8FlowTensor):
        raise TypeError("fp8_flow_experts needs the FP8 payload from the FP8-Flow dispatcher (an Fp8FlowTensor)")
    rows = m_splits if isinstance(m_splits, RowGroups) else [int(m) for m in m_splits]
    return _Fp8FlowExperts.apply(
        x, probs, rows, recompute, cache or WeightQuantCache(), gemm_engine, bool(refresh_weights),
        bool(fuse_wgrad_accumulation), telemetry_site_prefix, bool(transient_weights), bool(wgrad_into_main_grad),
        *fc1_weights, *fc2_weights,
    )
