"""Benchmark of the GPU kernels (fp8flow_megatron.kernels): each is checked against its reference first, then timed
side by side, in one process, against naive eager PyTorch, the same naive code under torch.compile, and
TransformerEngine's own op where one exists.

    python scripts/bench_kernels.py                                  # every shape; writes BENCHMARKS.md
    python scripts/bench_kernels.py --shapes v2lite-4k --no-md       # one shape, table only
    python scripts/bench_kernels.py --kernels weight_quant --no-md    # 128x128 weight quantization only

Timing: CUDA events around each call, median of --iters after --warmup calls, inputs rotated over enough sets to
exceed 3x the L2 cache. Before every timed call the stream is given a spin kernel long enough for the host to queue
the whole call, so each number is GPU time (host launch overhead excluded for every implementation alike). GB/s
counts the bytes each kernel must move (inputs read once, outputs written once); "% copy" divides it by the
device-to-device copy bandwidth measured in the same run.
"""

from __future__ import annotations

import argparse
import math
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fp8flow_megatron import kernels  # noqa: E402
from fp8flow_megatron.numerics import (  # noqa: E402
    Fp8Blockwise,
    quantize_1x128,
    quantize_128x128,
    scaling_aware_transpose,
)
from fp8flow_megatron.numerics.format import BLOCK, E4M3_MAX, FP8_DTYPE, scale_from_amax  # noqa: E402
from fp8flow_megatron.numerics.gemm import Fp8BlockwiseStack  # noqa: E402
from fp8flow_megatron.numerics.permute import permute_pad_rows, routing_rows, unpermute_unpad_rows  # noqa: E402
from fp8flow_megatron.numerics.swiglu import weighted_swiglu_quant, weighted_swiglu_quant_backward  # noqa: E402

ALIGN = 16  # per-expert row padding: TE's blockwise GEMM needs multiples of 8; megatron pads FP8 to 16


@dataclass(frozen=True)
class Shape:
    name: str
    tokens: int
    hidden: int
    ffn: int  # moe_ffn_hidden_size (fc1 out = 2 * ffn)
    experts: int
    topk: int


SHAPES = {
    s.name: s
    for s in [
        Shape("v2lite-4k", 4096, 2048, 1408, 64, 6),  # DeepSeek-V2-Lite MoE layer
        Shape("v2lite-16k", 16384, 2048, 1408, 64, 6),
        Shape("v2lite-32k", 32768, 2048, 1408, 64, 6),
        Shape("paper-24k-h7168", 24576, 7168, 2048, 256, 8),  # paper range: 24-32k tokens, hidden 1280-9216, top-8
        Shape("paper-32k-h1280", 32768, 1280, 1024, 64, 6),
    ]
}
DEFAULT_SHAPES = ["v2lite-4k", "v2lite-16k", "v2lite-32k", "paper-24k-h7168", "paper-32k-h1280"]


# --------------------------------------------------------------------------------------------------------------------
# Naive PyTorch: the unfused baselines (eager, and the same functions under torch.compile). Tensors in, tensors out.
# --------------------------------------------------------------------------------------------------------------------


