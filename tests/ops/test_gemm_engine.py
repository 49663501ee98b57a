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
