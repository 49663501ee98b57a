"""On the GPU: TE's grouped GEMM on pre-quantized FP8 agrees with the reference engine, and the whole FP8-Flow MoE
layer (kernels + TE GEMMs) matches the stock fp32 layer within the CPU-stated FP8 tolerance."""

import pytest
import torch

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def te_engine():
    pytest.importorskip("transformer_engine.pytorch")
    from fp8flow_megatron.ops.gemm_engine import TEGroupedGemm

    return TEGroupedGemm()


def _rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


@pytest.mark.parametrize("is_2d", [False, True])
def test_fast_storage_equals_te_constructor(te_engine, is_2d):
    # make_storage clones a template instead of calling TE's constructor ~500 times per layer fwd+bwd; it must hold
    # exactly what the constructor would (same attributes, same values), or TE's GEMM could read something else.
    codes = torch.zeros(32, 256, dtype=torch.uint8, device="cuda")
    scales = torch.ones(2, 32, device="cuda")
    fast = te_engine.make_storage(rowwise_data=codes, rowwise_scale_inv=scales, is_2d_scaled=is_2d)
    slow = te_engine._storage(
        rowwise_data=codes, rowwise_scale_inv=scales, columnwise_data=None, columnwise_scale_inv=None,
        fp8_dtype=te_engine._e4m3, quantizer=None, is_2D_scaled=is_2d,
    )
    assert type(fast) is type(slow) and fast.__dict__.keys() == slow.__dict__.keys()
    for name, value in slow.__dict__.items():
        assert fast.__dict__[name] is value or fast.__dict__[name] == value, name


@pytest.mark.parametrize("m_splits", [[16, 0, 48, 32], [0, 0, 64, 0], [128, 256, 16, 0]])
def test_te_grouped_gemm_matches_reference(te_engine, m_splits):
    # Same FP8 codes and scales in both engines; the fp32 results differ only by accumulation order / the tensor
    # cores' FP8 accumulation (measured ~1.3e-4 relative on an H100).
    from fp8flow_megatron.numerics import quantize_1x128
    from fp8flow_megatron.ops.gemm_engine import ReferenceGemm

    torch.manual_seed(0)
    ref = ReferenceGemm()
    e, k, n, m = len(m_splits), 256, 384, sum(m_splits)
    x_q = quantize_1x128(torch.randn(m, k, device="cuda"))
    g_q = quantize_1x128(torch.randn(m, n, device="cuda"))
    w = [torch.randn(n, k, device="cuda") * 0.05 for _ in range(e)]
    w_te = [te_engine.quantize_weight(t) for t in w]
    w_ref = [ref.quantize_weight(t) for t in w]
    # the weight codes agree exactly (TE's 128x128 quantizer vs numerics)
    for a, (b, _) in zip(w_te, w_ref):
        assert torch.equal(a._rowwise_data.view(torch.uint8), b.data.view(torch.uint8))
    y_te, y_ref = te_engine.fprop(x_q, w_te, m_splits, torch.float32), ref.fprop(x_q, w_ref, m_splits, torch.float32)
    assert _rel(y_te, y_ref) < 1e-3
    dx_te, dx_ref = te_engine.dgrad(g_q, w_te, m_splits, torch.float32), ref.dgrad(g_q, w_ref, m_splits, torch.float32)
    assert _rel(dx_te, dx_ref) < 1e-3
    dw_te, dw_ref = te_engine.wgrad(g_q, x_q, m_splits, torch.float32), ref.wgrad(g_q, x_q, m_splits, torch.float32)
    for i, (a, b) in enumerate(zip(dw_te, dw_ref)):
        if m_splits[i] == 0:
            assert float(a.abs().sum()) == 0.0
        else:
            assert _rel(a, b) < 1e-3, i


