"""Convergence A/B: the same model, seed and data order trained in BF16, TE blockwise FP8 and FP8-Flow; one plot.

    source .gpu-bundle/setup.sh && python scripts/convergence_ab.py --config configs/convergence_small.yaml \
        --steps 2000 --out runs/ab/small -- --train-data-path data/open-corpus/open_corpus_train \
        --valid-data-path data/open-corpus/open_corpus_valid
    python scripts/convergence_ab.py --out runs/ab/small --report-only        # tables + PNG from finished runs

Each mode is one `python -m fp8flow_megatron.train` process (megatron-core's schedule, the config's optimizer; modes as
in scripts/bench_train_modes.py: bf16, te_blockwise, fp8flow, fp8flow_recomp, ...) writing OUT/<mode>/metrics.jsonl
and log.txt. A mode whose metrics.jsonl already reaches --steps is not run again (so the modes of one A/B can be
spread over several sessions or machines); --rerun forces it. With --checkpoint-interval N each mode saves a megatron
checkpoint every N iterations and the next invocation resumes it exactly; pass the trainer's
`--exit-duration-in-mins M` after `--` to stop cleanly within a time limit. Runs that reached different iterations
are compared at the last iteration they all reached. --parallel starts the modes at once (one GPU serves
them in turn: the A/B is about losses, and each mode's numerics do not depend on what else runs).

The report (OUT/summary.json, OUT/summary.md, OUT/convergence_ab.png):
  final train loss  mean of the last --final-window iterations' training loss;
  final val loss    the last validation loss (every mode evaluates the same held-out batches at the same steps);
  relative error    (mode - reference) / reference, against bf16 and against te_blockwise;
  FP8 health        per quantization site (FP8-Flow modes): underflow and saturation fractions, block-scale exponent
                    range; per mode: dead-expert fraction and load imbalance (max/mean tokens per expert; mean over
                    the logged iterations of the last quarter of training) and the router logits' gradient norm.
Targets (issue 14): FP8-Flow within 0.5% of BF16 and 0.1% of TE blockwise (train and validation), no NaN/Inf, dead
experts and load imbalance no worse than BF16's. Every figure is printed whether or not its target is met.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train_modes import MODES  # noqa: E402  (the trainer flags of each mode, one definition)

FP8_SITES = ("tokens", "combine_grad", "swiglu_out", "dswiglu_out")
TARGET_VS_BF16 = 0.005
TARGET_VS_TE = 0.001


# --------------------------------------------------------------------------------------------------------- runs
def mode_complete(out: Path, steps: int) -> bool:
    rows = load_metrics(out)
    return bool(rows) and rows[-1]["iteration"] >= steps


def load_metrics(out: Path) -> List[dict]:
    path = out / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def trainer_command(mode: str, args, extra: List[str]) -> List[str]:
    cmd = [
        sys.executable, "-m", "fp8flow_megatron.train", "--config", args.config, *MODES[mode],
        "--train-iters", str(args.steps), "--output-dir", str(Path(args.out) / mode), *extra,
    ]  # fmt: skip
    if args.parallel and not any(a.startswith("--data-cache-path") for a in extra):
        # megatron-core writes its dataset index caches in place: concurrent modes each get their own
        cmd += ["--data-cache-path", str(Path(args.out) / mode / "data_cache")]
    if args.checkpoint_interval:
        ckpt = Path(args.out) / mode / "checkpoint"
        cmd += ["--save", str(ckpt), "--save-interval", str(args.checkpoint_interval)]
        if (ckpt / "latest_checkpointed_iteration.txt").exists():
            cmd += ["--load", str(ckpt)]  # exact resume: same data order, same losses (tests/test_train.py)
    return cmd


def run_modes(modes: List[str], args, extra: List[str]) -> Dict[str, int]:
    """Start each mode's trainer (all at once with --parallel); returns mode -> exit code (0 for skipped modes)."""
    codes, running = {}, []
    for mode in modes:
        out = Path(args.out) / mode
        if args.rerun:
            shutil.rmtree(out / "checkpoint", ignore_errors=True)
        elif mode_complete(out, args.steps):
            print(f"{mode}: already complete in {out} (--rerun to train again)", flush=True)
            codes[mode] = 0
            continue
        out.mkdir(parents=True, exist_ok=True)
        cmd = trainer_command(mode, args, extra)
        print("+", " ".join(repr(c) if c == "" else c for c in cmd), flush=True)
        log = open(out / "log.txt", "w")
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        running.append((mode, proc, log, time.time()))
        if not args.parallel:
            codes[mode] = _wait(*running.pop())
    for item in running:
        codes[item[0]] = _wait(*item)
    return codes


