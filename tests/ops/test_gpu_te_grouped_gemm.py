"""On the GPU: the te_grouped engine (our FP8 operands into TE's single-launch grouped-tensor GEMM) against the
numerics twins on the same codes and scales, and the MoE layer with te_grouped vs triton.

Skipped without CUDA, and with te_grouped_support()'s reason where the engine cannot run (TE missing, not Hopper, or
a run-time cuBLASLt < 13.6: LD_PRELOAD a cuBLAS >= 13.6 to run these).

Tolerance: both sides read identical FP8 codes and power-of-two scales and accumulate in fp32 (cuBLAS with split
accumulation on the tensor cores); the relative Frobenius error is accumulation order only, ~1e-4 measured for the
per-expert TE engine on an H100 (tests/ops/test_gpu_moe_layer.py), so 1e-3 here; bf16 outputs add one bf16 rounding
(2^-8 relative per element), so 1e-2 for them.
"""

import pytest
import torch

from fp8flow_megatron.numerics import quantize_1x128
from fp8flow_megatron.numerics.gemm import fp8_varlen_gemm_nt, fp8_varlen_wgrad
from fp8flow_megatron.numerics.groups import RowGroups, zero_tail_rows

pytestmark = pytest.mark.gpu

TOL = {torch.float32: 1e-3, torch.bfloat16: 1e-2}


@pytest.fixture(scope="module")
def engine():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from fp8flow_megatron.ops.te_grouped_gemm import TEGroupedTensorGemm, te_grouped_support

    ok, reason = te_grouped_support()
    if not ok:
        pytest.skip(f"te_grouped unsupported here: {reason}")
    return TEGroupedTensorGemm()


def _rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


def _operands(splits, k, n, scale, tail=0, seed=0):
    torch.manual_seed(seed)
    rows = sum(splits) + tail
    x_q = quantize_1x128(torch.randn(rows, k, device="cuda") * scale)
    g_q = quantize_1x128(torch.randn(rows, n, device="cuda") * scale)
    w = [torch.randn(n, k, device="cuda") * 0.05 * (i + 1) for i in range(len(splits))]
    return x_q, g_q, w


CASES = [
    ([16, 0, 48, 32], 0),  # an empty expert
    ([0, 0, 64, 0], 0),  # all but one empty
    ([16, 16, 16], 0),  # 1-row experts padded to 16
    ([128, 256, 16, 0], 48),  # tail rows past the groups (RowGroups over a worst-case buffer)
    ([144] * 8, 112),  # rows not a multiple of 128, tail
]


@pytest.mark.parametrize("splits,tail", CASES)
@pytest.mark.parametrize("scale", [1e-3, 1.0, 300.0])
@pytest.mark.parametrize("as_groups", [True, False])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_fprop_dgrad_wgrad_match_the_twins(engine, splits, tail, scale, as_groups, out_dtype):
    if tail and not as_groups:
        pytest.skip("host counts cover the operand exactly")
    k, n = 256, 384
    x_q, g_q, w = _operands(splits, k, n, scale, tail)
    rows = RowGroups.from_splits(splits, "cuda", sum(splits) + tail, align=16) if as_groups else splits
    groups = RowGroups.from_splits(splits, "cuda", sum(splits) + tail, align=16)
    w_q = engine.quantize_weights(w)
    case = f"splits={splits} tail={tail} scale={scale} groups={as_groups} out={out_dtype}"

    y = engine.fprop(x_q, w_q, rows, out_dtype)
    y_ref = fp8_varlen_gemm_nt(x_q, w_q.stack, groups, torch.float32)
    assert y.shape == (sum(splits) + tail, n) and y.dtype == out_dtype, case
    assert not y[sum(splits) :].any(), f"fprop tail rows not zero: {case}"
    assert _rel(y, y_ref) < TOL[out_dtype], (case, _rel(y, y_ref))

    dx = engine.dgrad(g_q, w_q, rows, out_dtype)
    dx_ref = fp8_varlen_gemm_nt(g_q, w_q.stack_t, groups, torch.float32)
    assert dx.shape == (sum(splits) + tail, k) and not dx[sum(splits) :].any(), case
    assert _rel(dx, dx_ref) < TOL[out_dtype], (case, _rel(dx, dx_ref))

    dw = engine.wgrad(g_q, x_q, rows, out_dtype)
    dw_ref = fp8_varlen_wgrad(g_q, x_q, groups, torch.float32)
    for e, m in enumerate(splits):
        assert dw[e].shape == (n, k) and dw[e].dtype == out_dtype, case
        if m == 0:
            assert not dw[e].any(), f"wgrad of empty expert {e} not zero: {case}"
        else:
            assert _rel(dw[e], dw_ref[e]) < TOL[out_dtype], (case, e, _rel(dw[e], dw_ref[e]))


