"""Grouped-GEMM benchmark for issue 15: FP8 grouped GEMMs vs BF16, TE and the dense cuBLAS FP8 ceiling, side by side.

    python scripts/bench_grouped_gemm.py                                     # all shapes and GEMMs, table to stdout
    python scripts/bench_grouped_gemm.py --write BENCHMARKS.md               # ... and append the table there
    python scripts/bench_grouped_gemm.py --shapes ep1-fc1,8:12288:2048:2816 --gemms fprop,wgrad --iters 30

Shapes (rows of 16k tokens x top-6 of DeepSeek-V2-Lite): ep1 = 64 experts x 1,536 rows, ep8 = 8 experts x 12,288 rows;
fc1 K=2048 -> N=2816, fc2 K=1408 -> N=2048 (a custom shape is E:rows:K:N). GEMMs: fprop y[M,N] = x W^T, dgrad
dx[M,K] = dy W, wgrad dW[e][N,K] = dy_e^T x_e. FLOPs = 2*M*N*K per GEMM (wgrad: 2*N*K*rows summed over experts).

Every implementation gets the same data: x and dy quantized 1x128 by the package's quantizer, the weights 128x128 by
quantize_weight_stack_triton; BF16 implementations read those FP8 values dequantized to bf16 (exact). Each result is
checked against the fp32 product of the dequantized operands (relative Frobenius error printed) before timing.
Timing: scripts/bench_kernels.py's time_us (CUDA events, median of --iters after --warmup, a spin kernel ahead of each
call so the numbers are GPU time, operand sets rotated to exceed 3x L2). TE GroupedLinear columns time the module
(fprop = forward incl. TE's input quantization with cached FP8 weights; dgrad = backward with delay_wgrad_compute;
wgrad = backward_dw), so they include TE's own quantization kernels; "TE gemm" is general_grouped_gemm on our operands;
"ours_te_grouped" is our operands in TE's single-launch grouped-tensor GEMM (the te_grouped engine, counts on the
device; its wgrad includes two grouped scaling-aware transposes): needs Hopper and a run-time cuBLASLt >= 13.6, e.g.
    LD_PRELOAD="<cublas-13.6>/libcublasLt.so.13 <cublas-13.6>/libcublas.so.13" python scripts/bench_grouped_gemm.py
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


# the pure-Python half (shapes, FLOPs, table, targets), split off to keep each file short
sys.path.insert(0, str(ROOT / "scripts"))
from bench_grouped_gemm_report import (  # noqa: E402
    GEMMS,
    GemmShape,
    Result,
    SHAPES,
    WeightQuant,
    parse_gemms,
    parse_shapes,
    report,
    weight_quant_bytes,
    write_markdown,
)

# ---------------------------------------------------------------------------------------------------------------------
# CUDA: operands, one function per implementation, timing. Nothing here runs at import.
# ---------------------------------------------------------------------------------------------------------------------


def _bk():
    """scripts/bench_kernels.py's timing helpers (importing it has no side effects beyond its imports)."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import bench_kernels

    return bench_kernels


def rel_err(out, ref) -> float:
    import torch

    out = torch.stack(list(out)) if isinstance(out, (list, tuple)) else out
    return float((out.float() - ref).norm() / ref.norm().clamp_min(1e-30))


@dataclass
class Problem:
    shape: GemmShape
    splits: List[int]
    offs: object  # int32 [E] cumulative row ends (torch._grouped_mm)
    splits_dev: object  # int64 [E] (TE grouped-tensor path)
    weights: list  # E bf16 [N, K] views (DDP-buffer-like), the source of the quantized stack
    stack: object  # Fp8BlockwiseStack [E, N, K]
    stack_t: object  # [E, K, N]
    w_bf: object  # bf16 [E, N, K]: the stack dequantized (exact)
    sets: List[dict]  # rotated operand sets: x_q, dy_q (Fp8Blockwise), x_bf, dy_bf (exact bf16 of the FP8 values)
    refs: Dict[str, object] = field(default_factory=dict)  # gemm -> fp32 reference on sets[0]


