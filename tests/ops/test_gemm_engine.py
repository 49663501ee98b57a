import pytest
import torch

from fp8flow_megatron.ops.gemm_engine import ReferenceGemm, TEGroupedGemm


@pytest.mark.parametrize("m_splits", [[16, 0, 32], [0, 0], [48], [16] * 5])
def test_gemm_ready_scales_are_per_expert_transposes(m_splits):
    nb = 3
    scales = torch.arange(sum(m_splits) * nb, dtype=torch.float32).view(-1, nb)
    out = TEGroupedGemm._gemm_ready_scales(scales, m_splits)
    start = 0
    for m, o in zip(m_splits, out):
        assert o.shape == (nb, m) and o.is_contiguous()
        assert torch.equal(o, scales[start : start + m].t())
        start += m


def test_reference_engine_wgrad_of_empty_expert_is_zero():
    from fp8flow_megatron.numerics import quantize_1x128

    g = quantize_1x128(torch.randn(16, 128))
    x = quantize_1x128(torch.randn(16, 256))
    dw = ReferenceGemm().wgrad(g, x, [0, 16, 0], torch.float32)
    assert [tuple(t.shape) for t in dw] == [(128, 256)] * 3
    assert float(dw[0].abs().sum()) == 0 and float(dw[2].abs().sum()) == 0 and float(dw[1].abs().sum()) > 0


@pytest.mark.parametrize("te", [True, False])
@pytest.mark.parametrize("local_experts,expected_with_te", [(64, "triton"), (33, "triton"), (32, "te"), (16, "te"), (8, "te"), (1, "te")])
def test_auto_engine_picks_by_local_experts(monkeypatch, te, local_experts, expected_with_te):
    from fp8flow_megatron.ops import gemm_engine

    monkeypatch.setattr(gemm_engine, "te_available", lambda: te)
    got = gemm_engine.resolve_gemm_engine("auto", local_experts)
    assert got == (expected_with_te if te else "triton")  # no TE: the Triton kernels, never a silent reference
    assert gemm_engine.resolve_gemm_engine("triton", local_experts) == "triton"
    assert gemm_engine.resolve_gemm_engine("te", local_experts) == "te"


def test_unknown_engine_is_refused_with_the_choices():
    from fp8flow_megatron.ops.gemm_engine import gemm_engine_for

    with pytest.raises(ValueError, match=r"'cublas'.*auto.*triton.*te"):
        gemm_engine_for(torch.device("cpu"), "cublas")
    assert isinstance(gemm_engine_for(torch.device("cpu"), "auto", 8), ReferenceGemm)  # CPU: always the spec


def test_te_engine_requested_on_cuda_without_te_raises(monkeypatch):
    # no silent fallback to the dequantize -> fp32 reference on a GPU (issue 17); only the device type is read here
    from fp8flow_megatron.ops import gemm_engine

    monkeypatch.setattr(gemm_engine, "te_available", lambda: False)
    with pytest.raises(RuntimeError, match="needs TransformerEngine.*--moe-fp8-flow-gemm triton"):
        gemm_engine.gemm_engine_for(torch.device("cuda"), "te", 8)
    assert gemm_engine.resolve_gemm_engine("auto", 8) == "triton"
    assert gemm_engine.gemm_engine_for(torch.device("cpu"), "te", 8).name == "reference"


def test_te_engine_reads_row_groups_on_the_host_and_pads_the_tail():
    # The TE engine needs host m_splits: given the sync-free layout (a RowGroups over a worst-case buffer) it reads the
    # counts, runs on the groups' rows only, and returns zero tail rows like the Triton engine.
    from fp8flow_megatron.numerics import quantize_1x128
    from fp8flow_megatron.numerics.groups import RowGroups

    q = quantize_1x128(torch.randn(40, 128))
    groups = RowGroups.from_counts(torch.tensor([16, 0, 16]), 40, align=16)
    head, splits, tail = TEGroupedGemm._host_rows(q, groups)
    assert splits == [16, 0, 16] and tail == 8 and head.data.shape == (32, 128)
    assert torch.equal(head.data.view(torch.uint8), q.data[:32].view(torch.uint8))
    same, splits2, tail2 = TEGroupedGemm._host_rows(q, [8, 32])
    assert same is q and splits2 == [8, 32] and tail2 == 0
    y = TEGroupedGemm._with_tail(torch.ones(32, 5), tail)
    assert y.shape == (40, 5) and float(y[32:].abs().sum()) == 0.0 and float(y[:32].sum()) == 160.0


@pytest.mark.parametrize("accumulate", [False, True])
def test_reference_engine_row_groups_equal_host_splits(accumulate):
    # CPU spec of the sync-free path: with a RowGroups (tail rows included) the reference engine gives exactly what it
    # gives for the host m_splits on the groups' rows, and zero tail rows.
    from fp8flow_megatron.numerics import Fp8Blockwise, quantize_1x128
    from fp8flow_megatron.numerics.groups import RowGroups

    torch.manual_seed(0)
    splits, tail, n, k = [16, 0, 48], 21, 128, 256
    m = sum(splits) + tail
    x, g = quantize_1x128(torch.randn(m, k)), quantize_1x128(torch.randn(m, n))
    head = lambda q: Fp8Blockwise(q.data[: sum(splits)], q.scale_inv[: sum(splits)], q.block)  # noqa: E731
    eng = ReferenceGemm()
    w = eng.quantize_weights([torch.randn(n, k) * 0.05 for _ in splits])
    groups = RowGroups.from_counts(torch.tensor(splits), m, align=16)
    y = eng.fprop(x, w, groups, torch.bfloat16)
    assert torch.equal(y[: sum(splits)], eng.fprop(head(x), w, splits, torch.bfloat16)) and not y[sum(splits):].any()
    dx = eng.dgrad(g, w, groups, torch.float32)
    assert torch.equal(dx[: sum(splits)], eng.dgrad(head(g), w, splits, torch.float32)) and not dx[sum(splits):].any()
    if accumulate:
        a, b = [torch.ones(n, k) for _ in splits], [torch.ones(n, k) for _ in splits]
        eng.wgrad(g, x, groups, torch.float32, accumulate_into=a)
        eng.wgrad(head(g), head(x), splits, torch.float32, accumulate_into=b)
    else:
        a = eng.wgrad(g, x, groups, torch.bfloat16)
        b = eng.wgrad(head(g), head(x), splits, torch.bfloat16)
    assert all(torch.equal(u, v) for u, v in zip(a, b)) and len(a) == len(splits)
