"""Launch-config sweep of our Triton FP8 grouped GEMMs at the DeepSeek-V2-Lite expert shapes (issue 15): which
BLOCK_N / num_warps / num_stages (and whether dropping the K masks) moves the kernels towards the dense cuBLAS FP8
ceiling. One process, CUDA events, medians; every config's output is compared bit for bit with the shipped kernel's.

    python scripts/tune_grouped_gemm.py [--shapes ep1-fc1,ep1-fc2,ep8-fc1] [--iters 30]

fprop/dgrad run the shipped kernel body (`_grouped_gemm_nt_kernel.fn`, i.e. without its autotuner) at each config;
wgrad runs `_grouped_wgrad_body` on precomputed scaling-aware transposes (GEMM only; the transposes are timed by
bench_grouped_gemm.py). The dense ceiling is bench_grouped_gemm.py's (`torch._scaled_mm` of the same total size).
Prints one table per GEMM; a config that fails to compile (shared memory) is listed with its error.
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


def _experimental_kernel():
    """The shipped fprop/dgrad body with two experimental knobs (measured here before anything is ported):
    PIPE: the promotion of K block kb (acc += P_kb * sa * sb) is written after the dot of block kb + 1 is issued, so
    the FMAs can overlap the next wgmma instead of waiting for it; EVEN_K: no K masks (K % 128 == 0).
    The summation order is the shipped one, so outputs must be bit-identical."""
    import triton
    import triton.language as tl

    @triton.jit
    def kernel(
        a_ptr, a_scale_ptr, b_ptr, b_scale_ptr, c_ptr, offsets_ptr, tiles_ptr, tile_groups_ptr, num_groups, num_rows,
        N, K, num_kb, num_nb,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PIPE: tl.constexpr, EVEN_K: tl.constexpr,
        SWAP: tl.constexpr,
    ):  # fmt: skip
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        real_tiles = tl.load(tiles_ptr + num_groups)
        in_group = pid_m < real_tiles
        expert = tl.load(tile_groups_ptr + pid_m).to(tl.int64)
        group_row0 = tl.load(offsets_ptr + expert) + (pid_m - tl.load(tiles_ptr + expert)) * BLOCK_M
        tail_row0 = tl.load(offsets_ptr + num_groups) + (pid_m - real_tiles) * BLOCK_M
        row0 = tl.where(in_group, group_row0, tail_row0).to(tl.int64)
        row_end = tl.where(in_group, tl.load(offsets_ptr + expert + 1), num_rows).to(tl.int64)
        k_blocks = tl.where(in_group, num_kb, 0)
        offs_m = row0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < row_end
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        offs_k = tl.arange(0, BLOCK_K)
        a_rows = a_ptr + offs_m[:, None] * K
        b_rows = b_ptr + expert * N * K + offs_n[:, None] * K
        sa_rows = a_scale_ptr + offs_m * num_kb
        sb_rows = b_scale_ptr + expert * num_nb * num_kb + (offs_n // BLOCK_K) * num_kb
        if SWAP:  # C^T tile = W_tile . A_tile^T: the weight rows take wgmma's M side (64 per warpgroup), tokens N
            acc_t = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
            for kb in range(0, k_blocks):
                k = kb * BLOCK_K + offs_k
                a = tl.load(a_rows + k[None, :], mask=mask_m[:, None], other=0.0)
                b = tl.load(b_rows + k[None, :], mask=mask_n[:, None], other=0.0)
                sa = tl.load(sa_rows + kb, mask=mask_m, other=0.0)
                sb = tl.load(sb_rows + kb, mask=mask_n, other=0.0)
                acc_t += tl.dot(b, tl.trans(a)) * sa[None, :] * sb[:, None]
            c_t = c_ptr + offs_m[None, :] * N + offs_n[:, None]
            tl.store(c_t, acc_t.to(c_ptr.dtype.element_ty), mask=mask_m[None, :] & mask_n[:, None])
        else:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            if PIPE:
                live = k_blocks > 0
                a = tl.load(a_rows + offs_k[None, :], mask=(mask_m & live)[:, None], other=0.0)
                b = tl.load(b_rows + offs_k[None, :], mask=(mask_n & live)[:, None], other=0.0)
                sa = tl.load(sa_rows, mask=mask_m & live, other=0.0)
                sb = tl.load(sb_rows, mask=mask_n & live, other=0.0)
                part = tl.dot(a, tl.trans(b))
                for kb in range(1, k_blocks):
                    k = kb * BLOCK_K + offs_k
                    a = tl.load(a_rows + k[None, :], mask=mask_m[:, None], other=0.0)
                    b = tl.load(b_rows + k[None, :], mask=mask_n[:, None], other=0.0)
                    nxt = tl.dot(a, tl.trans(b))
                    acc += part * sa[:, None] * sb[None, :]
                    sa = tl.load(sa_rows + kb, mask=mask_m, other=0.0)
                    sb = tl.load(sb_rows + kb, mask=mask_n, other=0.0)
                    part = nxt
                acc += part * sa[:, None] * sb[None, :]
            else:
                for kb in range(0, k_blocks):
                    k = kb * BLOCK_K + offs_k
                    if EVEN_K:
                        a = tl.load(a_rows + k[None, :], mask=mask_m[:, None], other=0.0)
                        b = tl.load(b_rows + k[None, :], mask=mask_n[:, None], other=0.0)
                    else:
                        mask_k = k < K
                        a = tl.load(a_rows + k[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0)
                        b = tl.load(b_rows + k[None, :], mask=mask_n[:, None] & mask_k[None, :], other=0.0)
                    sa = tl.load(sa_rows + kb, mask=mask_m, other=0.0)
                    sb = tl.load(sb_rows + kb, mask=mask_n, other=0.0)
                    acc += tl.dot(a, tl.trans(b)) * sa[:, None] * sb[None, :]
            c = c_ptr + offs_m[:, None] * N + offs_n[None, :]
            tl.store(c, acc.to(c_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])

    return kernel


EXPERIMENTS = [dict(PIPE=False, EVEN_K=True, SWAP=swap, BLOCK_N=bn, num_warps=w, num_stages=st)
               for swap in (False, True)
               for bn, w, st in ((128, 8, 3), (128, 8, 4), (64, 4, 3), (64, 4, 4), (128, 4, 3), (128, 4, 4),
                                 (256, 8, 3))]  # fmt: skip


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="ep1-fc1,ep1-fc2,ep8-fc1")
    ap.add_argument("--gemms", default="fprop,dgrad,wgrad")
    ap.add_argument("--experiments-only", action="store_true", help="fprop/dgrad: only the experimental body")
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    args = ap.parse_args(argv)

    import torch
    import triton

    import bench_grouped_gemm as bgg
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
            flops = bgg.gemm_flops(shape, gemm)
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
                    out = torch.empty(shape.experts, n, k, dtype=torch.bfloat16, device="cuda")
                    grid = (triton.cdiv(n, cfg["BLOCK_N"]), triton.cdiv(k, BLOCK), shape.experts)
                    gg._grouped_wgrad_body[grid](
                        a, a_s, b, b_s, out, out, groups.offsets, groups.tiles, n, k,
                        BLOCK_K=BLOCK, BLOCK_M=BLOCK, ROWS_ALIGNED_16=True, OUT_TABLE=False, OUT_ALIGNED_16=False,
                        ACCUMULATE=False, **cfg,
                    )  # fmt: skip
                    return out

                configs = CONFIGS_WGRAD
                ref_out = launch(gg._WGRAD_OUT_CONFIG, *sets[0])
                shipped = str(gg._WGRAD_OUT_CONFIG)
            else:
                w = p.stack if gemm == "fprop" else p.stack_t
                key = "x_q" if gemm == "fprop" else "dy_q"
                sets = [(s[key],) for s in p.sets]
                m_total, k = shape.m_total, w.data.shape[2]
                n = w.data.shape[1]

                def launch(cfg, a, w=w, n=n, k=k, m_total=m_total):
                    out = torch.empty(m_total, n, dtype=torch.bfloat16, device="cuda")
                    grid = (triton.cdiv(n, cfg["BLOCK_N"]), groups.max_tiles)
                    gg._grouped_gemm_nt_kernel.fn[grid](
                        a.data, a.scale_inv, w.data, w.scale_inv, out, groups.offsets, groups.tiles,
                        groups.tile_groups, shape.experts, m_total, n, k, ceil_div(k, BLOCK), ceil_div(n, BLOCK),
                        BLOCK_M=gg.TILE_M, BLOCK_K=BLOCK, EVEN_K=k % BLOCK == 0, **cfg,
                    )  # fmt: skip
                    return out

                configs = CONFIGS_NT
                ref_out = ours_fn(*ours_sets[0])
                best = getattr(gg._grouped_gemm_nt_kernel, "best_config", None)
                shipped = str(best) if best is not None else "?"
            ours_us = bk.time_us(ours_fn, ours_sets, args.warmup, args.iters)
            lines.append(f"\n{gemm} {shape.label()}: ceiling {flops / ceil_us / 1e6:,.0f} TFLOP/s; shipped "
                         f"{flops / ours_us / 1e6:,.0f} TFLOP/s (config {shipped}, incl. transposes for wgrad)")  # fmt: skip
            lines.append("| BLOCK_N | warps | stages | TFLOP/s | % ceiling | bit-equal to shipped |")
            lines.append("|---|---|---|---|---|---|")
            rows = []
            for cfg in [] if args.experiments_only and gemm != "wgrad" else configs:
                try:
                    out = launch(cfg, *sets[0])
                    same = bk.bytes_equal(out, ref_out)
                    us = bk.time_us(lambda *a, cfg=cfg: launch(cfg, *a), sets, args.warmup, args.iters)
                    rows.append((flops / us / 1e6, cfg, same))
                except Exception as exc:  # noqa: BLE001 -- out of shared memory etc.
                    lines.append(f"| {cfg['BLOCK_N']} | {cfg['num_warps']} | {cfg['num_stages']} | - | - | "
                                 f"{type(exc).__name__}: {str(exc).splitlines()[0][:60] if str(exc) else ''} |")  # fmt: skip
            if gemm != "wgrad":  # the experimental body (PIPE / EVEN_K), same table
                kernel = _experimental_kernel()
                for cfg in EXPERIMENTS:
                    def launch_exp(a, cfg=cfg, w=w, n=n, k=k, m_total=m_total):
                        out = torch.empty(m_total, n, dtype=torch.bfloat16, device="cuda")
                        grid = (triton.cdiv(n, cfg["BLOCK_N"]), groups.max_tiles)
                        kernel[grid](
                            a.data, a.scale_inv, w.data, w.scale_inv, out, groups.offsets, groups.tiles,
                            groups.tile_groups, shape.experts, m_total, n, k, ceil_div(k, BLOCK), ceil_div(n, BLOCK),
                            BLOCK_M=gg.TILE_M, BLOCK_K=BLOCK, **cfg,
                        )  # fmt: skip
                        return out

                    label = dict(cfg, BLOCK_N=f"exp SWAP={int(cfg['SWAP'])} EVEN_K=1 {cfg['BLOCK_N']}")
                    label = {kk: v for kk, v in label.items() if kk not in ("PIPE", "EVEN_K", "SWAP")}
                    try:
                        same = bk.bytes_equal(launch_exp(*sets[0]), ref_out)
                        us = bk.time_us(launch_exp, sets, args.warmup, args.iters)
                        rows.append((flops / us / 1e6, label, same))
                    except Exception as exc:  # noqa: BLE001
                        lines.append(f"| {label['BLOCK_N']} | {cfg['num_warps']} | {cfg['num_stages']} | - | - | "
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