@pytest.mark.parametrize(
    "num_experts,n,k",
    [(3, 384, 256), (2, 2816, 2048), (2, 2048, 1408), (1, 300, 200), (4, 128, 128)],
    ids=["small", "v2lite-fc1", "v2lite-fc2-pad", "partial-blocks", "one-block"],
)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_te_engine_weights_equal_te_quantizer(te_engine, num_experts, n, k, dtype):
    # The TE engine quantizes all experts of a linear in one launch (our stack kernel) instead of TE's quantizer per
    # expert: the storages must hold exactly what TE's Float8BlockQuantizer makes (codes, scales in TE's padded
    # layout, both usages), so TE's GEMM computes bit-for-bit the same products.
    from fp8flow_megatron.numerics import quantize_1x128

    torch.manual_seed(0)
    w = [(torch.randn(n, k, device="cuda") * 0.05 * (i + 1)).to(dtype) for i in range(num_experts)]
    w[0][:128, :128] = 0.0  # one all-zero block: both must encode a zero amax the same way
    flag = torch.zeros(1, dtype=torch.int32, device="cuda")
    ours = te_engine.quantize_weights(w, nonfinite_flag=flag)
    theirs = [te_engine.quantize_weight(t) for t in w]
    assert int(flag) == 0
    nbn, nbk = -(-n // 128), -(-k // 128)
    for e, (a, b) in enumerate(zip(ours, theirs)):
        assert a._is_2D_scaled and b._is_2D_scaled
        assert torch.equal(a._rowwise_data, b._rowwise_data.view(torch.uint8)), e
        assert torch.equal(a._columnwise_data, b._columnwise_data.view(torch.uint8)), e
        assert a._rowwise_scale_inv.shape == b._rowwise_scale_inv.shape, e
        assert a._columnwise_scale_inv.shape == b._columnwise_scale_inv.shape, e
        assert torch.equal(a._rowwise_scale_inv[:, :nbk], b._rowwise_scale_inv[:, :nbk]), e
        assert torch.equal(a._columnwise_scale_inv[:, :nbn], b._columnwise_scale_inv[:, :nbn]), e
    if n % 16 or k % 16:
        return  # TE's blockwise GEMM needs leading dimensions that are multiples of 16 (the codes above still match)
    m_splits = [64] * num_experts
    x_q = quantize_1x128(torch.randn(sum(m_splits), k, device="cuda"))
    g_q = quantize_1x128(torch.randn(sum(m_splits), n, device="cuda"))
    assert torch.equal(te_engine.fprop(x_q, ours, m_splits, torch.float32),
                       te_engine.fprop(x_q, theirs, m_splits, torch.float32))
    assert torch.equal(te_engine.dgrad(g_q, ours, m_splits, torch.float32),
                       te_engine.dgrad(g_q, theirs, m_splits, torch.float32))


def _layers(flow_cfg_kw=None):
    from tests.megatron.mcore_env import copy_stock_weights, moe_config, moe_layer

    stock = moe_layer(moe_config(False)).cuda()
    flow = moe_layer(moe_config(True, **(flow_cfg_kw or {}))).cuda()
    copy_stock_weights(stock, flow)
    return stock, flow


def test_fp8flow_layer_on_gpu_matches_stock_fp32(megatron_gpu):
    from fp8flow_megatron.ops.gemm_engine import gemm_engine_for
    from tests.megatron.mcore_env import rel, run_layer

    assert gemm_engine_for(torch.device("cuda")).name == "te"
    torch.manual_seed(0)
    stock, flow = _layers()
    x = torch.randn(256, 2, 128, device="cuda")
    y0, dx0, dr0 = run_layer(stock, x, torch.linspace(-1, 1, x.numel(), device="cuda").view_as(x))
    y1, dx1, dr1 = run_layer(flow, x, torch.linspace(-1, 1, x.numel(), device="cuda").view_as(x))
    errs = {"out": rel(y1, y0), "dx": rel(dx1, dx0), "drouter": rel(dr1, dr0)}
    for i, ex in enumerate(stock.experts.local_experts):
        errs[f"dfc1.{i}"] = rel(flow.experts.linear_fc1.__getattr__(f"weight{i}").grad, ex.linear_fc1.weight.grad)
        errs[f"dfc2.{i}"] = rel(flow.experts.linear_fc2.__getattr__(f"weight{i}").grad, ex.linear_fc2.weight.grad)
    print("GPU FP8-Flow layer vs stock fp32:", {k: round(v, 4) for k, v in errs.items()})
    assert all(v <= (0.15 if "fc" in k else 0.10) for k, v in errs.items()), errs


def test_expert_recompute_identical_on_gpu(megatron_gpu):
    from tests.megatron.mcore_env import moe_config, moe_layer, run_layer

    torch.manual_seed(1)
    a = moe_layer(moe_config(True)).cuda()
    cfg = moe_config(True)
    cfg.moe_expert_recompute = True
    b = moe_layer(cfg).cuda()
    b.load_state_dict(a.state_dict())
    x = torch.randn(64, 2, 128, device="cuda")
    ra, rb = run_layer(a, x), run_layer(b, x)
    for u, v in zip(ra, rb):
        assert torch.equal(u, v)
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p.grad, q.grad), n


def test_triton_gemm_engine_layer_matches_te_engine(megatron_gpu):
    # The same FP8 operands through TE's per-expert cuBLAS GEMMs and through the single-launch Triton kernels: the
    # layer's output and every gradient agree to GEMM accumulation order; both stay within the fp32 tolerance.
    from fp8flow_megatron.ops.gemm_engine import gemm_engine_for
    from tests.megatron.mcore_env import moe_config, moe_layer, rel, run_layer

    assert gemm_engine_for(torch.device("cuda"), "triton").name == "triton"
    torch.manual_seed(3)
    te_cfg = moe_config(True)
    te_cfg.moe_fp8_flow_gemm = "te"
    te_layer = moe_layer(te_cfg).cuda()
    triton_cfg = moe_config(True)
    triton_cfg.moe_fp8_flow_gemm = "triton"
    triton_layer = moe_layer(triton_cfg).cuda()
    triton_layer.load_state_dict(te_layer.state_dict())
    assert triton_layer.experts.gemm_engine == "triton" and te_layer.experts.gemm_engine == "te"
    # the default, auto, takes te_grouped where it runs (cuBLASLt >= 13.6), else TE's per-expert grouped GEMM for
    # this layer's 4 local experts (<= 32)
    from fp8flow_megatron.ops.te_grouped_gemm import te_grouped_support

    auto = "te_grouped" if te_grouped_support()[0] else "te"
    assert moe_layer(moe_config(True)).experts.gemm_engine == auto
    x = torch.randn(256, 2, 128, device="cuda")
    g = torch.linspace(-1, 1, x.numel(), device="cuda").view_as(x)
    errs = {name: rel(u, v) for name, u, v in zip(("out", "dx", "drouter"), run_layer(triton_layer, x, g), run_layer(te_layer, x, g))}
    for (n, p), (_, q) in zip(triton_layer.named_parameters(), te_layer.named_parameters()):
        if q.grad is not None and float(q.grad.abs().sum()) > 0:
            errs[n] = rel(p.grad, q.grad)
    print("Triton engine vs TE engine:", {k: f"{v:.1e}" for k, v in errs.items()})
    assert all(v < 1e-2 for v in errs.values()), errs
