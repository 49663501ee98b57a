"""fp8_flow_experts(transpose_in_backward=True), what --disable-parameter-transpose-cache turns on: no transposed FP8
weight copy is held from forward to backward, each dgrad gets its transposed codes made right before it from the
same weights. Output, input, router and weight gradients are bit-identical to the default (the transposed codes are
the same codes), with and without expert recompute, on CPU (reference engine) and on the GPU (Triton engine), and the
cache holds only the fprop codes."""

import pytest
import torch

from fp8flow_megatron.numerics import quantize_1x128
from fp8flow_megatron.numerics.groups import RowGroups
from fp8flow_megatron.ops.experts import WeightQuantCache, fp8_flow_experts
from fp8flow_megatron.ops.fp8_tensor import Fp8FlowTensor

ENGINES = [
    pytest.param("cpu", "auto", id="cpu-reference"),
    pytest.param("cuda", "triton", id="cuda-triton", marks=pytest.mark.gpu),
]


def _inputs(device, m_splits, hidden=256, ffn=384, seed=0):
    g = torch.Generator().manual_seed(seed)
    m = sum(m_splits)
    x = Fp8FlowTensor(quantize_1x128((torch.randn(m, hidden, generator=g) * 2).to(device)), torch.bfloat16)
    probs = torch.rand(m, generator=g).to(device).requires_grad_()
    w1 = [(torch.randn(2 * ffn, hidden, generator=g) * 0.05).bfloat16().to(device).requires_grad_() for _ in m_splits]
    w2 = [(torch.randn(hidden, ffn, generator=g) * 0.05).bfloat16().to(device).requires_grad_() for _ in m_splits]
    grad = (torch.randn(m, hidden, generator=g) * 1e-2).bfloat16().to(device)
    return x, probs, w1, w2, grad


def _run(device, engine, m_splits, recompute, transpose_in_backward, rows):
    x, probs, w1, w2, grad = _inputs(device, m_splits)
    cache = WeightQuantCache()
    y = fp8_flow_experts(x, probs, rows, w1, w2, recompute=recompute, cache=cache, gemm_engine=engine,
                         transpose_in_backward=transpose_in_backward)  # fmt: skip
    y.backward(grad)
    return [y, probs.grad, *(w.grad for w in w1 + w2)], cache


def _transposed_codes(group):
    """The transposed codes a cache entry holds: per expert (reference engine's list of pairs) or one stack."""
    if isinstance(group, list):
        return [w_t for _, w_t in group]
    return [group[1]]


@pytest.mark.parametrize("recompute", [False, True], ids=["stored", "recompute"])
@pytest.mark.parametrize("m_splits", [[32, 0, 48], [16, 16, 16]])
@pytest.mark.parametrize("device,engine", ENGINES)
def test_transpose_in_backward_is_bit_identical_and_holds_no_transposed_copy(device, engine, m_splits, recompute):
    rows = RowGroups.from_splits(m_splits, device) if device == "cuda" else m_splits
    ref, ref_cache = _run(device, engine, m_splits, recompute, False, rows)
    got, cache = _run(device, engine, m_splits, recompute, True, rows)
    for i, (a, b) in enumerate(zip(got, ref)):
        assert torch.equal(a, b), f"tensor {i} differs"
    for name in ("fc1", "fc2"):
        assert all(t is None for t in _transposed_codes(cache.cached(name))), name
        assert all(t is not None for t in _transposed_codes(ref_cache.cached(name))), name
    # what the caches hold: the fprop codes and scales alone, vs those plus (at least) the transposed codes
    _, _, w1, w2, _ = _inputs(device, m_splits)
    num_weights = sum(w.numel() for w in w1 + w2)
    num_scales = sum(-(-w.shape[0] // 128) * -(-w.shape[1] // 128) for w in w1 + w2)
    assert cache.nbytes() == num_weights + 4 * num_scales
    assert ref_cache.nbytes() >= 2 * num_weights + 4 * num_scales


def test_cache_form_is_part_of_its_key():
    # switching the form re-quantizes instead of handing a dgrad codes without their transpose
    from fp8flow_megatron.ops.gemm_engine import ReferenceGemm

    _, _, w1, _, _ = _inputs("cpu", [16, 16])
    cache, engine = WeightQuantCache(), ReferenceGemm()
    lean = cache.get_group("fc1", w1, engine, refresh=True, columnwise=False)
    assert all(w_t is None for _, w_t in lean)
    full = cache.get_group("fc1", w1, engine, refresh=False)
    assert all(w_t is not None for _, w_t in full) and cache.num_quantizations == 2
    assert cache.get_group("fc1", w1, engine, refresh=False) is full and cache.num_quantizations == 2
