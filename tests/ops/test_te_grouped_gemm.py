"""CPU checks of the te_grouped engine: selection, refusals and their messages, the support reasons, the row-wise
scale layout it hands TE, and the tail-zero twin. The GEMMs themselves: tests/ops/test_gpu_te_grouped_gemm.py."""

import pytest
import torch

from fp8flow_megatron.numerics.groups import RowGroups, zero_tail_rows
from fp8flow_megatron.ops import gemm_engine, te_grouped_gemm
from fp8flow_megatron.ops.te_grouped_gemm import grouped_rowwise_scales, support_reason

OK = dict(cuda=True, capability=(9, 0), te_error=None, api_missing=None, cublaslt=130600)


def test_support_reason_is_empty_when_everything_is_there():
    assert support_reason(**OK) == ""
    assert support_reason(**{**OK, "cublaslt": 130700}) == ""


@pytest.mark.parametrize(
    "override,expected",
    [
        ({"cuda": False}, r"no CUDA device; use --moe-fp8-flow-gemm triton"),
        ({"te_error": "TransformerEngine does not import (x)"}, r"does not import.*--moe-fp8-flow-gemm triton"),
        ({"api_missing": "transformer_engine_torch.get_cublasLt_version"}, r"grouped-tensor GEMM API.*get_cublasLt"),
        ({"capability": (10, 0)}, r"Hopper \(SM90\) only.*\(10, 0\).*triton"),
        ({"capability": (8, 0)}, r"Hopper"),
        ({"cublaslt": 130100}, r"cuBLASLt 13\.1 < 13\.6.*LD_PRELOAD.*>= 13\.6.*--moe-fp8-flow-gemm triton"),
        ({"cublaslt": 130599}, r"cuBLASLt 13\.5 < 13\.6"),
        ({"cublaslt": None}, r"cuBLASLt unknown < 13\.6"),
    ],
)
def test_support_reason_names_what_is_missing_and_the_fix(override, expected):
    import re

    reason = support_reason(**{**OK, **override})
    assert re.search(expected, reason), reason


def test_support_on_this_machine_gives_a_reason_without_raising():
    ok, reason = te_grouped_gemm.te_grouped_support()
    assert ok == (reason == "")
    if not torch.cuda.is_available():
        assert not ok and "no CUDA device" in reason


@pytest.mark.parametrize("local_experts", [1, 32, 64])
def test_auto_takes_te_grouped_where_it_runs(monkeypatch, local_experts):
    monkeypatch.setattr(gemm_engine, "te_available", lambda: True)
    monkeypatch.setattr(gemm_engine, "_te_grouped_ok", lambda: True)
    assert gemm_engine.AUTO_PREFERS_TE_GROUPED is True  # measured faster on the H200 (BENCHMARKS.md)
    assert gemm_engine.resolve_gemm_engine("auto", local_experts) == "te_grouped"
    monkeypatch.setattr(gemm_engine, "AUTO_PREFERS_TE_GROUPED", False)
    assert gemm_engine.resolve_gemm_engine("auto", local_experts) == ("te" if local_experts <= 32 else "triton")
    monkeypatch.setattr(gemm_engine, "AUTO_PREFERS_TE_GROUPED", True)
    monkeypatch.setattr(gemm_engine, "_te_grouped_ok", lambda: False)  # preferred but unsupported: auto's old choice
    assert gemm_engine.resolve_gemm_engine("auto", local_experts) == ("te" if local_experts <= 32 else "triton")


def test_te_grouped_is_an_engine_and_cpu_runs_the_reference():
    assert "te_grouped" in gemm_engine.GEMM_ENGINES
    assert gemm_engine.resolve_gemm_engine("te_grouped", 64) == "te_grouped"
    assert gemm_engine.gemm_engine_for(torch.device("cpu"), "te_grouped", 8).name == "reference"