def _wait(mode, proc, log, start) -> int:
    code = proc.wait()
    log.close()
    tail = "\n".join((Path(log.name).read_text().splitlines())[-20:])
    status = "done" if code == 0 else f"FAILED (exit {code}); last lines of {log.name}:\n{tail}"
    print(f"{mode}: {status} in {time.time() - start:.0f} s", flush=True)
    return code


# ------------------------------------------------------------------------------------------------------- report
def summarize_mode(rows: List[dict], final_window: int) -> dict:
    """The figures of one finished run (see the module docstring)."""
    losses = [r["loss"] for r in rows]
    window = losses[-final_window:]
    evals = [r for r in rows if "val_loss" in r]
    logged = [r for r in rows if "health" in r]
    late = [r for r in logged if r["iteration"] > 0.75 * rows[-1]["iteration"]] or logged[-1:]
    health_late = [r["health"] for r in late]
    out = {
        "steps": rows[-1]["iteration"],
        "final_train_loss": statistics.fmean(window),
        "final_window": len(window),
        "final_val_loss": evals[-1]["val_loss"] if evals else float("nan"),
        "nonfinite_losses": sum(not math.isfinite(x) for x in losses),
        "dead_expert_frac": _mean(h.get("dead_expert_frac") for h in health_late),
        "load_imbalance": _mean(h.get("load_imbalance") for h in health_late),
        "router_grad_norm": _mean(h.get("router_grad_norm") for h in health_late),
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in logged[1:]) if len(logged) > 1 else float("nan"),
        "peak_mem_gb": max((r.get("peak_mem_gb", 0.0) for r in logged), default=float("nan")),
    }
    hs = [r["health"] for r in logged]
    for site in FP8_SITES:
        under = [h[f"underflow_frac/{site}"] for h in hs if f"underflow_frac/{site}" in h]
        if not under:
            continue
        out[f"underflow_frac/{site}"] = {"mean": statistics.fmean(under), "max": max(under)}
        out[f"saturated_frac/{site}"] = max(h.get(f"saturated_frac/{site}", 0.0) for h in hs)
        exps = [(h[f"scale_exp_min/{site}"], h[f"scale_exp_max/{site}"]) for h in hs if f"scale_exp_min/{site}" in h]
        if exps:
            out[f"scale_exp_range/{site}"] = [min(e[0] for e in exps), max(e[1] for e in exps)]
    return out


def _mean(values) -> float:
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else float("nan")


def relative(a: float, b: float) -> float:
    return (a - b) / b if b and math.isfinite(a) and math.isfinite(b) else float("nan")


def compare(summaries: Dict[str, dict]) -> Dict[str, dict]:
    """Relative errors of every mode against bf16 and te_blockwise, and the issue's targets for FP8-Flow modes."""
    result = {}
    for mode, s in summaries.items():
        entry = {}
        for ref, tol in (("bf16", TARGET_VS_BF16), ("te_blockwise", TARGET_VS_TE)):
            if ref not in summaries or ref == mode:
                continue
            r = summaries[ref]
            for kind in ("train", "val"):
                err = relative(s[f"final_{kind}_loss"], r[f"final_{kind}_loss"])
                entry[f"rel_{kind}_vs_{ref}"] = err
                if mode.startswith("fp8flow"):
                    entry[f"target_{kind}_vs_{ref}"] = bool(abs(err) <= tol) if math.isfinite(err) else False
        if mode.startswith("fp8flow") and "bf16" in summaries:
            b = summaries["bf16"]
            entry["target_no_nonfinite"] = s["nonfinite_losses"] == 0
            entry["target_dead_experts"] = not (s["dead_expert_frac"] > b["dead_expert_frac"])
            entry["target_load_imbalance"] = not (s["load_imbalance"] > b["load_imbalance"])
        result[mode] = entry
    return result