def make_problem(shape: GemmShape, seed: int = 0) -> Problem:
    import torch

    from fp8flow_megatron import kernels
    from fp8flow_megatron.numerics import dequantize

    bk = _bk()
    e, m, n, k = shape.experts, shape.m_total, shape.n, shape.k
    weights = bk.ddp_weight_views(e, n, k, seed)
    stack, stack_t = kernels.quantize_weight_stack_triton(weights)
    w_bf = torch.stack([dequantize(w) for w in stack]).to(torch.bfloat16)
    per_set = m * (k + n) * 3 + m * (k + n) // 32  # fp8 + bf16 copies + scales
    g = torch.Generator(device="cuda").manual_seed(seed + 1)
    sets = []
    for _ in range(bk.num_sets(per_set)):
        x_q = kernels.quantize_1x128_triton(torch.randn(m, k, device="cuda", generator=g, dtype=torch.bfloat16))
        dy_q = kernels.quantize_1x128_triton(torch.randn(m, n, device="cuda", generator=g, dtype=torch.bfloat16) * 1e-3)
        sets.append(dict(x_q=x_q, dy_q=dy_q, x_bf=dequantize(x_q).to(torch.bfloat16), dy_bf=dequantize(dy_q).to(torch.bfloat16)))
    splits = shape.m_splits
    offs = torch.tensor(splits, device="cuda").cumsum(0).to(torch.int32)
    return Problem(shape, splits, offs, torch.tensor(splits, dtype=torch.int64, device="cuda"), weights, stack,
                   stack_t, w_bf, sets)  # fmt: skip


def compute_refs(p: Problem, gemms: Sequence[str]) -> None:
    """fp32 products of the dequantized operands of sets[0], expert by expert."""
    import torch

    x, dy, w = p.sets[0]["x_bf"], p.sets[0]["dy_bf"], p.w_bf
    bounds = [(sum(p.splits[:i]), sum(p.splits[: i + 1])) for i in range(len(p.splits))]
    if "fprop" in gemms:
        p.refs["fprop"] = torch.cat([x[a:b].float() @ w[i].float().t() for i, (a, b) in enumerate(bounds)])
    if "dgrad" in gemms:
        p.refs["dgrad"] = torch.cat([dy[a:b].float() @ w[i].float() for i, (a, b) in enumerate(bounds)])
    if "wgrad" in gemms:
        p.refs["wgrad"] = torch.stack([dy[a:b].float().t() @ x[a:b].float() for a, b in bounds])


Builder = Callable[[Problem, str], Tuple[Callable, List[tuple]]]  # -> (fn, arg_sets); fn(*arg_sets[i]) -> output


def measure(res: Dict[str, Result], impl: str, p: Problem, gemms, build: Builder, args) -> None:
    """Check fn against the fp32 reference on sets[0], then time it; an exception becomes the cell's note."""
    bk = _bk()
    for gemm in gemms:
        try:
            fn, arg_sets = build(p, gemm)
            res[gemm].err[impl] = err = rel_err(fn(*arg_sets[0]), p.refs[gemm])
            res[gemm].us[impl] = bk.time_us(fn, arg_sets, args.warmup, args.iters)
            print(f"  {gemm:5s} {impl:16s} rel err {err:.2e}  {res[gemm].tf(impl):8,.0f} TFLOP/s", flush=True)
        except Exception as exc:  # noqa: BLE001 -- one missing implementation must not end the run
            res[gemm].notes[impl] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:80]}" if str(exc) else type(exc).__name__
            print(f"  {gemm:5s} {impl:16s} unavailable: {res[gemm].notes[impl]}", flush=True)


def build_bf16_grouped_mm(p: Problem, gemm: str):
    import torch

    wt = p.w_bf.transpose(1, 2)  # [E, K, N], column-major per expert

    def fn(x, dy):
        if gemm == "fprop":
            return torch._grouped_mm(x, wt, offs=p.offs, out_dtype=torch.bfloat16)
        if gemm == "dgrad":
            return torch._grouped_mm(dy, p.w_bf, offs=p.offs, out_dtype=torch.bfloat16)
        return torch._grouped_mm(dy.t(), x, offs=p.offs, out_dtype=torch.bfloat16)  # [N, M] x [M, K] -> [E, N, K]

    return fn, [(s["x_bf"], s["dy_bf"]) for s in p.sets]


