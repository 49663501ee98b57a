"""scripts/bench_grouped_gemm.py's pure-Python half: the shapes, FLOP accounting, the result records, the markdown
table and the target verdicts (tested on CPU: tests/test_bench_grouped_gemm.py). Nothing here imports torch."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

GEMMS = ("fprop", "dgrad", "wgrad")
TARGET_TFLOPS = {"fprop": 1000.0, "dgrad": 1000.0, "wgrad": 850.0}
TARGET_CEILING_PCT = 93.0
TARGET_VS_BF16 = 1.3
WEIGHT_QUANT_TARGET_MS = 0.6  # 64 experts' fc1 (the ep1-fc1 shape)
IMPLS = [  # (key, column label)
    ("bf16_grouped_mm", "BF16 torch._grouped_mm"),
    ("bf16_mm_loop", "BF16 mm loop"),
    ("te_bf16", "TE BF16 GroupedLinear"),
    ("te_fp8", "TE FP8 GroupedLinear per-expert"),
    ("te_fp8_gt", "TE FP8 GroupedLinear grouped-tensor"),
    ("te_gemm", "TE gemm per-expert (our operands)"),
    ("ceiling", "dense cuBLAS FP8 (_scaled_mm)"),
    ("ours", "ours: Triton FP8 grouped"),
    ("ours_te_grouped", "ours into TE grouped-tensor GEMM (te_grouped)"),
]
IMPL_KEYS = [k for k, _ in IMPLS]


@dataclass(frozen=True)
class GemmShape:
    name: str
    experts: int
    rows: int  # per expert
    k: int  # linear's input features
    n: int  # linear's output features

    @property
    def m_splits(self) -> List[int]:
        return [self.rows] * self.experts

    @property
    def m_total(self) -> int:
        return self.rows * self.experts

    def label(self) -> str:
        return f"{self.name} ({self.experts}x{self.rows:,}, {self.k}->{self.n})"


SHAPES = {
    s.name: s
    for s in [
        GemmShape("ep1-fc1", 64, 1536, 2048, 2816),
        GemmShape("ep1-fc2", 64, 1536, 1408, 2048),
        GemmShape("ep8-fc1", 8, 12288, 2048, 2816),
        GemmShape("ep8-fc2", 8, 12288, 1408, 2048),
    ]
}


def parse_shapes(text: str) -> List[GemmShape]:
    """'all', or comma-separated names of SHAPES and/or custom E:rows:K:N."""
    if text.strip() == "all":
        return list(SHAPES.values())
    out = []
    for item in (t.strip() for t in text.split(",") if t.strip()):
        if item in SHAPES:
            out.append(SHAPES[item])
            continue
        parts = item.split(":")
        if len(parts) != 4 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise ValueError(f"unknown shape {item!r}: use one of {sorted(SHAPES)} or E:rows:K:N (positive ints)")
        e, rows, k, n = map(int, parts)
        out.append(GemmShape(item, e, rows, k, n))
    if not out:
        raise ValueError("no shapes given")
    return out


def parse_gemms(text: str) -> List[str]:
    items = list(GEMMS) if text.strip() == "all" else [t.strip() for t in text.split(",") if t.strip()]
    bad = [g for g in items if g not in GEMMS]
    if bad or not items:
        raise ValueError(f"unknown GEMM(s) {bad}: choose from {GEMMS}")
    return items


def gemm_dims(shape: GemmShape, gemm: str) -> Tuple[int, int, int]:
    """(M, N, K) of the equivalent dense GEMM: output [M, N], contraction K."""
    if gemm == "fprop":
        return shape.m_total, shape.n, shape.k
    if gemm == "dgrad":
        return shape.m_total, shape.k, shape.n
    if gemm == "wgrad":
        return shape.n, shape.k, shape.m_total
    raise ValueError(gemm)


def gemm_flops(shape: GemmShape, gemm: str, m_splits: Optional[Sequence[int]] = None) -> int:
    """2*M*N*K; for the grouped GEMMs the rows are summed over experts (all three equal 2*rows*N*K)."""
    rows = sum(shape.m_splits if m_splits is None else m_splits)
    if gemm not in GEMMS:
        raise ValueError(gemm)
    return 2 * rows * shape.n * shape.k


def tflops(flops: int, us: Optional[float]) -> Optional[float]:
    return None if us is None or us <= 0 else flops / (us * 1e-6) / 1e12


@dataclass
class Result:
    gemm: str
    shape: GemmShape
    us: Dict[str, float] = field(default_factory=dict)  # impl -> median µs
    err: Dict[str, float] = field(default_factory=dict)  # impl -> relative error vs fp32
    notes: Dict[str, str] = field(default_factory=dict)  # impl -> why it has no number

    @property
    def flops(self) -> int:
        return gemm_flops(self.shape, self.gemm)

    def tf(self, impl: str) -> Optional[float]:
        return tflops(self.flops, self.us.get(impl))


@dataclass
class WeightQuant:
    shape: GemmShape
    us: float
    bytes: int
    copy_bw: float  # bytes/s
    exact: Optional[bool] = None

    @property
    def ms(self) -> float:
        return self.us / 1e3

    @property
    def pct_copy(self) -> float:
        return 100.0 * self.bytes / (self.us * 1e-6) / self.copy_bw


def weight_quant_bytes(experts: int, n: int, k: int) -> int:
    """bf16 read once; codes written twice ([N, K] and [K, N]); both fp32 scale grids."""
    blocks = -(-n // 128) * -(-k // 128)
    return experts * (n * k * 2 + 2 * n * k + 2 * blocks * 4)


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return None if a is None or b is None or b == 0 else a / b


def format_table(results: Sequence[Result], impls: Sequence[str] = IMPL_KEYS) -> List[str]:
    labels = dict(IMPLS)
    head = ["GEMM", "shape"] + [labels[i] for i in impls] + ["ours / ceiling", "ours / BF16 grouped",
                                                          "te_grouped / ceiling"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        cells = [r.gemm, r.shape.label()]
        for i in impls:
            t = r.tf(i)
            cells.append(f"{t:,.0f}" if t is not None else ("n/a" if i not in r.notes else f"n/a ({r.notes[i]})"))
        pct = _ratio(r.tf("ours"), r.tf("ceiling"))
        vs = _ratio(r.tf("ours"), r.tf("bf16_grouped_mm"))
        cells.append(f"{100 * pct:.0f}%" if pct is not None else "n/a")
        cells.append(f"{vs:.2f}x" if vs is not None else "n/a")
        pct_tg = _ratio(r.tf("ours_te_grouped"), r.tf("ceiling"))
        cells.append(f"{100 * pct_tg:.0f}%" if pct_tg is not None else "n/a")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def format_weight_quant(wq: Sequence[WeightQuant]) -> List[str]:
    lines = ["| weight quant 128x128 (quantize_weight_stack_triton) | ms | GB/s | % copy | bit-exact |", "|---|---|---|---|---|"]
    for w in wq:
        exact = "n/a" if w.exact is None else ("yes" if w.exact else "NO")
        lines.append(f"| {w.shape.experts} x [{w.shape.n}, {w.shape.k}] ({w.shape.name}) | {w.ms:.3f} | "
                     f"{w.bytes / (w.us * 1e-6) / 1e9:,.0f} | {w.pct_copy:.0f}% | {exact} |")  # fmt: skip
    return lines


def target_lines(results: Sequence[Result], wq: Sequence[WeightQuant]) -> List[str]:
    lines = []
    for r in results:
        ours, ceil, bf16 = r.tf("ours"), r.tf("ceiling"), r.tf("bf16_grouped_mm")
        goal = TARGET_TFLOPS[r.gemm]
        if ours is None:
            lines.append(f"- {r.gemm} {r.shape.name}: >= {goal:,.0f} TFLOP/s: not measured")
            continue
        verdict = "met" if ours >= goal else "missed"
        extra = []
        if ceil is not None:
            pct = 100 * ours / ceil
            extra.append(f"{pct:.0f}% of ceiling (target {TARGET_CEILING_PCT:.0f}%: {'met' if pct >= TARGET_CEILING_PCT else 'missed'})")
        if bf16 is not None:
            vs = ours / bf16
            extra.append(f"{vs:.2f}x BF16 grouped (target {TARGET_VS_BF16}x: {'met' if vs >= TARGET_VS_BF16 else 'missed'})")
        lines.append(f"- {r.gemm} {r.shape.name}: {ours:,.0f} TFLOP/s vs >= {goal:,.0f}: **{verdict}**; " + "; ".join(extra))
    for w in wq:
        if w.shape.experts == 64 and (w.shape.n, w.shape.k) == (2816, 2048):
            verdict = "met" if w.ms <= WEIGHT_QUANT_TARGET_MS else "missed"
            lines.append(f"- weight quant of 64 experts' fc1: {w.ms:.3f} ms vs <= {WEIGHT_QUANT_TARGET_MS} ms: **{verdict}** "
                         f"({w.pct_copy:.0f}% of copy bandwidth, target 80%)")  # fmt: skip
    return lines


def report(results, wq, header: str) -> List[str]:
    lines = [header, "", "TFLOP/s (median GPU time); n/a: not available, reason in brackets.", ""]
    lines += format_table(results) + [""]
    if wq:
        lines += format_weight_quant(wq) + [""]
    for r in results:
        if "ours_transposes_us" in r.notes and "ours" in r.us:
            lines.append(f"- ours wgrad {r.shape.name}: {r.us['ours']:.0f} µs, of which its two scaling-aware transposes "
                         f"{r.notes['ours_transposes_us']} µs (timed alone)")  # fmt: skip
    lines += ["", "Targets (issue 15):", ""] + target_lines(results, wq) + [""]
    return lines


def write_markdown(path: Union[str, Path], lines: Sequence[str]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write("\n" + "\n".join(lines) + "\n")