def per_step_relative_error(rows: List[dict], ref_rows: List[dict]) -> List[tuple]:
    ref = {r["iteration"]: r["loss"] for r in ref_rows}
    return [(r["iteration"], relative(r["loss"], ref[r["iteration"]])) for r in rows if r["iteration"] in ref]


def moving_average(values: List[float], window: int) -> List[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def common_prefix(runs: Dict[str, List[dict]]) -> Dict[str, List[dict]]:
    """Every run cut at the last iteration that all of them reached, so that modes are compared at equal steps."""
    common = min(rows[-1]["iteration"] for rows in runs.values())
    return {m: [r for r in rows if r["iteration"] <= common] for m, rows in runs.items()}


def write_report(out: Path, modes: List[str], final_window: int, steps: Optional[int] = None) -> Optional[dict]:
    runs = {m: load_metrics(out / m) for m in modes}
    runs = {m: rows for m, rows in runs.items() if rows}
    if not runs:
        print(f"no finished runs under {out}")
        return None
    reached = {m: rows[-1]["iteration"] for m, rows in runs.items()}
    runs = common_prefix(runs)
    common = min(reached.values())
    if len(set(reached.values())) > 1 or (steps and common < steps):
        print(f"runs reached {reached}: comparing all modes at iteration {common}"
              + (f" of {steps} (run the same command again to continue)" if steps and common < steps else ""))
    summaries = {m: summarize_mode(rows, final_window) for m, rows in runs.items()}
    comparison = compare(summaries)
    report = {"modes": summaries, "comparison": comparison, "reached": reached, "compared_at": common}
    (out / "summary.json").write_text(json.dumps(report, indent=2, sort_keys=True))
    md = summary_markdown(summaries, comparison)
    (out / "summary.md").write_text(md)
    print(md)
    png = plot(out, runs, final_window)
    if png:
        print(f"plot: {png}")
    return report


def summary_markdown(summaries: Dict[str, dict], comparison: Dict[str, dict]) -> str:
    def pct(x):
        return f"{100 * x:+.3f}%" if x is not None and math.isfinite(x) else "-"

    lines = [
        "| mode | steps | final train loss | vs bf16 | vs te_blockwise | final val loss | vs bf16 | vs te_blockwise "
        "| dead experts | load imbalance | router grad norm | tokens/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for mode, s in summaries.items():
        c = comparison[mode]
        lines.append(
            f"| {mode} | {s['steps']} | {s['final_train_loss']:.4f} | {pct(c.get('rel_train_vs_bf16'))} | "
            f"{pct(c.get('rel_train_vs_te_blockwise'))} | {s['final_val_loss']:.4f} | {pct(c.get('rel_val_vs_bf16'))} | "
            f"{pct(c.get('rel_val_vs_te_blockwise'))} | {s['dead_expert_frac']:.4f} | {s['load_imbalance']:.3f} | "
            f"{s['router_grad_norm']:.3e} | {s['tokens_per_s']:.0f} |"
        )
    health = [(m, s) for m, s in summaries.items() if any(k.startswith("underflow_frac/") for k in s)]
    if health:
        lines += ["", "| mode | site | underflow (mean / max) | saturation (max) | scale exponent range |", "|---|---|---|---|---|"]
        for mode, s in health:
            for site in FP8_SITES:
                if f"underflow_frac/{site}" in s:
                    u = s[f"underflow_frac/{site}"]
                    lo, hi = s.get(f"scale_exp_range/{site}", (float("nan"), float("nan")))
                    lines.append(f"| {mode} | {site} | {u['mean']:.2e} / {u['max']:.2e} | "
                                 f"{s[f'saturated_frac/{site}']:.2e} | 2^{lo:.0f} .. 2^{hi:.0f} |")
    targets = [(m, k, v) for m, c in comparison.items() for k, v in c.items() if k.startswith("target_")]
    if targets:
        lines += ["", "targets: " + ", ".join(f"{m} {k[len('target_'):]} {'met' if v else 'MISSED'}" for m, k, v in targets)]
    return "\n".join(lines) + "\n"


def plot(out: Path, runs: Dict[str, List[dict]], final_window: int) -> Optional[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no PNG (summary.json has the numbers)")
        return None
    smooth = max(1, min(50, len(next(iter(runs.values()))) // 20))
    fig, axes = plt.subplots(4, 3, figsize=(18, 17))
    ax = axes[0, 0]
    for mode, rows in runs.items():
        ax.plot([r["iteration"] for r in rows], moving_average([r["loss"] for r in rows], smooth), label=mode, lw=1)
    ax.set(title=f"train loss (moving average of {smooth})", xlabel="iteration", ylabel="nats/token")
    ax = axes[0, 1]
    for mode, rows in runs.items():
        ev = [r for r in rows if "val_loss" in r]
        ax.plot([r["iteration"] for r in ev], [r["val_loss"] for r in ev], "o-", ms=3, label=mode)
    ax.set(title="validation loss", xlabel="iteration", ylabel="nats/token")
    ax = axes[0, 2]
    if "bf16" in runs:
        for mode, rows in runs.items():
            if mode == "bf16":
                continue
            it, err = zip(*per_step_relative_error(rows, runs["bf16"])) or ((), ())
            ax.plot(it, [100 * e for e in moving_average(list(err), smooth)], label=f"{mode} train", lw=1)
            ev = {r["iteration"]: r["val_loss"] for r in runs["bf16"] if "val_loss" in r}
            pts = [(r["iteration"], 100 * relative(r["val_loss"], ev[r["iteration"]])) for r in rows
                   if "val_loss" in r and r["iteration"] in ev]
            if pts:
                ax.plot(*zip(*pts), "x", label=f"{mode} val")
        for y in (-100 * TARGET_VS_BF16, 100 * TARGET_VS_BF16):
            ax.axhline(y, color="grey", ls="--", lw=0.8)
    ax.set(title=f"relative loss error vs BF16 (%; train: moving average of {smooth})", xlabel="iteration")
    logged_runs = {m: [r for r in rows if "health" in r] for m, rows in runs.items()}
    _plot_sites(axes[1, 0], logged_runs, "underflow_frac")
    axes[1, 0].set(title="FP8 underflow fraction (finite nonzero -> 0; zeros not drawn)", xlabel="iteration")
    axes[1, 0].set_yscale("log", nonpositive="clip")
    _plot_sites(axes[1, 1], logged_runs, "saturated_frac")
    axes[1, 1].set(title="FP8 saturation fraction (codes at ±448)", xlabel="iteration")
    axes[1, 1].set_yscale("log", nonpositive="clip")
    ax = axes[1, 2]
    for mode, logged in logged_runs.items():
        for site in FP8_SITES:
            hi = _series(logged, f"scale_exp_max/{site}")
            if hi:
                line, = ax.plot(*zip(*hi), lw=1, label=f"{mode} {site}")
                ax.plot(*zip(*_series(logged, f"scale_exp_min/{site}")), lw=1, ls="--", color=line.get_color())
    ax.set(title="block scale exponent log2(scale_inv): max (solid), min (dashed)", xlabel="iteration")
    for ax, key, title in (
        (axes[2, 0], "load_imbalance", "load imbalance: max/mean tokens per expert (worst layer)"),
        (axes[2, 1], "dead_expert_frac", "dead-expert fraction ((layer, expert) slots with no token)"),
        (axes[2, 2], "router_grad_norm", "router logits' gradient norm"),
    ):
        for mode, logged in logged_runs.items():
            pts = _series(logged, key)
            if pts:
                ax.plot(*zip(*pts), lw=1, label=mode)
        ax.set(title=title, xlabel="iteration")
    axes[2, 2].set_yscale("log")
    flow_mode = next((m for m in logged_runs if m.startswith("fp8flow") and _layers_of(logged_runs[m])), None)
    for ax, site in ((axes[3, 0], "swiglu_out"), (axes[3, 1], "dswiglu_out")):
        if flow_mode:
            _layer_heatmap(fig, ax, logged_runs[flow_mode], f"underflow_frac/{{layer}}/{site}")
        ax.set(title=f"{flow_mode or 'FP8-Flow'}: {site} underflow per MoE layer", xlabel="iteration", ylabel="layer")
    ax = axes[3, 2]
    width = 0.8 / max(1, len(logged_runs))
    for i, (mode, logged) in enumerate(logged_runs.items()):
        layers = _layers_of(logged)
        late = [r["health"] for r in logged if r["iteration"] > 0.75 * logged[-1]["iteration"]] if logged else []
        values = [_mean(h.get(f"{layer}/load_imbalance") for h in late) for layer in layers]
        if layers:
            ax.bar([j + i * width for j in range(len(layers))], values, width, label=mode)
            ax.set_xticks([j + 0.4 - width / 2 for j in range(len(layers))], layers, rotation=45, fontsize=7)
    ax.set(title="load imbalance per MoE layer (mean over the last quarter)", ylabel="max / mean tokens per expert")
    for a in axes.flat:
        a.grid(alpha=0.3)
        if a.get_legend_handles_labels()[0]:
            a.legend(fontsize=7)
    fig.suptitle(f"convergence A/B: {out}")
    fig.tight_layout()
    path = out / "convergence_ab.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _series(logged: List[dict], key: str) -> List[tuple]:
    """(iteration, value) of one health key over the logged iterations that have it."""
    return [(r["iteration"], r["health"][key]) for r in logged if key in r["health"]]


def _layers_of(logged: List[dict]) -> List[str]:
    """The MoE layer tags ("layer3") that a run's telemetry reports, in layer order."""
    tags = {k.split("/")[0] for r in logged for k in r["health"] if k.endswith("/load_imbalance")}
    return sorted(tags, key=lambda t: int("".join(c for c in t if c.isdigit()) or -1))


def _layer_heatmap(fig, ax, logged: List[dict], key_pattern: str) -> None:
    """Layers x logged iterations of one per-layer health key (log10 color scale; a zero shows as the floor)."""
    layers = _layers_of(logged)
    if not layers:
        return
    grid = [[r["health"].get(key_pattern.format(layer=layer), float("nan")) for r in logged] for layer in layers]
    floor = min((v for row in grid for v in row if v > 0), default=1e-12)
    image = [[math.log10(max(v, floor)) if v == v else float("nan") for v in row] for row in grid]
    its = [r["iteration"] for r in logged]
    mesh = ax.imshow(image, aspect="auto", origin="lower", extent=(its[0], its[-1], 0.5, len(layers) + 0.5))
    ax.set_yticks(range(1, len(layers) + 1), layers, fontsize=7)
    fig.colorbar(mesh, ax=ax, label="log10 fraction")


def _plot_sites(ax, logged_runs: Dict[str, List[dict]], stat: str) -> None:
    for mode, logged in logged_runs.items():
        for site in FP8_SITES:
            pts = _series(logged, f"{stat}/{site}")
            if pts:
                ax.plot(*zip(*pts), lw=1, label=f"{mode} {site}")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/convergence_small.yaml")
    ap.add_argument("--steps", type=int, default=2000, help="training iterations per mode (--train-iters)")
    ap.add_argument("--modes", default="bf16,te_blockwise,fp8flow", help=f"comma-separated, of {', '.join(MODES)}")
    ap.add_argument("--out", default="runs/ab")
    ap.add_argument("--parallel", action="store_true", help="start all modes at once")
    ap.add_argument("--rerun", action="store_true", help="train modes again even where metrics.jsonl is complete")
    ap.add_argument("--report-only", action="store_true", help="no training: report the runs found under --out")
    ap.add_argument("--final-window", type=int, default=100, help="iterations averaged for the final train loss")
    ap.add_argument("--checkpoint-interval", type=int, default=0,
                    help="save each mode every N iterations under OUT/<mode>/checkpoint and resume from there on the "
                         "next invocation (with the trainer's --exit-duration-in-mins an A/B spans several sessions)")
    return ap


def main(argv: Optional[List[str]] = None) -> int:
    ap = build_parser()
    args, extra = ap.parse_known_args(argv)
    extra = [e for e in extra if e != "--"]
    modes = [m for m in args.modes.split(",") if m]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        ap.error(f"unknown mode(s) {unknown}: choose from {', '.join(MODES)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    failed = []
    if not args.report_only:
        codes = run_modes(modes, args, extra)
        failed = [m for m, c in codes.items() if c != 0]
    write_report(out, modes, args.final_window, None if args.report_only else args.steps)
    if failed:
        print(f"failed modes: {', '.join(failed)} (see their log.txt)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
