"""Telemetry through real megatron MoE layers on CPU: routing statistics in every mode, FP8 sites per layer.

The references are independent of the hooks under test: tokens per expert come from calling the router again, the
router logits' gradient from retain_grad() on the tensor megatron's routing() receives, and the FP8 statistics of the
tokens from quantizing the layer's input with the spec.
"""

import math

import pytest
import torch

from fp8flow_megatron.megatron.telemetry import attach_routing_telemetry
from fp8flow_megatron.numerics import fp8_health, quantize_1x128
from fp8flow_megatron.ops.telemetry import monitor

from .mcore_env import moe_config, moe_layer, run_layer


@pytest.fixture
def observing():
    monitor.reset()
    monitor.enabled = True
    yield monitor
    monitor.enabled = False
    monitor.reset()


def _layer(flow: bool, layer_number: int, num_experts=8, topk=2):
    config = moe_config(flow, num_experts, topk, num_layers=8, moe_aux_loss_coeff=1e-2, moe_z_loss_coeff=1e-3)
    layer = moe_layer(config)  # num_layers: megatron tracks the aux losses per layer number
    layer.set_layer_number(layer_number)
    return layer


def _capture_routing_logits(router):
    captured = []
    original = router.routing

    def routing(logits, *args, **kwargs):
        if logits.requires_grad:
            logits.retain_grad()
            captured.append(logits)
        return original(logits, *args, **kwargs)

    router.routing = routing
    return captured


@pytest.mark.parametrize("flow", [True, False], ids=["fp8flow", "stock"])
def test_routing_statistics_match_the_router(megatron_ep1, observing, flow):
    torch.manual_seed(0)
    layer = _layer(flow, layer_number=3)
    model = torch.nn.ModuleDict({"mlp": layer})
    assert attach_routing_telemetry(model) == 1
    assert attach_routing_telemetry(model) == 1  # idempotent: no second set of hooks
    captured = _capture_routing_logits(layer.router)
    x = torch.randn(24, 1, 128)
    x[:, :, :64] *= 4.0  # skew the routing so that some experts get more tokens than others
    run_layer(layer, x)
    summary = observing.summary()

    with torch.no_grad():
        _, routing_map = layer.router(x)  # monitor still on: counts double, ratios do not change
    counts = routing_map.sum(dim=0).double()
    assert summary["layer3/dead_expert_frac"] == float((counts == 0).sum()) / counts.numel()
    assert summary["layer3/load_imbalance"] == pytest.approx(float(counts.max() / counts.mean()))
    (logits,) = captured
    assert summary["layer3/router_grad_norm"] == pytest.approx(float(logits.grad.norm()), rel=1e-6)
    assert summary["layer3/router_grad_norm"] > 0
    has_sites = any(k.startswith("underflow_frac/layer3/") for k in summary)
    assert has_sites == flow  # FP8 sites exist only where FP8-Flow quantizes


def test_fp8_sites_are_reported_per_layer(megatron_ep1, observing):
    torch.manual_seed(1)
    layers = [_layer(True, layer_number=n) for n in (1, 2)]
    x = torch.randn(16, 1, 128)
    for layer in layers:
        run_layer(layer, x)
    summary = observing.summary()
    for n in (1, 2):
        for site in ("tokens", "combine_grad", "swiglu_out", "dswiglu_out"):
            assert f"underflow_frac/layer{n}/{site}" in summary, (n, site)
            assert f"scale_exp_min/layer{n}/{site}" in summary, (n, site)
    x2d = x.view(-1, 128)
    reference = fp8_health(x2d, quantize_1x128(x2d))
    assert summary["underflow_frac/layer1/tokens"] == pytest.approx(reference["underflow_frac"])
    assert summary["saturated_frac/layer1/tokens"] == pytest.approx(reference["saturated_frac"])
    assert summary["scale_exp_max/layer1/tokens"] == math.log2(reference["scale_inv_max"])
    # pooled over the two layers: the tokens site saw the same input twice
    assert summary["underflow_frac/tokens"] == pytest.approx(reference["underflow_frac"])


def test_nothing_is_recorded_when_not_observing(megatron_ep1):
    monitor.reset()
    monitor.enabled = False
    layer = _layer(True, layer_number=1)
    attach_routing_telemetry(torch.nn.ModuleDict({"mlp": layer}))
    run_layer(layer, torch.randn(8, 1, 128))
    assert monitor.summary() == {"underflow_frac": 0.0, "saturated_frac": 0.0, "dead_expert_frac": 0.0}


def test_nonfinite_tokens_stop_with_the_layer_named(megatron_ep1, observing):
    # on a logged iteration too, the non-finite guard reports it (the telemetry only counts finite values)
    from fp8flow_megatron.ops.nonfinite import guard

    guard.reset()
    layer = _layer(True, layer_number=5)
    x = torch.randn(8, 1, 128)
    x[3, 0, 7] = float("inf")
    run_layer(layer, x)
    with pytest.raises(FloatingPointError, match="'tokens' of MoE layer5 in the forward pass of iteration 3"):
        guard.check(3)