def test_te_grouped_requested_on_cuda_when_unsupported_raises_the_reason(monkeypatch):
    gemm_engine._te_grouped_engine.cache_clear()
    monkeypatch.setattr(te_grouped_gemm, "te_grouped_support", lambda: (False, "run-time cuBLASLt 13.1 < 13.6; fix"))
    with pytest.raises(RuntimeError, match=r"--moe-fp8-flow-gemm te_grouped cannot run here: run-time cuBLASLt 13\.1"):
        gemm_engine.gemm_engine_for(torch.device("cuda"), "te_grouped", 8)
    gemm_engine._te_grouped_engine.cache_clear()


def test_config_refuses_te_grouped_on_a_gpu_that_cannot_run_it(monkeypatch):
    from fp8flow_megatron.megatron import config

    monkeypatch.setattr(config, "_te_grouped_unsupported", lambda: "run-time cuBLASLt 13.1 < 13.6; LD_PRELOAD ...")
    errors = config.validation_errors({"moe_fp8_flow": True, "moe_fp8_flow_gemm": "te_grouped"})
    assert any("--moe-fp8-flow-gemm te_grouped cannot run here: run-time cuBLASLt 13.1" in e for e in errors), errors
    monkeypatch.setattr(config, "_te_grouped_unsupported", lambda: "")
    errors = config.validation_errors({"moe_fp8_flow": True, "moe_fp8_flow_gemm": "te_grouped"})
    assert not any("te_grouped" in e for e in errors), errors


def test_flag_accepts_te_grouped():
    import argparse

    from fp8flow_megatron.megatron.config import add_fp8_flow_args

    args = add_fp8_flow_args(argparse.ArgumentParser()).parse_args(["--moe-fp8-flow-gemm", "te_grouped"])
    assert args.moe_fp8_flow_gemm == "te_grouped"


@pytest.mark.parametrize("splits,num_rows", [([16, 0, 32], 48), ([16, 0, 32], 80), ([0, 0], 32), ([48], 48), ([], 16)])
def test_grouped_rowwise_scales_are_each_groups_transpose_end_to_end(splits, num_rows):
    nb = 3
    scales = torch.arange(num_rows * nb, dtype=torch.float32).view(num_rows, nb)
    groups = RowGroups.from_splits(splits, "cpu", num_rows) if splits else RowGroups.from_counts(
        torch.zeros(0, dtype=torch.int64), num_rows)  # fmt: skip
    flat = grouped_rowwise_scales(scales, groups)
    assert flat.shape == (num_rows * nb,)
    start = 0
    for m in splits:  # TE's layout: group e's [nb, m_e] at nb * offsets[e]
        assert torch.equal(flat[start * nb : (start + m) * nb].view(nb, m), scales[start : start + m].t())
        start += m
    assert torch.equal(flat[start * nb :], scales[start:].reshape(-1))  # the tail keeps its compact places


@pytest.mark.parametrize("splits,num_rows", [([16, 0, 32], 48), ([16, 0, 32], 100), ([0], 7), ([], 5)])
def test_zero_tail_rows_twin_zeros_exactly_the_tail(splits, num_rows):
    y = torch.randn(num_rows, 9)
    offsets = torch.tensor([0] + list(torch.tensor(splits, dtype=torch.int64).cumsum(0).tolist()), dtype=torch.int64)
    before = y.clone()
    out = zero_tail_rows(y, offsets)
    end = int(offsets[-1])
    assert out is y
    assert torch.equal(y[:end], before[:end]) and not y[end:].any()


def test_host_counts_not_a_multiple_of_16_are_refused():
    from fp8flow_megatron.numerics import quantize_1x128

    engine = object.__new__(te_grouped_gemm.TEGroupedTensorGemm)  # no TE here: only the host-side checks run
    q = quantize_1x128(torch.randn(24, 128))
    with pytest.raises(ValueError, match=r"\[8, 16\] are not all multiples of 16"):
        engine._groups(q, [8, 16])
    with pytest.raises(ValueError, match=r"align=1; .*multiple of 16.*--moe-fp8-flow-gemm triton"):
        engine._groups(q, RowGroups.from_splits([8, 16], "cpu"))
    groups = engine._groups(quantize_1x128(torch.randn(48, 128)), [16, 0, 32])
    assert groups.align == 16 and groups.num_rows == 48