@pytest.mark.parametrize("one_buffer", [True, False])
def test_wgrad_accumulates_into_main_grads_and_leaves_empty_experts_alone(engine, one_buffer):
    splits, k, n = [32, 0, 16, 64], 256, 384
    x_q, g_q, _ = _operands(splits, k, n, 1.0)
    groups = RowGroups.from_splits(splits, "cuda", sum(splits), align=16)
    base = torch.randn(len(splits), n, k, device="cuda")
    main = base.clone()
    acc = list(main.unbind(0)) if one_buffer else [t.clone() for t in base.unbind(0)]
    out = engine.wgrad(g_q, x_q, groups, torch.float32, accumulate_into=acc)
    assert all(a is b for a, b in zip(out, acc))
    ref = fp8_varlen_wgrad(g_q, x_q, groups, torch.float32)
    for e, m in enumerate(splits):
        if m == 0:
            assert torch.equal(acc[e], base[e]), f"empty expert {e}'s accumulator changed"
        else:
            assert _rel(acc[e] - base[e], ref[e]) < 1e-3, e


def test_unaligned_groups_are_refused(engine):
    x_q, _, w = _operands([8, 16], 256, 384, 1.0)
    with pytest.raises(ValueError, match="multiple of 16"):
        engine.fprop(x_q, engine.quantize_weights(w), RowGroups.from_splits([8, 16], "cuda"), torch.float32)


def test_sync_free_given_row_groups(engine):
    # counts computed on the device: the engine must not read them (a sync would show in the CUDA sync debug mode)
    splits, k, n = [32, 0, 48], 256, 384
    x_q, g_q, w = _operands(splits, k, n, 1.0, tail=16)
    w_q = engine.quantize_weights(w)
    counts = torch.tensor(splits, device="cuda")
    groups = RowGroups.from_counts(counts, sum(splits) + 16, 16)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        engine.fprop(x_q, w_q, groups, torch.bfloat16)
        engine.dgrad(g_q, w_q, groups, torch.bfloat16)
        engine.wgrad(g_q, x_q, groups, torch.float32)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("rows,end", [(100, 48), (100, 0), (100, 100), (1, 0), (4096, 1000)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_zero_tail_rows_kernel_equals_twin(rows, end, dtype):
    from fp8flow_megatron.kernels import zero_tail_rows_triton

    y = torch.randn(rows, 300, device="cuda").to(dtype)
    offsets = torch.tensor([0, end], dtype=torch.int64, device="cuda")
    ref = zero_tail_rows(y.clone(), offsets)
    assert torch.equal(zero_tail_rows_triton(y, offsets), ref)


def test_layer_te_grouped_matches_triton(engine, megatron_gpu):
    from tests.megatron.mcore_env import moe_config, moe_layer, rel, run_layer

    torch.manual_seed(3)
    cfgs = {}
    for name in ("triton", "te_grouped"):
        cfgs[name] = moe_config(True)
        cfgs[name].moe_fp8_flow_gemm = name
    tri = moe_layer(cfgs["triton"]).cuda()
    teg = moe_layer(cfgs["te_grouped"]).cuda()
    teg.load_state_dict(tri.state_dict())
    assert teg.experts.gemm_engine == "te_grouped"
    x = torch.randn(256, 2, 128, device="cuda")
    g = torch.linspace(-1, 1, x.numel(), device="cuda").view_as(x)
    errs = {name: rel(u, v) for name, u, v in zip(("out", "dx", "drouter"), run_layer(teg, x, g), run_layer(tri, x, g))}
    for (n, p), (_, q) in zip(teg.named_parameters(), tri.named_parameters()):
        if q.grad is not None and float(q.grad.abs().sum()) > 0:
            errs[n] = rel(p.grad, q.grad)
    print("te_grouped engine vs Triton engine:", {k: f"{v:.1e}" for k, v in errs.items()})
    assert all(v < 1e-2 for v in errs.values()), errs
