"""Launch-config sweep of our Triton FP8 grouped GEMMs at the DeepSeek-V2-Lite expert shapes (issue 15): which
BLOCK_N / num_warps / num_stages (and whether dropping the K masks) moves the kernels towards the dense cuBLAS FP8
ceiling. One process, CUDA events, medians; every config's output is compared bit for bit with the shipped kernel's.

    python scripts/tune_grouped_gemm.py [--shapes ep1-fc1,ep1-fc2,ep8-fc1] [--iters 30]

fprop/dgrad run the shipped kernel body (`_grouped_gemm_nt_tma_kernel.fn` on Hopper, else `_grouped_gemm_nt_kernel.fn`,
i.e. without its autotuner) at each config;
wgrad runs `_grouped_wgrad_body` on precomputed scaling-aware transposes (GEMM only; the transposes are timed by
bench_grouped_gemm.py). The dense ceiling is bench_grouped_gemm.py's (`torch._scaled_mm` of the same total size).
Prints one table per GEMM; a config that fails to compile (shared memory) is listed with its error.
Kernel-body experiments measured with this script and not ported (hand-pipelined promotion, swapped operands) are in
git history (commit 8a5d021) and their logs in benchmarks/.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

CONFIGS_NT = [dict(BLOCK_N=bn, num_warps=w, num_stages=s) for bn, w, s in itertools.product((64, 128), (4, 8), (2, 3, 4, 5))]
CONFIGS_WGRAD = [dict(BLOCK_N=bn, num_warps=w, num_stages=s) for bn, w, s in itertools.product((64, 128), (4, 8), (2, 3, 4))]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="ep1-fc1,ep1-fc2,ep8-fc1")
    ap.add_argument("--gemms", default="fprop,dgrad,wgrad")
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    args = ap.parse_args(argv)

    import torch
    import triton

    import bench_grouped_gemm as bgg
    import bench_grouped_gemm_report as bggr
    from fp8flow_megatron.kernels import grouped_gemm as gg
    from fp8flow_megatron.kernels.transpose import scaling_aware_transpose_buffers_grouped
    from fp8flow_megatron.numerics.format import BLOCK, ceil_div
    from fp8flow_megatron.numerics.groups import RowGroups

    bk = bgg._bk()
    lines = []
    for shape in bgg.parse_shapes(args.shapes):
        p = bgg.make_problem(shape)
        bgg.compute_refs(p, ("fprop", "dgrad", "wgrad"))  # build_ceiling reads them
        groups = RowGroups.from_splits(p.splits, "cuda")
        for gemm in args.gemms.split(","):
            flops = bggr.gemm_flops(shape, gemm)
            ceil_fn, ceil_sets = bgg.build_ceiling(p, gemm)
            ceil_us = bk.time_us(ceil_fn, ceil_sets, args.warmup, args.iters)
            ours_fn, ours_sets = bgg.build_ours(p, gemm)
            if gemm == "wgrad":
                sets = []
                for s in p.sets:
                    g_c, g_s, _ = scaling_aware_transpose_buffers_grouped(s["dy_q"], groups, "compact")
                    x_c, x_s, _ = scaling_aware_transpose_buffers_grouped(s["x_q"], groups, "compact")
                    sets.append((g_c.view(torch.float8_e4m3fn), g_s, x_c.view(torch.float8_e4m3fn), x_s))
                n, k = shape.n, shape.k

                def launch(cfg, a, a_s, b, b_s):
                    tma = gg._wgrad_tma_ok(True, a, b)
                    if tma:
                        gg._ensure_scratch_allocator()
                    out = torch.empty(shape.experts, n, k, dtype=torch.bfloat16, device="cuda")
                    grid = (triton.cdiv(n, cfg["BLOCK_N"]), triton.cdiv(k, BLOCK), shape.experts)
                    gg._grouped_wgrad_body[grid](
                        a, a_s, b, b_s, out, out, groups.offsets, groups.tiles, n, k,
                        BLOCK_K=BLOCK, BLOCK_M=BLOCK, ROWS_ALIGNED_16=True, OUT_TABLE=False, OUT_ALIGNED_16=False,
                        ACCUMULATE=False, TMA=tma, **cfg,
                    )  # fmt: skip
                    return out

                configs = CONFIGS_WGRAD
                out_config = gg._wgrad_out_config(shape.m_total, shape.experts, gg._wgrad_tma_ok(True, *sets[0][::2]))
                ref_out = launch(out_config, *sets[0])
                shipped = str(out_config)
            else:
                w = p.stack if gemm == "fprop" else p.stack_t
                key = "x_q" if gemm == "fprop" else "dy_q"
                sets = [(s[key],) for s in p.sets]
                m_total, k = shape.m_total, w.data.shape[2]
                n = w.data.shape[1]

                tma = gg._tma_ok(sets[0][0].data, w.data)

                def launch(cfg, a, w=w, n=n, k=k, m_total=m_total, tma=tma):
                    out = torch.empty(m_total, n, dtype=torch.bfloat16, device="cuda")
                    grid = (triton.cdiv(n, cfg["BLOCK_N"]), groups.max_tiles)
                    if tma:  # the shipped Hopper form: the same body at each config, descriptors boxed to match
                        a_desc = gg.TensorDescriptor.from_tensor(a.data, [gg.TILE_M, BLOCK])
                        b_desc = gg.TensorDescriptor.from_tensor(w.data.view(-1, k), [cfg["BLOCK_N"], BLOCK])
                        gg._grouped_gemm_nt_tma_kernel.fn[grid](
                            a_desc, a.scale_inv, b_desc, w.scale_inv, out, groups.offsets, groups.tiles,
                            groups.tile_groups, shape.experts, m_total, n, k, ceil_div(k, BLOCK), ceil_div(n, BLOCK),
                            BLOCK_M=gg.TILE_M, BLOCK_K=BLOCK, **cfg,
                        )  # fmt: skip
                        return out
                    gg._grouped_gemm_nt_kernel.fn[grid](
                        a.data, a.scale_inv, w.data, w.scale_inv, out, groups.offsets, groups.tiles,
                        groups.tile_groups, shape.experts, m_total, n, k, ceil_div(k, BLOCK), ceil_div(n, BLOCK),
                        BLOCK_M=gg.TILE_M, BLOCK_K=BLOCK, EVEN_K=k % BLOCK == 0, **cfg,
                    )  # fmt: skip
                    return out

                configs = [c for c in CONFIGS_NT if c["BLOCK_N"] <= BLOCK] if tma else CONFIGS_NT
                ref_out = ours_fn(*ours_sets[0])
                kernel = gg._grouped_gemm_nt_tma_kernel if tma else gg._grouped_gemm_nt_kernel
                best = getattr(kernel, "best_config", None)
                shipped = str(best) if best is not None else "?"
            ours_us = bk.time_us(ours_fn, ours_sets, args.warmup, args.iters)
            lines.append(f"\n{gemm} {shape.label()}: ceiling {flops / ceil_us / 1e6:,.0f} TFLOP/s; shipped "
                         f"{flops / ours_us / 1e6:,.0f} TFLOP/s (config {shipped}, incl. transposes for wgrad)")  # fmt: skip
            lines.append("| BLOCK_N | warps | stages | TFLOP/s | % ceiling | bit-equal to shipped |")
            lines.append("|---|---|---|---|---|---|")
            rows = []
            for cfg in configs:
                try:
                    out = launch(cfg, *sets[0])
                    same = bk.bytes_equal(out, ref_out)
                    us = bk.time_us(lambda *a, cfg=cfg: launch(cfg, *a), sets, args.warmup, args.iters)
                    rows.append((flops / us / 1e6, cfg, same))
                except Exception as exc:  # noqa: BLE001 -- out of shared memory etc.
                    lines.append(f"| {cfg['BLOCK_N']} | {cfg['num_warps']} | {cfg['num_stages']} | - | - | "
                                 f"{type(exc).__name__}: {str(exc).splitlines()[0][:60] if str(exc) else ''} |")  # fmt: skip
            for tf, cfg, same in sorted(rows, key=lambda r: -r[0]):
                lines.append(f"| {cfg['BLOCK_N']} | {cfg['num_warps']} | {cfg['num_stages']} | {tf:,.0f} | "
                             f"{100 * tf * ceil_us * 1e6 / flops:.0f}% | {'yes' if same else 'NO'} |")  # fmt: skip
            print("\n".join(lines[-(len(rows) + 3):]), flush=True)
        del p
        torch.cuda.empty_cache()
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
