"""On the GPU: the non-finite guard through the real kernels and GEMM engines. An inf or NaN injected at each FP8-Flow
quantization site of a megatron MoE layer (Triton and TE engines) on an iteration that is not logged stops the step's
check naming layer, site, pass and iteration, and clean iterations raise nothing; raising a flag never synchronizes."""

import pytest
import torch

pytestmark = pytest.mark.gpu

LAYER = 2


def _layer(engine, recompute=False):
    from tests.megatron.mcore_env import moe_config, moe_layer

    if engine == "te":
        pytest.importorskip("transformer_engine.pytorch")
    torch.manual_seed(0)
    cfg = moe_config(True, 8, 2, num_layers=4)
    cfg.moe_fp8_flow_gemm = engine
    cfg.moe_expert_recompute = recompute
    layer = moe_layer(cfg).cuda()
    layer.set_layer_number(LAYER)
    assert layer.experts.gemm_engine == engine
    return layer


@pytest.mark.parametrize("value", ["inf", "-inf", "nan"])
@pytest.mark.parametrize("site", ["tokens", "fc1_weight", "fc2_weight", "swiglu_out", "combine_grad", "dswiglu_out"])
@pytest.mark.parametrize("engine", ["triton", "te"])
def test_each_site_stops_the_step_naming_it(megatron_gpu, clean_guard, engine, site, value):
    from fp8flow_megatron.ops.telemetry import monitor
    from tests.megatron.nonfinite_sites import VALUES, expected_message, step

    assert not monitor.enabled  # a step that is not logged: only the guard can see it
    layer = _layer(engine)
    x = torch.randn(128, 2, 128, device="cuda")
    step(layer, x)
    clean_guard.check(1)
    step(layer, x, site, VALUES[value])
    with pytest.raises(FloatingPointError) as err:
        clean_guard.check(2)
    assert expected_message(site, LAYER, 2) in str(err.value), str(err.value)
    step(layer, x)
    clean_guard.check(3)


@pytest.mark.parametrize("site", ["swiglu_out", "dswiglu_out"])
def test_expert_recompute_keeps_the_sites(megatron_gpu, clean_guard, site):
    from tests.megatron.nonfinite_sites import expected_message, step

    layer = _layer("triton", recompute=True)
    step(layer, torch.randn(64, 2, 128, device="cuda"), site, float("nan"))
    with pytest.raises(FloatingPointError) as err:
        clean_guard.check(4)
    assert expected_message(site, LAYER, 4) in str(err.value), str(err.value)


def _syncs(fn) -> bool:
    """Whether fn() makes a synchronizing CUDA call ("error" mode turns one into a RuntimeError)."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn()
        return False
    except RuntimeError as e:
        if "synchroniz" not in str(e):
            raise
        return True
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_raising_a_flag_never_synchronizes(clean_guard):
    # every guarded quantizer, given non-finite data, raises its flag without a sync; only check() reads the flags
    from fp8flow_megatron.kernels import (
        quantize_1x128_triton,
        quantize_weight_stack_triton,
        weighted_swiglu_quant_backward_triton,
        weighted_swiglu_quant_triton,
    )

    cuda = torch.device("cuda")
    x = torch.randn(64, 256, device="cuda")
    x[3, 3] = float("nan")
    fc1, probs, grad = torch.randn(64, 512, device="cuda"), torch.rand(64, device="cuda"), torch.randn(64, 256, device="cuda")
    weights = [torch.randn(256, 128, device="cuda") for _ in range(2)]
    weights[1][0, 0] = float("inf")

    def ours():
        quantize_1x128_triton(x, clean_guard.flag("sync/tokens", "forward", cuda))
        weighted_swiglu_quant_triton(fc1, probs, clean_guard.flag("sync/swiglu_out", "forward", cuda))
        weighted_swiglu_quant_backward_triton(grad, fc1, probs, clean_guard.flag("sync/dswiglu_out", "backward", cuda))
        quantize_weight_stack_triton(weights, clean_guard.flag("sync/fc1_weight", "forward", cuda))

    ours()  # compiles the kernels (compilation may synchronize) and allocates the slots
    assert not _syncs(ours)
    expected = ["tokens", "fc1_weight"]
    try:
        from fp8flow_megatron.ops.gemm_engine import TEGroupedGemm

        te = TEGroupedGemm()
    except ImportError:
        te = None
    if te is not None:
        te.quantize_weights(weights, nonfinite_flag=clean_guard.flag("sync/fc2_weight", "forward", cuda))
        if not _syncs(lambda: te.quantize_weights(weights)):  # TE's own quantizer first: the guard adds no sync to it
            assert not _syncs(lambda: te.quantize_weights(weights, nonfinite_flag=clean_guard.flag("sync/fc2_weight", "forward", cuda)))
        expected.append("fc2_weight")
    with pytest.raises(FloatingPointError) as err:
        clean_guard.check(1)
    msg = str(err.value)
    for site in expected:
        assert f"'{site}' of MoE sync" in msg, msg
    assert "'swiglu_out'" not in msg and "'dswiglu_out'" not in msg  # finite there


def test_the_check_reads_once_and_costs_little(clean_guard):
    # one device->host copy per check; measured here to bound what the trainer pays per iteration
    import time

    for i in range(64):
        clean_guard.flag(f"layer{i}/tokens", "forward", torch.device("cuda"))
    clean_guard.check(0)  # warm-up
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(20):
        clean_guard.check(i + 1)
    per_check_us = (time.perf_counter() - t0) / 20 * 1e6
    print(f"non-finite guard check: {per_check_us:.0f} µs per call (64 slots, stream idle)")
    assert per_check_us < 2000


@pytest.mark.parametrize("contiguous", [True, False], ids=["contiguous", "transposed-view"])
@pytest.mark.parametrize("case, expected", [("finite", 0), ("large", 0), ("inf", 1), ("-inf", 1), ("nan", 1)])
def test_te_engine_flags_exactly_the_nonfinite_weights(case, expected, contiguous):
    # The TE engine quantizes its weights with our stack kernel, which raises the flag as it quantizes (non-contiguous
    # weights are copied dense first); only for a non-finite value.
    pytest.importorskip("transformer_engine.pytorch")
    from fp8flow_megatron.ops.gemm_engine import TEGroupedGemm

    ws = [torch.randn(256, 384, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(3)]
    if case != "finite":
        ws[2][7, 9] = 3.0e38 if case == "large" else float(case)
    if not contiguous:
        ws = [w.t().contiguous().t() for w in ws]
        assert not ws[0].is_contiguous()
    buf = torch.zeros(8, dtype=torch.int32, device="cuda")
    TEGroupedGemm().quantize_weights(ws, nonfinite_flag=buf[5:6])
    assert buf.cpu().tolist() == [0] * 5 + [expected] + [0] * 2