def build_bf16_mm_loop(p: Problem, gemm: str):
    import torch

    m, n, k = p.shape.m_total, p.shape.n, p.shape.k
    bounds = [(sum(p.splits[:i]), sum(p.splits[: i + 1])) for i in range(len(p.splits))]
    out = torch.empty((m, n) if gemm == "fprop" else (m, k) if gemm == "dgrad" else (len(bounds), n, k),
                      dtype=torch.bfloat16, device="cuda")  # fmt: skip

    def fn(x, dy):
        for i, (a, b) in enumerate(bounds):
            if gemm == "fprop":
                torch.mm(x[a:b], p.w_bf[i].t(), out=out[a:b])
            elif gemm == "dgrad":
                torch.mm(dy[a:b], p.w_bf[i], out=out[a:b])
            else:
                torch.mm(dy[a:b].t(), x[a:b], out=out[i])
        return out

    return fn, [(s["x_bf"], s["dy_bf"]) for s in p.sets]


def build_ceiling(p: Problem, gemm: str):
    """One dense torch._scaled_mm of the same M, N, K (cuBLASLt blockwise FP8, Hopper): a [M, K] row-major with 1x128
    scales [M, K/128] outer-dim-major (stride (1, M)); b [K, N] column-major with 128x128 scales [K/128, N/128] (the
    transpose of a contiguous [N/128, K/128] grid). wgrad: both operands 1x128 (the scaling-aware transposes of dy and
    x over all rows), scale_b [M/128, K] contiguous. Output bf16 (the only one blockwise scaling gives)."""
    import torch

    from fp8flow_megatron.kernels import scaling_aware_transpose_cuda

    def outer_major(s):
        return s.t().contiguous().t()

    sets = []
    for s in p.sets:
        if gemm == "fprop":
            a, b = s["x_q"], p.stack[0]
            sets.append((a.data, b.data.t(), outer_major(a.scale_inv), b.scale_inv.t()))
        elif gemm == "dgrad":
            a, b = s["dy_q"], p.stack_t[0]  # b: W^T [K, N] 128x128 -> as mat_b [N, K] column-major
            sets.append((a.data, b.data.t(), outer_major(a.scale_inv), b.scale_inv.t()))
        else:
            g_t, x_t = scaling_aware_transpose_cuda(s["dy_q"]), scaling_aware_transpose_cuda(s["x_q"])  # [N, M], [K, M]
            sets.append((g_t.data, x_t.data.t(), outer_major(g_t.scale_inv), x_t.scale_inv.t().contiguous()))

    def fn(a, b, sa, sb):
        return torch._scaled_mm(a, b, sa, sb, out_dtype=torch.bfloat16)

    # the reference for the check is the grouped product; the dense GEMM uses expert 0's weight for all rows
    ref = p.refs[gemm]
    if gemm == "fprop":
        p.refs["ceiling_" + gemm] = p.sets[0]["x_bf"].float() @ p.w_bf[0].float().t()
    elif gemm == "dgrad":
        p.refs["ceiling_" + gemm] = p.sets[0]["dy_bf"].float() @ p.w_bf[0].float()
    else:
        p.refs["ceiling_" + gemm] = ref.sum(0)
    return fn, sets


def build_ours(p: Problem, gemm: str):
    import torch

    from fp8flow_megatron.kernels import fp8_grouped_gemm_nt_triton, fp8_grouped_wgrad_triton

    def fn(x_q, dy_q):
        if gemm == "fprop":
            return fp8_grouped_gemm_nt_triton(x_q, p.stack, p.splits, torch.bfloat16)
        if gemm == "dgrad":
            return fp8_grouped_gemm_nt_triton(dy_q, p.stack_t, p.splits, torch.bfloat16)
        return fp8_grouped_wgrad_triton(dy_q, x_q, p.splits, torch.bfloat16)  # incl. its two scaling-aware transposes

    return fn, [(s["x_q"], s["dy_q"]) for s in p.sets]


def build_te_gemm(p: Problem, gemm: str):
    """TE's general_grouped_gemm (one cuBLASLt call per expert) on our pre-quantized operands: the package's 'te'
    engine (ops/gemm_engine.TEGroupedGemm). Its weights are TE's 128x128 quantization of the dequantized stack, which
    reproduces the same codes and power-of-two scales."""
    import torch

    from fp8flow_megatron.ops.gemm_engine import TEGroupedGemm

    engine = getattr(p, "_te_engine", None)
    if engine is None:
        engine = p._te_engine = TEGroupedGemm()
        p._te_weights = engine.quantize_weights(list(p.w_bf.unbind(0)))

    def fn(x_q, dy_q):
        if gemm == "fprop":
            return engine.fprop(x_q, p._te_weights, p.splits, torch.bfloat16)
        if gemm == "dgrad":
            return engine.dgrad(dy_q, p._te_weights, p.splits, torch.bfloat16)
        return engine.wgrad(dy_q, x_q, p.splits, torch.bfloat16)

    return fn, [(s["x_q"], s["dy_q"]) for s in p.sets]


