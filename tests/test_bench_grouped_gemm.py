"""scripts/bench_grouped_gemm.py's pure-Python half (scripts/bench_grouped_gemm_report.py) on CPU: shape and GEMM
parsing, FLOP accounting, the markdown table and target verdicts from fake timings, --write appending. Importing the
script must not touch CUDA."""

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _load_script(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up in sys.modules
    spec.loader.exec_module(module)
    return module


script = _load_script("bench_grouped_gemm")
bg = sys.modules["bench_grouped_gemm_report"]  # what the script imported: the pure-Python half


def test_import_is_cpu_only():
    # torch is imported inside the CUDA functions only
    assert not hasattr(script, "torch") and not hasattr(bg, "torch") and "torch" not in vars(bg)
    assert script.parse_shapes is bg.parse_shapes and script.Result is bg.Result


def test_parse_shapes_and_gemms():
    assert [s.name for s in bg.parse_shapes("all")] == ["ep1-fc1", "ep1-fc2", "ep8-fc1", "ep8-fc2"]
    ep1, custom = bg.parse_shapes("ep1-fc1, 4:100:256:384")
    assert (ep1.experts, ep1.rows, ep1.k, ep1.n) == (64, 1536, 2048, 2816) and ep1.m_total == 98304
    assert (custom.experts, custom.rows, custom.k, custom.n) == (4, 100, 256, 384) and custom.m_splits == [100] * 4
    assert bg.SHAPES["ep8-fc2"].m_total == 98304 and bg.SHAPES["ep8-fc2"].k == 1408
    for bad in ("nope", "1:2:3", "0:1:2:3", ""):
        with pytest.raises(ValueError):
            bg.parse_shapes(bad)
    assert bg.parse_gemms("all") == ["fprop", "dgrad", "wgrad"] and bg.parse_gemms("wgrad,fprop") == ["wgrad", "fprop"]
    with pytest.raises(ValueError):
        bg.parse_gemms("fprop,bwd")


def test_flops():
    s = bg.SHAPES["ep1-fc1"]
    for g in bg.GEMMS:
        m, n, k = bg.gemm_dims(s, g)
        assert 2 * m * n * k == bg.gemm_flops(s, g) == 2 * 98304 * 2816 * 2048
    assert bg.gemm_dims(s, "dgrad") == (98304, 2048, 2816) and bg.gemm_dims(s, "wgrad") == (2816, 2048, 98304)
    assert bg.gemm_flops(s, "wgrad", m_splits=[16, 0, 32]) == 2 * 48 * 2816 * 2048  # summed over experts
    assert bg.tflops(10**12, 1e6) == pytest.approx(1.0) and bg.tflops(1, None) is None
    assert bg.weight_quant_bytes(1, 128, 256) == 128 * 256 * 4 + 2 * 2 * 4


def _fake_results():
    s1, s8 = bg.SHAPES["ep1-fc1"], bg.SHAPES["ep8-fc1"]
    flops = bg.gemm_flops(s1, "fprop")

    def us(tf):  # µs that give `tf` TFLOP/s
        return flops / (tf * 1e12) * 1e6

    fprop = bg.Result("fprop", s1, us={"bf16_grouped_mm": us(753), "ceiling": us(1072), "ours": us(1050)})
    fprop.notes["te_fp8_gt"] = "not available (cuBLASLt 13.1.0)"
    wgrad = bg.Result("wgrad", s8, us={"bf16_grouped_mm": us(600), "ceiling": us(1000), "ours": us(395)})
    wgrad.notes["ours_transposes_us"] = "120"
    return [fprop, wgrad], us


def test_table_and_targets():
    results, us = _fake_results()
    table = bg.format_table(results)
    assert len(table) == 4 and table[0].count("|") == len(bg.IMPLS) + 6
    assert "| fprop | ep1-fc1 (64x1,536, 2048->2816) | 753 | n/a |" in table[2]
    assert "n/a (not available (cuBLASLt 13.1.0))" in table[2] and "| 1,050 |" in table[2]
    assert table[2].endswith("| 98% | 1.39x | n/a |") and table[3].endswith("| 40% | 0.66x | n/a |")
    assert "ours into TE grouped-tensor GEMM (te_grouped)" in table[0] and "te_grouped / ceiling" in table[0]
    wq = [bg.WeightQuant(bg.SHAPES["ep1-fc1"], us=500.0, bytes=10**9, copy_bw=4e12, exact=True)]
    assert wq[0].ms == 0.5 and wq[0].pct_copy == pytest.approx(50.0)
    targets = bg.target_lines(results, wq)
    assert "fprop ep1-fc1: 1,050 TFLOP/s vs >= 1,000: **met**" in targets[0] and "98% of ceiling" in targets[0]
    assert "1.39x BF16 grouped (target 1.3x: met)" in targets[0]
    assert "wgrad ep8-fc1: 395 TFLOP/s vs >= 850: **missed**" in targets[1] and "(target 93%: missed)" in targets[1]
    assert "0.500 ms vs <= 0.6 ms: **met**" in targets[2] and "50% of copy bandwidth" in targets[2]
    missing = bg.target_lines([bg.Result("dgrad", bg.SHAPES["ep1-fc2"])], [])
    assert missing == ["- dgrad ep1-fc2: >= 1,000 TFLOP/s: not measured"]


def test_report_and_write(tmp_path):
    results, _ = _fake_results()
    wq = [bg.WeightQuant(bg.SHAPES["ep1-fc1"], us=700.0, bytes=10**9, copy_bw=4e12, exact=False)]
    lines = bg.report(results, wq, "### header")
    text = "\n".join(lines)
    assert lines[0] == "### header" and "| weight quant 128x128" in text and "| NO |" in text
    assert "ours wgrad ep8-fc1" in text and "transposes 120 µs" in text and "**missed** (" in text
    out = tmp_path / "B.md"
    out.write_text("# existing\n")
    bg.write_markdown(out, lines)
    bg.write_markdown(out, ["second"])
    written = out.read_text()
    assert written.startswith("# existing\n") and "### header" in written and written.endswith("second\n")
