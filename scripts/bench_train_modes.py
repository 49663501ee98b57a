"""Run the trainer in BF16, TE blockwise FP8 and FP8-Flow on the same config, one after the other, and print tokens/s,
peak memory and loss side by side (issue 6, item 5).

    source .gpu-bundle/setup.sh && python scripts/bench_train_modes.py \
        --config configs/deepseek_v2_lite_proxy.yaml --train-iters 50 [--out runs/modes] [-- extra trainer flags]

Modes (everything else comes from the config):
  bf16          --no-moe-fp8-flow --fp8-format ''     stock TEGroupedMLP, no FP8 anywhere
  te_blockwise  --no-moe-fp8-flow                     stock TEGroupedMLP under TE Float8BlockScaling (the config's
                                                      fp8_format/fp8_recipe), megatron's FP8 padding
  fp8flow       (the config as is)                    FP8-Flow routed experts; dense layers under the same TE recipe
  fp8flow_recomp  --moe-expert-recompute              the same with expert-level recompute
  fp8flow_triton  --moe-fp8-flow-gemm triton          FP8-Flow with the engine forced (the default, auto, picks by the
  fp8flow_te    --moe-fp8-flow-gemm te                number of local experts)
Each mode is a separate process (a fresh CUDA context, so peak memory is per mode). tokens/s is the median over the
logged intervals after the first one (which holds start-up and autotuning).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

MODES = {
    "bf16": ["--no-moe-fp8-flow", "--fp8-format", ""],
    "te_blockwise": ["--no-moe-fp8-flow"],
    "fp8flow": [],
    "fp8flow_recomp": ["--moe-expert-recompute"],
    "fp8flow_triton": ["--moe-fp8-flow-gemm", "triton"],
    "fp8flow_te": ["--moe-fp8-flow-gemm", "te"],
}


def run_mode(name: str, args, extra) -> dict:
    out = Path(args.out) / name
    cmd = [
        sys.executable, "-m", "fp8flow_megatron.train", "--config", args.config, *MODES[name],
        "--train-iters", str(args.train_iters), "--log-interval", str(args.log_interval), "--output-dir", str(out),
        *extra,
    ]  # fmt: skip
    print("+", " ".join(repr(c) if c == "" else c for c in cmd), flush=True)
    start = time.time()
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "log.txt").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        print(f"{name}: FAILED (exit {proc.returncode}); last lines:\n" + "\n".join((proc.stdout + proc.stderr).splitlines()[-25:]))
        return {"failed": True}
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in rows if "tokens_per_s" in r]
    steady = logged[1:] or logged
    return {
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in steady),
        "peak_mem_gb": max(r["peak_mem_gb"] for r in logged),
        "first_loss": rows[0]["loss"],
        "last_loss": rows[-1]["loss"],
        "val_loss": next((r["val_loss"] for r in reversed(rows) if "val_loss" in r), float("nan")),
        "wall_s": time.time() - start,
        "fp8_underflow": logged[-1].get("fp8_underflow", float("nan")),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/deepseek_v2_lite_proxy.yaml")
    ap.add_argument("--train-iters", type=int, default=50)
    ap.add_argument("--log-interval", type=int, default=10)
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--out", default="runs/modes")
    args, extra = ap.parse_known_args()
    extra = [e for e in extra if e != "--"]
    results = {name: run_mode(name, args, extra) for name in args.modes.split(",")}

    base = results.get("bf16", {})
    te = results.get("te_blockwise", {})
    print(f"\n### Trainer, {Path(args.config).name}, {args.train_iters} iterations {' '.join(extra)}\n")
    print("| mode | tokens/s | vs BF16 | vs TE blockwise | peak mem GB | loss first -> last | val loss | wall s |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        if r.get("failed"):
            print(f"| {name} | failed | | | | | | |")
            continue
        vs_bf16 = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x" if base.get("tokens_per_s") else "-"
        vs_te = f"{r['tokens_per_s'] / te['tokens_per_s']:.2f}x" if te.get("tokens_per_s") else "-"
        print(
            f"| {name} | {r['tokens_per_s']:.0f} | {vs_bf16} | {vs_te} | {r['peak_mem_gb']:.2f} | "
            f"{r['first_loss']:.3f} -> {r['last_loss']:.3f} | {r['val_loss']:.3f} | {r['wall_s']:.0f} |"
        )


if __name__ == "__main__":
    main()