def build_te_grouped(p: Problem, gemm: str):
    """Our operands into TE's single-launch grouped-tensor GEMM (the 'te_grouped' engine, ops/te_grouped_gemm.py),
    counts on the device (a RowGroups); unsupported (cuBLASLt < 13.6, not Hopper, no TE) raises with the reason."""
    import torch

    from fp8flow_megatron.numerics.groups import RowGroups
    from fp8flow_megatron.ops.te_grouped_gemm import TEGroupedTensorGemm, te_grouped_support

    ok, reason = te_grouped_support()
    if not ok:
        raise RuntimeError(reason)  # the cell reads "n/a (RuntimeError: <reason>)"
    if getattr(p, "_tg_engine", None) is None:
        p._tg_engine = TEGroupedTensorGemm()
        p._tg_weights = p._tg_engine.quantize_weights(list(p.w_bf.unbind(0)))
        p._tg_groups = RowGroups.from_counts(p.splits_dev, p.shape.m_total, 16)
    engine, w, groups = p._tg_engine, p._tg_weights, p._tg_groups

    def fn(x_q, dy_q):
        if gemm == "fprop":
            return engine.fprop(x_q, w, groups, torch.bfloat16)
        if gemm == "dgrad":
            return engine.dgrad(dy_q, w, groups, torch.bfloat16)
        return engine.wgrad(dy_q, x_q, groups, torch.bfloat16)  # incl. its two grouped transposes

    return fn, [(s["x_q"], s["dy_q"]) for s in p.sets]


def te_status() -> Tuple[Optional[dict], str]:
    """TE's modules and whether the grouped-tensor path is usable (TE's own predicate), with the cuBLASLt version."""
    try:
        import transformer_engine.pytorch as te
        import transformer_engine_torch as tex
        from transformer_engine.common.recipe import Float8BlockScaling, Format
    except ImportError as exc:
        return None, f"TE not importable: {exc}"
    v = tex.get_cublasLt_version()
    cublas = f"cuBLASLt {v // 10000}.{v // 100 % 100}.{v % 100}"
    recipe = Float8BlockScaling(fp8_format=Format.E4M3)
    try:
        from transformer_engine.pytorch.module.grouped_linear import is_module_grouped_tensor_path_supported

        import torch

        gt_fp8 = bool(is_module_grouped_tensor_path_supported(recipe, torch.bfloat16))
        gt_bf16 = bool(is_module_grouped_tensor_path_supported(None, torch.bfloat16))
    except ImportError:
        gt_fp8 = gt_bf16 = False
    return dict(te=te, recipe=recipe, gt_fp8=gt_fp8, gt_bf16=gt_bf16, cublas=cublas), cublas