def naive_quantize_1x128(x):
    m, k = x.shape
    nb = -(-k // BLOCK)
    blocks = F.pad(x.float(), (0, nb * BLOCK - k)).view(m, nb, BLOCK)
    scale = scale_from_amax(blocks.abs().amax(dim=2))
    codes = (blocks * scale.unsqueeze(2)).clamp(-E4M3_MAX, E4M3_MAX).to(FP8_DTYPE).view(m, nb * BLOCK)[:, :k]
    return codes.contiguous(), 1.0 / scale


def naive_transpose_split(codes, scale_inv):
    """dequantize -> transpose -> requantize, one split."""
    x = codes.float() * scale_inv.repeat_interleave(BLOCK, dim=1)[:, : codes.shape[1]]
    return naive_quantize_1x128(x.t())


def naive_transpose(transpose_split, codes, scale_inv, m_splits):
    out, start = [], 0
    for s in m_splits:
        if s:
            out.append(transpose_split(codes[start : start + s], scale_inv[start : start + s]))
        start += s
    return out


def naive_permute_pad(codes_u8, scale_inv, probs_flat, src_rows, prob_src):
    valid = (src_rows >= 0).unsqueeze(1)
    idx = src_rows.clamp(min=0)
    out = torch.where(valid, codes_u8.index_select(0, idx), 0)
    out_scale = torch.where(valid, scale_inv.index_select(0, idx), 1.0)
    out_probs = torch.where(prob_src >= 0, probs_flat.index_select(0, prob_src.clamp(min=0)), 0.0)
    return out, out_scale, out_probs


def naive_unpermute_unpad(y, dst_rows, probs):
    acc = torch.zeros(dst_rows.shape[0], y.shape[1], dtype=torch.float32, device=y.device)
    for s in range(dst_rows.shape[1]):
        idx = dst_rows[:, s]
        rows = y.index_select(0, idx.clamp(min=0)).float() * probs[:, s : s + 1]
        acc = acc + torch.where((idx >= 0).unsqueeze(1), rows, 0.0)
    return acc.to(y.dtype)


def per_expert_weight_stack(weights, quantize_128x128_fn):
    """The per-expert loop the Triton GEMM engine ran before the one-launch kernel: each expert quantized 128x128 into
    one stack, then the stack block-transposed (numerics.gemm.quantize_weight_stack with the given quantizer)."""
    stack = Fp8BlockwiseStack.quantize(weights, quantize_128x128_fn)
    return stack, stack.t()


def naive_swiglu_quant(fc1_out, probs):
    a, b = fc1_out.float().chunk(2, dim=1)
    return naive_quantize_1x128(a * torch.sigmoid(a) * b * probs.unsqueeze(1))


def naive_swiglu_quant_backward(grad_out, fc1_out, probs):
    a, b = fc1_out.float().chunk(2, dim=1)
    g, p = grad_out.float(), probs.unsqueeze(1)
    s = torch.sigmoid(a)
    silu = a * s
    gp = g * p
    da = gp * b * (s + silu * (1 - s))
    db = gp * silu
    return naive_quantize_1x128(torch.cat([da, db], dim=1)), (g * silu * b).sum(dim=1)


# --------------------------------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------------------------------

L2_BYTES = 50 * 2**20  # H100: 50 MiB
SPIN_CYCLES_PER_US = 2000  # a bit above the H100's 1.98 GHz boost clock: the spin lasts at least as long as asked


def time_us(fn: Callable, arg_sets: List[tuple], warmup: int, iters: int) -> float:
    """Median GPU time of fn(*args) in µs, rotating over arg_sets."""
    for i in range(warmup):
        fn(*arg_sets[i % len(arg_sets)])
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn(*arg_sets[0])
    host_us = (time.perf_counter() - t0) * 1e6  # host time to queue one call (plus its GPU time: an upper bound)
    torch.cuda.synchronize()
    spin = int(min(host_us * 1.5 + 50, 200_000) * SPIN_CYCLES_PER_US)
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    for i in range(iters):
        args = arg_sets[i % len(arg_sets)]
        torch.cuda._sleep(spin)
        starts[i].record()
        fn(*args)
        ends[i].record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends)) * 1e3


def copy_bandwidth(warmup: int, iters: int) -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write), 1 GiB buffers."""
    n = 2**30
    src = torch.empty(n, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    us = time_us(lambda: dst.copy_(src), [()], warmup, iters)
    return 2 * n / (us * 1e-6)


def num_sets(bytes_per_set: int) -> int:
    return max(2, min(8, math.ceil(3 * L2_BYTES / max(bytes_per_set, 1))))


# --------------------------------------------------------------------------------------------------------------------
# Cases
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class Row:
    kernel: str
    shape: str
    dims: str
    bytes: int
    us: Dict[str, float] = field(default_factory=dict)
    check: str = ""


@dataclass
class Routing:
    routing_map: torch.Tensor  # bool [T, E]
    probs: torch.Tensor  # fp32 [T, E], zero where not routed
    src_rows: torch.Tensor
    prob_src: torch.Tensor
    dst_rows: torch.Tensor  # [T, E]
    dst_topk: torch.Tensor  # [T, topk], expert order
    probs_topk: torch.Tensor
    tokens_per_expert: torch.Tensor
    padded: List[int]


def make_routing(shape: Shape, seed: int) -> Routing:
    g = torch.Generator(device="cuda").manual_seed(seed)
    logits = torch.randn(shape.tokens, shape.experts, device="cuda", generator=g)
    top = logits.topk(shape.topk, dim=1)
    routing_map = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, top.indices, True)
    probs = torch.zeros_like(logits).scatter_(1, top.indices, torch.softmax(top.values, dim=1))
    src_rows, prob_src, dst_rows, padded = routing_rows(routing_map, align=ALIGN)
    order = torch.sort((dst_rows < 0).to(torch.int8), dim=1, stable=True).indices[:, : shape.topk]
    return Routing(routing_map, probs, src_rows, prob_src, dst_rows, dst_rows.gather(1, order).contiguous(),
                   probs.gather(1, order).contiguous(), routing_map.sum(dim=0), padded)  # fmt: skip


def te_modules():
    try:
        import transformer_engine.pytorch as te
        import transformer_engine_torch as tex
        from transformer_engine.pytorch.tensor.float8_blockwise_tensor import Float8BlockQuantizer
        from transformer_engine.pytorch.triton import permutation as te_triton_permutation
    except ImportError as e:  # TE is optional here: its columns stay empty
        print(f"TransformerEngine not importable ({e}); TE columns skipped")
        return None
    quantizer = Float8BlockQuantizer(tex.DType.kFloat8E4M3, rowwise=True, columnwise=False, force_pow_2_scales=True,
                                     amax_epsilon=0.0, block_scaling_dim=1)  # fmt: skip
    # weights: 128x128 blocks in both usages ([N, K] for fprop, the transposed [K, N] for dgrad), as TE keeps them
    quantizer_2d = Float8BlockQuantizer(tex.DType.kFloat8E4M3, rowwise=True, columnwise=True, force_pow_2_scales=True,
                                        amax_epsilon=0.0, block_scaling_dim=2)  # fmt: skip
    return dict(te=te, tex=tex, quantizer=quantizer, quantizer_2d=quantizer_2d,
                triton_permutation=te_triton_permutation)  # fmt: skip


def ddp_weight_views(experts: int, n: int, k: int, seed: int) -> List[torch.Tensor]:
    """`experts` [n, k] bf16 weights as contiguous views of one flat buffer, expert 0 last: separate tensors at
    scattered addresses, as megatron's DDP parameter buffer holds expert parameters."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    buf = torch.randn(experts * n * k, device="cuda", generator=g, dtype=torch.bfloat16).mul_(0.02)
    return [buf[(experts - 1 - e) * n * k : (experts - e) * n * k].view(n, k) for e in range(experts)]


