"""CPU checks of scripts/bench_moe_layer_steps.py: which variants get a _graph twin, the --microbatches parser, and
the step structure (one step signal, then N fwd+bwd without it). Timings are GPU-only (the bench itself)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))

import bench_moe_layer_steps as steps  # noqa: E402


def test_graph_twins_only_where_capture_is_supported():
    variants = ["bf16", "te_blockwise", "fp8flow", "fp8flow_recomp", "fp8flow_triton", "fp8flow_te", "fp8flow_recomp_triton"]
    assert steps.with_graph_variants(variants, ep=1) == [
        "bf16", "te_blockwise", "fp8flow", "fp8flow_graph", "fp8flow_recomp", "fp8flow_triton", "fp8flow_triton_graph",
        "fp8flow_te", "fp8flow_recomp_triton"]
    assert steps.with_graph_variants(variants, ep=8) == variants  # EP>1: the dispatcher is not capturable


def test_microbatches_parser():
    assert steps.parse_microbatches("1,8") == [1, 8]
    assert steps.parse_microbatches("4") == [4]
    for bad in ("", "0", "1,-2"):
        with pytest.raises(SystemExit, match="--microbatches"):
            steps.parse_microbatches(bad)


def test_a_step_is_one_signal_then_n_microbatches():
    calls = []
    step = steps.make_step(lambda layer: calls.append("signal"),
                           lambda layer, fp8, x, g, mark_step: calls.append(("fwd_bwd", mark_step)), "layer", False,
                           None, None, 3)
    step()
    assert calls == ["signal"] + [("fwd_bwd", False)] * 3