def bench_te_module(res: Dict[str, Result], impl: str, p: Problem, gemms, env: dict, fp8: bool, grouped: bool, args):
    """GroupedLinear(E, K, N) with our dequantized weights; fprop = forward, dgrad = backward (delay_wgrad_compute),
    wgrad = backward_dw, timed per phase with CUDA events (a spin ahead of each phase: GPU time)."""
    import contextlib

    import torch

    te, bk = env["te"], _bk()
    e, k, n = p.shape.experts, p.shape.k, p.shape.n
    mod = te.GroupedLinear(e, k, n, bias=False, params_dtype=torch.bfloat16, device="cuda",
                           delay_wgrad_compute=True, use_grouped_tensor=grouped)  # fmt: skip
    with torch.no_grad():
        for i in range(e):
            getattr(mod, f"weight{i}").copy_(p.w_bf[i])
    splits = p.splits_dev if grouped else p.splits
    params = [getattr(mod, f"weight{i}") for i in range(e)]

    def ctx():
        if not fp8:
            return contextlib.nullcontext()
        autocast = getattr(te, "autocast", None)
        return autocast(enabled=True, recipe=env["recipe"]) if autocast else te.fp8_autocast(enabled=True, fp8_recipe=env["recipe"])

    xs = [s["x_bf"].detach().clone().requires_grad_(True) for s in p.sets]

    def step(i, first, events=None, spin=0):
        x, dy = xs[i % len(xs)], p.sets[i % len(xs)]["dy_bf"]
        x.grad = None
        for w in params:
            w.grad = None
        for phase in range(3):
            if events:
                torch.cuda._sleep(spin)
                events[phase][0].record()
            if phase == 0:
                with ctx():
                    y = mod(x, splits, is_first_microbatch=first)
            elif phase == 1:
                y.backward(dy)
            else:
                mod.backward_dw()
            if events:
                events[phase][1].record()
        return y, x.grad, [w.grad for w in params]

    y, dx, dw = step(0, True)
    errs = {"fprop": rel_err(y, p.refs["fprop"]) if "fprop" in p.refs else None,
            "dgrad": rel_err(dx, p.refs["dgrad"]) if "dgrad" in p.refs else None,
            "wgrad": rel_err(dw, p.refs["wgrad"]) if "wgrad" in p.refs else None}  # fmt: skip
    del y, dx, dw
    for i in range(args.warmup):
        step(i, False)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    step(0, False)
    spin = int(min((time.perf_counter() - t0) * 1e6 + 50, 200_000) * bk.SPIN_CYCLES_PER_US)
    torch.cuda.synchronize()
    runs = []
    for i in range(args.iters):
        ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(3)]
        step(i, False, ev, spin)
        runs.append(ev)
    torch.cuda.synchronize()
    for phase, gemm in enumerate(GEMMS):
        if gemm in gemms:
            us = statistics.median(r[phase][0].elapsed_time(r[phase][1]) for r in runs) * 1e3
            res[gemm].us[impl] = us
            if errs[gemm] is not None:
                res[gemm].err[impl] = errs[gemm]
            print(f"  {gemm:5s} {impl:16s} rel err {errs[gemm] or float('nan'):.2e}  {res[gemm].tf(impl):8,.0f} TFLOP/s")


def bench_weight_quant(shape: GemmShape, copy_bw: float, args) -> WeightQuant:
    import torch

    from fp8flow_megatron import kernels
    from fp8flow_megatron.numerics import quantize_128x128

    bk = _bk()
    nbytes = weight_quant_bytes(shape.experts, shape.n, shape.k)
    sets = [(bk.ddp_weight_views(shape.experts, shape.n, shape.k, seed),) for seed in range(bk.num_sets(nbytes))]
    stack, _ = kernels.quantize_weight_stack_triton(sets[0][0])
    exact = all(bk.bytes_equal(stack[i].data, quantize_128x128(sets[0][0][i]).data)
                and bk.bytes_equal(stack[i].scale_inv, quantize_128x128(sets[0][0][i]).scale_inv)
                for i in (0, shape.experts - 1))  # fmt: skip
    us = bk.time_us(kernels.quantize_weight_stack_triton, sets, args.warmup, args.iters)
    del sets, stack
    torch.cuda.empty_cache()
    return WeightQuant(shape, us, nbytes, copy_bw, exact)