def bytes_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    a, b = a.contiguous(), b.contiguous()
    if a.element_size() == 1:
        return torch.equal(a.view(torch.uint8), b.view(torch.uint8))
    return a.dtype == b.dtype and torch.equal(a.view(torch.int16 if a.element_size() == 2 else torch.int32),
                                              b.view(torch.int16 if b.element_size() == 2 else torch.int32))  # fmt: skip


def code_mismatch(a: torch.Tensor, b: torch.Tensor) -> tuple:
    """(fraction of codes that differ, largest difference in E4M3 steps)."""
    def steps(c):
        c = c.contiguous().view(torch.uint8).to(torch.int32)
        return torch.where(c >= 0x80, -(c & 0x7F), c & 0x7F)

    d = (steps(a) - steps(b)).abs()
    return float((d > 0).float().mean()), int(d.max()) if d.numel() else 0


class Bench:
    def __init__(self, args, te):
        self.args, self.te = args, te
        self.compiled: Dict[str, Callable] = {}
        self.failed: List[str] = []
        self.weight_dims_done = set()  # (experts, n, k) already timed: weight quantization does not depend on tokens

    def compile(self, name, fn):
        if name not in self.compiled:
            self.compiled[name] = torch.compile(fn, dynamic=True)
        return self.compiled[name]

    def time(self, row: Row, impl: str, fn: Callable, arg_sets: List[tuple]):
        if impl != "ours" and impl in self.args.skip:
            return
        iters = self.args.iters
        try:
            row.us[impl] = time_us(fn, arg_sets, self.args.warmup, iters)
        except Exception as e:  # a baseline that cannot run at this shape is reported, not fatal
            print(f"  {row.kernel} {row.shape}: {impl} failed: {type(e).__name__}: {str(e)[:200]}")
        finally:
            torch.cuda.synchronize()

    def checked(self, row: Row, ok: bool, detail: str = ""):
        row.check = ("ok" if ok else "FAILED") + (f" ({detail})" if detail else "")
        if not ok:
            self.failed.append(f"{row.kernel} {row.shape}: {detail}")

    # ---- quantize (cast #1: the tokens before dispatch) ----
    def quantize(self, shape: Shape) -> Row:
        t, h = shape.tokens, shape.hidden
        nbk = -(-h // BLOCK)
        row = Row("quantize 1x128", shape.name, f"[{t}, {h}] bf16", t * h * 2 + t * h + t * nbk * 4)
        sets = [(torch.randn(t, h, device="cuda").bfloat16() * (i + 1),) for i in range(num_sets(t * h * 2))]
        x = sets[0][0]
        got, ref = kernels.quantize_1x128_triton(x), quantize_1x128(x)
        ok = bytes_equal(got.data, ref.data) and torch.equal(got.scale_inv, ref.scale_inv)
        detail = "bit-exact vs numerics"
        if self.te:
            te_q = self.te["quantizer"](x)
            te_ok = bytes_equal(got.data, te_q._rowwise_data) and torch.equal(
                got.scale_inv, te_q._rowwise_scale_inv[:, :t].t())
            ok, detail = ok and te_ok, detail + (", vs TE" if te_ok else ", DIFFERS FROM TE")
        self.checked(row, ok, detail)
        self.time(row, "ours", kernels.quantize_1x128_triton, sets)
        self.time(row, "eager", naive_quantize_1x128, sets)
        self.time(row, "compile", self.compile("quantize", naive_quantize_1x128), sets)
        if self.te:
            self.time(row, "te", self.te["quantizer"], sets)
        return row

    # ---- scaling-aware transpose (wgrad operand of fc1: the permuted, padded FP8 tokens) ----
    def transpose(self, shape: Shape, routing: Routing) -> Row:
        n, h = sum(routing.padded), shape.hidden
        nbk, mbs = -(-h // BLOCK), sum(-(-m // BLOCK) for m in routing.padded)
        row = Row("transpose (gemm-ready)", shape.name, f"[{n}, {h}] fp8, {shape.experts} splits",
                  n * h + n * nbk * 4 + h * n + mbs * (-(-h // 4) * 4) * 4)  # fmt: skip
        sets = []
        for i in range(num_sets(n * h)):
            q = kernels.quantize_1x128_triton(torch.randn(n, h, device="cuda").bfloat16() * 2.0 ** (i - 4))
            sets.append((q, routing.padded))
        q = sets[0][0]
        got = kernels.scaling_aware_transpose_cuda(q, routing.padded)  # compact, for the comparisons
        got_gr = kernels.scaling_aware_transpose_cuda(q, routing.padded, scale_layout="gemm_ready")
        naive = naive_transpose(naive_transpose_split, q.data, q.scale_inv, routing.padded)
        ok = all(bytes_equal(t.data, c) and torch.equal(t.scale_inv, s)
                 for t, (c, s) in zip([t for t, m in zip(got, routing.padded) if m], naive))  # fmt: skip
        ok = ok and all(torch.equal(a.data.view(torch.uint8), b.data.view(torch.uint8))
                        and torch.equal(a.scale_inv.t(), b.scale_inv[:, :h]) for a, b in zip(got, got_gr))  # fmt: skip
        # The numerics twin (integer arithmetic) on the first splits: it needs ~20 int32 copies of its input.
        first = 0
        while first < len(routing.padded) and sum(routing.padded[: first + 1]) * h <= 1 << 26:
            first += 1
        m_first = sum(routing.padded[:first])
        twin = scaling_aware_transpose(Fp8Blockwise(q.data[:m_first], q.scale_inv[:m_first]), routing.padded[:first])
        ok = ok and all(bytes_equal(a.data, b.data) and torch.equal(a.scale_inv, b.scale_inv)
                        for a, b in zip(got[:first], twin))  # fmt: skip
        self.checked(row, ok, f"bit-exact vs dequant->requant (all splits) and numerics ({first} splits)")
        del got, got_gr, naive, twin
        self.time(row, "ours", lambda q, ms: kernels.scaling_aware_transpose_cuda(q, ms, scale_layout="gemm_ready"),
                  sets)  # fmt: skip
        raw = [(q.data, q.scale_inv, ms) for q, ms in sets]
        self.time(row, "eager", lambda c, s, ms: naive_transpose(naive_transpose_split, c, s, ms), raw)
        split_fn = self.compile("transpose", naive_transpose_split)
        self.time(row, "compile", lambda c, s, ms: naive_transpose(split_fn, c, s, ms), raw)
        return row

    # ---- fused permute + pad (dispatch, EP=1: tokens -> expert-major padded FP8 + scales + probs) ----
    def permute(self, shape: Shape, routing: Routing) -> Row:
        t, h, n = shape.tokens, shape.hidden, sum(routing.padded)
        nbk = -(-h // BLOCK)
        valid = t * shape.topk
        row = Row("permute+pad", shape.name, f"[{t}, {h}] fp8 -> [{n}, {h}]",
                  valid * (h + nbk * 4 + 4) + n * (h + nbk * 4 + 4) + n * 16)  # fmt: skip
        qs = [kernels.quantize_1x128_triton(torch.randn(t, h, device="cuda").bfloat16()) for _ in range(num_sets(t * h))]
        args = [(q, routing.src_rows, routing.probs, routing.prob_src) for q in qs]
        got, got_p = kernels.permute_pad_rows_triton(*args[0])
        ref, ref_p = permute_pad_rows(*args[0])
        ok = bytes_equal(got.data, ref.data) and torch.equal(got.scale_inv, ref.scale_inv) and torch.equal(got_p, ref_p)
        self.checked(row, ok, "bit-exact vs numerics")
        self.time(row, "ours", kernels.permute_pad_rows_triton, args)
        raw = [(q.data.view(torch.uint8), q.scale_inv, routing.probs.reshape(-1), routing.src_rows, routing.prob_src)
               for q in qs]  # fmt: skip
        self.time(row, "eager", naive_permute_pad, raw)
        self.time(row, "compile", self.compile("permute", naive_permute_pad), raw)
        if self.te:
            te, quantizer = self.te["te"], self.te["quantizer"]
            te_in = [(quantizer(torch.randn(t, h, device="cuda").bfloat16()),) for _ in range(len(qs))]
            fn = lambda x: te.moe_permute_and_pad_with_probs(  # noqa: E731
                x, routing.probs, routing.routing_map, routing.tokens_per_expert, ALIGN)
            out = fn(te_in[0][0])
            row_id_map, pad_offsets = out[2], out[3]
            self.time(row, "te", fn, te_in)
            # TE's permute kernel alone, given its row map and the scales already in [T, K/128] order.
            perm = self.te["triton_permutation"].permute_with_mask_map
            kargs = [(q.data.view(torch.uint8), q.scale_inv) for q in qs]
            self.time(row, "te_kernel", lambda d, s: perm(d, row_id_map, routing.probs, s, pad_offsets, t,
                                                         shape.experts, n, h, nbk), kargs)  # fmt: skip
        return row

    # ---- fused unpad + unpermute (BF16 combine: expert outputs -> tokens, weighted by probs) ----
    def unpermute(self, shape: Shape, routing: Routing) -> Row:
        t, h, n = shape.tokens, shape.hidden, sum(routing.padded)
        valid = t * shape.topk
        row = Row("unpermute+unpad", shape.name, f"[{n}, {h}] bf16 -> [{t}, {h}]",
                  valid * h * 2 + t * shape.topk * 12 + t * h * 2)  # fmt: skip
        ys = [torch.randn(n, h, device="cuda").bfloat16() for _ in range(num_sets(n * h * 2))]
        args = [(y, routing.dst_topk, routing.probs_topk) for y in ys]
        got = kernels.unpermute_unpad_rows_triton(*args[0])
        ref = unpermute_unpad_rows(*args[0])
        self.checked(row, bytes_equal(got, ref), "bit-exact vs numerics")
        self.time(row, "ours", kernels.unpermute_unpad_rows_triton, args)
        self.time(row, "eager", naive_unpermute_unpad, args)
        self.time(row, "compile", self.compile("unpermute", naive_unpermute_unpad), args)
        if self.te:
            te = self.te["te"]
            x0 = self.te["quantizer"](torch.randn(t, h, device="cuda").bfloat16())
            _, _, row_id_map, pad_offsets, _ = te.moe_permute_and_pad_with_probs(
                x0, routing.probs, routing.routing_map, routing.tokens_per_expert, ALIGN)
            fn = lambda y: te.moe_unpermute(y, row_id_map, merging_probs=routing.probs,  # noqa: E731
                                            restore_shape=torch.Size((t, h)), map_type="mask", pad_offsets=pad_offsets)
            self.time(row, "te", fn, [(y,) for y in ys])
        return row

    # ---- 128x128 weight quantization (once per optimizer step): all local experts of one linear, both usages ----
    def weight_quant(self, shape: Shape) -> List[Row]:
        """fc1 [2F, H] and fc2 [H, F] with the local experts of EP=1 (all, at most 64) and of EP=8 (8). Dims timed
        for an earlier shape are skipped: no tokens are involved."""
        rows = []
        for experts in sorted({min(shape.experts, 64), 8}, reverse=True):
            for n, k in ((2 * shape.ffn, shape.hidden), (shape.hidden, shape.ffn)):
                if (experts, n, k) not in self.weight_dims_done:
                    self.weight_dims_done.add((experts, n, k))
                    rows.append(self.weight_quant_linear(shape, experts, n, k))
        return rows

    def weight_quant_linear(self, shape: Shape, experts: int, n: int, k: int) -> Row:
        nbn, nbk = -(-n // BLOCK), -(-k // BLOCK)
        elems = experts * n * k
        # read the bf16 weights once; write the codes twice ([N, K] and [K, N]) and both scale grids
        row = Row(WEIGHT_QUANT, shape.name, f"{experts} x [{n}, {k}] bf16", elems * 2 + 2 * elems
                  + 2 * experts * nbn * nbk * 4)  # fmt: skip
        sets = [(ddp_weight_views(experts, n, k, seed=i),) for i in range(num_sets(elems * 2))]
        weights = sets[0][0]
        got, got_t = kernels.quantize_weight_stack_triton(weights)
        ref, ref_t = per_expert_weight_stack(weights, quantize_128x128)
        ok = all(bytes_equal(a.data, b.data) and torch.equal(a.scale_inv, b.scale_inv)
                 for a, b in ((got, ref), (got_t, ref_t)))  # fmt: skip
        detail = "bit-exact vs numerics, both usages"
        del ref, ref_t
        if self.te:
            quantizer = self.te["quantizer_2d"]
            te_ok = True
            for e, w in enumerate(weights):  # TE pads the inner scale dimension to a multiple of 4
                q = quantizer(w)
                te_ok = (te_ok and bytes_equal(got.data[e], q._rowwise_data)
                         and torch.equal(got.scale_inv[e], q._rowwise_scale_inv[:, :nbk])
                         and bytes_equal(got_t.data[e], q._columnwise_data)
                         and torch.equal(got_t.scale_inv[e], q._columnwise_scale_inv[:, :nbn]))  # fmt: skip
            ok, detail = ok and te_ok, detail + (", vs TE" if te_ok else ", DIFFERS FROM TE")
        self.checked(row, ok, detail)
        del got, got_t
        self.time(row, "ours", kernels.quantize_weight_stack_triton, sets)
        self.time(row, "eager", lambda ws: per_expert_weight_stack(ws, quantize_128x128), sets)
        compiled = self.compile("quantize_128x128", quantize_128x128)
        self.time(row, "compile", lambda ws: per_expert_weight_stack(ws, compiled), sets)
        if self.te:
            self.time(row, "te", lambda ws: [quantizer(w) for w in ws], sets)
        return row

    # ---- weighted SwiGLU + quant, forward and backward ----
    def swiglu_inputs(self, shape: Shape, routing: Routing, with_grad: bool):
        n, f = sum(routing.padded), shape.ffn
        per_set = n * 2 * f * 2 + (n * f * 2 if with_grad else 0)
        sets = []
        for _ in range(num_sets(per_set)):
            x = torch.randn(n, 2 * f, device="cuda").bfloat16()
            p = torch.rand(n, device="cuda")
            sets.append((torch.randn(n, f, device="cuda").bfloat16() * 1e-3, x, p) if with_grad else (x, p))
        return sets

    def swiglu_fwd(self, shape: Shape, routing: Routing) -> Row:
        n, f = sum(routing.padded), shape.ffn
        row = Row("swiglu+quant fwd", shape.name, f"[{n}, {2 * f}] bf16 -> [{n}, {f}] fp8",
                  n * 2 * f * 2 + n * 4 + n * f + n * -(-f // BLOCK) * 4)  # fmt: skip
        sets = self.swiglu_inputs(shape, routing, with_grad=False)
        got, ref = kernels.weighted_swiglu_quant_triton(*sets[0]), weighted_swiglu_quant(*sets[0])
        frac, worst = code_mismatch(got.data, ref.data)
        scales_equal = torch.equal(got.scale_inv, ref.scale_inv)
        self.checked(row, worst <= 1 and scales_equal, f"codes differing {frac:.1e} (max {worst} step), "
                     f"scales {'exact' if scales_equal else 'DIFFER'}")  # fmt: skip
        self.time(row, "ours", kernels.weighted_swiglu_quant_triton, sets)
        self.time(row, "eager", naive_swiglu_quant, sets)
        self.time(row, "compile", self.compile("swiglu_fwd", naive_swiglu_quant), sets)
        if self.te:
            tex, quantizer = self.te["tex"], self.te["quantizer"]
            self.time(row, "te", lambda x, p: quantizer(tex.scaled_swiglu(x, p, None, 0)), sets)
        return row

    def swiglu_bwd(self, shape: Shape, routing: Routing) -> Row:
        n, f = sum(routing.padded), shape.ffn
        row = Row("swiglu+quant bwd", shape.name, f"[{n}, {f}] + [{n}, {2 * f}] bf16 -> [{n}, {2 * f}] fp8",
                  n * f * 2 + n * 2 * f * 2 + n * 4 + n * 2 * f + n * -(-2 * f // BLOCK) * 4 + n * 4)  # fmt: skip
        sets = self.swiglu_inputs(shape, routing, with_grad=True)
        (got, got_dp), (ref, ref_dp) = (kernels.weighted_swiglu_quant_backward_triton(*sets[0]),
                                        weighted_swiglu_quant_backward(*sets[0]))  # fmt: skip
        frac, worst = code_mismatch(got.data, ref.data)
        scales_equal = torch.equal(got.scale_inv, ref.scale_inv)
        dp_err = float(((got_dp - ref_dp).abs() / ref_dp.abs().clamp(min=1e-12)).median())
        self.checked(row, worst <= 1 and scales_equal, f"codes differing {frac:.1e} (max {worst} step), scales "
                     f"{'exact' if scales_equal else 'DIFFER'}, grad_probs median rel err {dp_err:.1e}")  # fmt: skip
        self.time(row, "ours", kernels.weighted_swiglu_quant_backward_triton, sets)
        self.time(row, "eager", naive_swiglu_quant_backward, sets)
        self.time(row, "compile", self.compile("swiglu_bwd", naive_swiglu_quant_backward), sets)
        if self.te:
            tex, quantizer = self.te["tex"], self.te["quantizer"]

            def te_bwd(g, x, p):
                dx, dp = tex.scaled_dswiglu(g, x, p, None, 0, True)
                return quantizer(dx), dp

            self.time(row, "te", te_bwd, sets)
        return row


# --------------------------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------------------------

BASELINES = [("eager", "eager"), ("compile", "compile"), ("te", "TE op"), ("te_kernel", "TE kernel")]
# (kernel, baseline, minimum ratio ours/baseline) from the issue; "% copy" targets are checked at the large shapes.
TARGETS = [
    ("transpose (gemm-ready)", "eager", 3.0), ("transpose (gemm-ready)", "compile", 1.5),
    ("permute+pad", "eager", 1.7), ("permute+pad", "te", 1.0),
    ("unpermute+unpad", "eager", 6.6), ("unpermute+unpad", "te", 1.0),
    ("swiglu+quant fwd", "eager", 2.2), ("swiglu+quant bwd", "eager", 4.0),
]  # fmt: skip
COPY_TARGETS = {"transpose (gemm-ready)": 85.0}  # every other kernel: 80% of copy bandwidth at the large shapes
WEIGHT_QUANT = "weight quant 128x128"  # token-independent: its copy target is checked at whatever shape it ran


def table(rows: List[Row], copy_bw: float) -> List[str]:
    head = "| kernel | shape | dims | ours µs | GB/s | % copy |" + "".join(f" {n} µs | × {n} |" for _, n in BASELINES)
    lines = [head + " check |", "|" + "---|" * (head.count("|") - 1 + 1)]
    for r in rows:
        ours = r.us.get("ours")
        cells = [r.kernel, r.shape, r.dims]
        if ours:
            gbs = r.bytes / (ours * 1e-6) / 1e9
            cells += [f"{ours:.1f}", f"{gbs:.0f}", f"{100 * gbs * 1e9 / copy_bw:.0f}%"]
        else:
            cells += ["–", "–", "–"]
        for key, _ in BASELINES:
            b = r.us.get(key)
            cells += [f"{b:.1f}" if b else "–", f"{b / ours:.2f}×" if b and ours else "–"]
        cells.append(r.check)
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def target_lines(rows: List[Row], copy_bw: float, large_shapes: List[str]) -> List[str]:
    out = []
    for kernel, base, need in TARGETS:
        got = [(r.shape, r.us[base] / r.us["ours"]) for r in rows
               if r.kernel == kernel and r.us.get("ours") and r.us.get(base)]  # fmt: skip
        if got:
            worst = min(got, key=lambda x: x[1])
            verdict = "met" if worst[1] >= need else "MISSED"
            out.append(f"- {kernel} vs {base}: need ≥{need}×; measured {', '.join(f'{s} {x:.2f}×' for s, x in got)}"
                       f" → {verdict}")  # fmt: skip
    for kernel in sorted({r.kernel for r in rows}):
        need = COPY_TARGETS.get(kernel, 80.0)
        at_shape = kernel == WEIGHT_QUANT  # no tokens involved: every shape it ran at counts
        got = [(f"{r.shape} {r.dims}" if at_shape else r.shape, 100 * r.bytes / (r.us["ours"] * 1e-6) / copy_bw)
               for r in rows if r.kernel == kernel and (at_shape or r.shape in large_shapes) and r.us.get("ours")]
        if got:
            verdict = "met" if min(p for _, p in got) >= need else "MISSED"
            where = "at every shape" if at_shape else "at the large shapes"
            out.append(f"- {kernel}: need ≥{need:.0f}% of copy bandwidth {where}; measured "
                       f"{', '.join(f'{s} {p:.0f}%' for s, p in got)} → {verdict}")  # fmt: skip
    return out


def write_report(args, rows: List[Row], copy_bw: float, gpu: str, versions: str, final: bool) -> None:
    lines = table(rows, copy_bw)
    done = list(dict.fromkeys(r.shape for r in rows))
    large = [s for s in done if SHAPES[s].tokens >= 16384]
    targets = target_lines(rows, copy_bw, large)
    if final:
        print("\n".join(lines))
        print("\n".join(targets))
    if args.no_md:
        return
    command = "python scripts/bench_kernels.py " + " ".join(sys.argv[1:])
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    md = [
        "# Kernel benchmarks",
        "",
        f"Command: `{command.strip()}` (commit {commit.stdout.strip() or 'unknown'})  ",
        f"GPU: {gpu}; {versions}; device-to-device copy bandwidth measured in the same run: {copy_bw / 1e9:.0f} GB/s."
        + ("" if final else " PARTIAL: the run stopped before every shape was done."),
        "",
        "Method (scripts/bench_kernels.py): each kernel is checked against its reference first (the check column), "
        f"then CUDA-event GPU time, median of {args.iters} after {args.warmup} warm-up calls, inputs rotated over sets "
        "larger than 3x L2; a spin kernel queued before each call keeps host launch overhead out of every number. "
        "× columns are baseline time / ours (higher is better). eager = naive PyTorch (the dequantize/gather/"
        "activation code a non-fused implementation runs), compile = the same code under torch.compile(dynamic=True), "
        "TE op = TransformerEngine's public op (permute: moe_permute_and_pad_with_probs, which also builds its row "
        "map and syncs on the padded size; unpermute: moe_unpermute(pad_offsets=); quantize: Float8BlockQuantizer; "
        "SwiGLU: tex.scaled_swiglu / scaled_dswiglu + Float8BlockQuantizer), TE kernel = TE's permute kernel alone "
        f"with its row map precomputed. Experts are padded to {ALIGN} rows; GB/s counts the bytes a kernel must move. "
        f"{WEIGHT_QUANT}: the local experts' weights of one linear (EP=1: all, at most 64; EP=8: 8) as separate "
        "views of one buffer; eager = the per-expert loop over numerics.quantize_128x128 + block transpose that the "
        "Triton engine ran before, compile = that loop with quantize_128x128 compiled, TE op = "
        "Float8BlockQuantizer(block_scaling_dim=2, rowwise + columnwise) per expert; bytes = bf16 read once, codes "
        "written twice ([N, K] and [K, N]), both scale grids.",
        "",
        "| shape | tokens | hidden | moe_ffn | experts | top-k |",
        "|---|---|---|---|---|---|",
        *[f"| {s} | {SHAPES[s].tokens} | {SHAPES[s].hidden} | {SHAPES[s].ffn} | {SHAPES[s].experts} | "
          f"{SHAPES[s].topk} |" for s in done],
        "",
        *lines,
        "",
        "## Targets (issue 5)",
        "",
        *targets,
        "",
    ]  # fmt: skip
    Path(args.md).write_text("\n".join(md), encoding="utf-8")
    if final:
        print(f"wrote {args.md}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=DEFAULT_SHAPES, choices=sorted(SHAPES))
    parser.add_argument("--kernels", nargs="+", default=["quantize", "transpose", "permute", "unpermute",
                                                          "swiglu_fwd", "swiglu_bwd", "weight_quant"])  # fmt: skip
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--skip", nargs="*", default=[], choices=["eager", "compile", "te", "te_kernel"],
                        help="baselines not to time")  # fmt: skip
    parser.add_argument("--md", default=str(ROOT / "BENCHMARKS.md"), help="markdown file to write")
    parser.add_argument("--no-md", action="store_true")
    args = parser.parse_args()

    torch._dynamo.config.cache_size_limit = 64
    torch.manual_seed(0)
    gpu = torch.cuda.get_device_name(0)
    te = None if {"te", "te_kernel"} <= set(args.skip) else te_modules()
    te_version = __import__("transformer_engine").__version__ if te else "not used"
    import triton

    versions = f"torch {torch.__version__}, Triton {triton.__version__}, TransformerEngine {te_version}"
    copy_bw = copy_bandwidth(args.warmup, args.iters)
    print(f"{gpu} | {versions} | device-to-device copy: {copy_bw / 1e9:.0f} GB/s")
    bench = Bench(args, te)
    rows: List[Row] = []
    for name in args.shapes:
        shape = SHAPES[name]
        routing = make_routing(shape, seed=len(rows))
        for k in args.kernels:
            t0 = time.perf_counter()
            fn = getattr(bench, k)
            new = fn(shape) if k in ("quantize", "weight_quant") else fn(shape, routing)
            for row in new if isinstance(new, list) else [new]:  # weight_quant: one row per linear and expert count
                rows.append(row)
                ours = row.us.get("ours")
                print(f"  {row.kernel:24s} {name:18s} ours {ours or 0:9.1f} µs  "
                      + "  ".join(f"{b} {row.us[b]:9.1f}" for b, _ in BASELINES if b in row.us)
                      + f"  [{row.check}] ({time.perf_counter() - t0:.0f} s)", flush=True)  # fmt: skip
            torch.cuda.empty_cache()
        del routing
        torch.cuda.empty_cache()
        write_report(args, rows, copy_bw, gpu, versions, final=False)  # a partial table survives a timeout

    write_report(args, rows, copy_bw, gpu, versions, final=True)
    if bench.failed:
        print("CHECK FAILURES:\n  " + "\n  ".join(bench.failed))
        sys.exit(1)


if __name__ == "__main__":
    main()