def bench_shape(shape: GemmShape, gemms: Sequence[str], env: Optional[dict], args) -> List[Result]:
    import torch

    print(f"\n== {shape.label()}", flush=True)
    p = make_problem(shape, args.seed)
    compute_refs(p, gemms)
    res = {g: Result(g, shape) for g in gemms}
    measure(res, "bf16_grouped_mm", p, gemms, build_bf16_grouped_mm, args)
    measure(res, "bf16_mm_loop", p, gemms, build_bf16_mm_loop, args)
    if env is None:
        for r in res.values():
            r.notes.update(te_bf16="TE not importable", te_fp8="TE not importable", te_fp8_gt="TE not importable",
                           te_gemm="TE not importable")  # fmt: skip
    else:
        for impl, fp8, grouped in (("te_bf16", False, env["gt_bf16"]), ("te_fp8", True, False), ("te_fp8_gt", True, True)):
            if impl == "te_fp8_gt" and not env["gt_fp8"]:
                for r in res.values():
                    r.notes[impl] = f"not available ({env['cublas']})"
                continue
            try:
                bench_te_module(res, impl, p, gemms, env, fp8, grouped, args)
            except Exception as exc:  # noqa: BLE001
                for r in res.values():
                    r.notes[impl] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:80] if str(exc) else ''}"
                print(f"  {impl} unavailable: {exc}", flush=True)
        measure(res, "te_gemm", p, gemms, build_te_gemm, args)
    # the ceiling is checked against its own dense reference
    for gemm in gemms:
        try:
            fn, sets = build_ceiling(p, gemm)
            res[gemm].err["ceiling"] = rel_err(fn(*sets[0]), p.refs["ceiling_" + gemm])
            res[gemm].us["ceiling"] = _bk().time_us(fn, sets, args.warmup, args.iters)
            print(f"  {gemm:5s} ceiling          rel err {res[gemm].err['ceiling']:.2e}  {res[gemm].tf('ceiling'):8,.0f} TFLOP/s")
        except Exception as exc:  # noqa: BLE001
            res[gemm].notes["ceiling"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:80] if str(exc) else ''}"
            print(f"  {gemm:5s} ceiling unavailable: {exc}", flush=True)
    measure(res, "ours", p, gemms, build_ours, args)
    measure(res, "ours_te_grouped", p, gemms, build_te_grouped, args)  # n/a with te_grouped_support()'s reason
    if "wgrad" in gemms:  # how much of ours' wgrad time is its two scaling-aware transposes
        from fp8flow_megatron.kernels.transpose import scaling_aware_transpose_buffers

        us = _bk().time_us(lambda x, dy: (scaling_aware_transpose_buffers(dy, p.splits, "compact"),
                                          scaling_aware_transpose_buffers(x, p.splits, "compact")),
                           [(s["x_q"], s["dy_q"]) for s in p.sets], args.warmup, args.iters)  # fmt: skip
        res["wgrad"].notes["ours_transposes_us"] = f"{us:.0f}"
        print(f"  wgrad: ours includes two scaling-aware transposes, {us:.0f} µs of its {res['wgrad'].us.get('ours', 0):.0f} µs")
    for gemm, r in res.items():
        bad = {i: e for i, e in r.err.items() if e is not None and e > (5e-2 if gemm == "wgrad" else 1e-2)}
        if bad:
            print(f"  WARNING {gemm}: relative error above bound: {bad}")
    del p
    torch.cuda.empty_cache()
    return [res[g] for g in gemms]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="all", help=f"'all' or comma-separated {sorted(SHAPES)} or E:rows:K:N")
    ap.add_argument("--gemms", default="all", help=f"'all' or comma-separated {GEMMS}")
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-weight-quant", action="store_true", help="skip the weight-quantization timing")
    ap.add_argument("--write", metavar="FILE", help="append the markdown report to FILE (e.g. BENCHMARKS.md)")
    args = ap.parse_args(argv)
    shapes, gemms = parse_shapes(args.shapes), parse_gemms(args.gemms)

    import torch

    if not torch.cuda.is_available():
        print("bench_grouped_gemm needs a CUDA GPU", file=sys.stderr)
        return 2
    bk = _bk()
    env, te_line = te_status()
    print(f"TE: {te_line}; grouped-tensor path: fp8 {env and env['gt_fp8']}, bf16 {env and env['gt_bf16']}")
    results = []
    for shape in shapes:
        results += bench_shape(shape, gemms, env, args)
    wq = []
    if not args.no_weight_quant:
        copy_bw = bk.copy_bandwidth(args.warmup, args.iters)
        wq = [bench_weight_quant(s, copy_bw, args) for s in shapes]
        print(f"copy bandwidth {copy_bw / 1e9:,.0f} GB/s")
    try:
        import transformer_engine

        te_version = transformer_engine.__version__
    except ImportError:
        te_version = "n/a"
    header = (f"### Grouped GEMMs, {torch.cuda.get_device_name()} ({datetime.date.today()}; torch {torch.__version__}, "
              f"TE {te_version}, {te_line}; `python scripts/bench_grouped_gemm.py --shapes {args.shapes} --gemms "
              f"{args.gemms} --iters {args.iters}`)")  # fmt: skip
    lines = report(results, wq, header)
    print("\n" + "\n".join(lines))
    if args.write:
        write_markdown(args.write, lines)
        print(f"appended to {args.write}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
