"""ops.telemetry.Fp8HealthMonitor: per-layer FP8 site statistics, routing statistics and their pooling (CPU)."""

import math

import pytest
import torch

from fp8flow_megatron.numerics import fp8_health, quantize_1x128
from fp8flow_megatron.ops.telemetry import Fp8HealthMonitor, split_site


@pytest.fixture
def monitor():
    m = Fp8HealthMonitor()
    m.enabled = True
    return m


@pytest.mark.parametrize("site, expected", [("layer3/tokens", ("layer3", "tokens")), ("tokens", (None, "tokens"))])
def test_split_site(site, expected):
    assert split_site(site) == expected


def _block(values):
    x = torch.zeros(1, 128)
    x[0, : len(values)] = torch.tensor(values)
    return x


def test_site_statistics_per_layer_and_pooled(monitor):
    # layer1: 10 of 11 nonzero values underflow next to a large amax; layer2: one value at the top of the range
    a = _block([1000.0] + [1e-6] * 10)
    b = _block([448.0, 1.0])
    monitor.observe("layer1/tokens", a, quantize_1x128(a))
    monitor.observe("layer2/tokens", b, quantize_1x128(b))
    s = monitor.summary()
    assert s["underflow_frac/layer1/tokens"] == pytest.approx(10 / 11)
    assert s["underflow_frac/layer2/tokens"] == 0.0
    assert s["underflow_frac/tokens"] == pytest.approx(10 / 13)  # pooled over the 13 nonzero inputs
    assert s["saturated_frac/layer2/tokens"] == pytest.approx(1 / 128)
    assert s["saturated_frac/tokens"] == pytest.approx(1 / 256)
    assert s["underflow_frac"] == pytest.approx(10 / 13)
    # power-of-two scales: 1000 -> scale_inv 4 (2^2); 448 -> scale_inv 1 (2^0)
    assert (s["scale_exp_min/layer1/tokens"], s["scale_exp_max/layer1/tokens"]) == (2.0, 2.0)
    assert (s["scale_exp_min/tokens"], s["scale_exp_max/tokens"]) == (0.0, 2.0)


def test_all_zero_blocks_carry_no_scale_exponent(monitor):
    x = torch.zeros(3, 256)
    x[1, 5] = 2.0 ** -20  # the one block (of six) that holds data
    q = quantize_1x128(x)
    monitor.observe("layer1/combine_grad", x, q)
    s = monitor.summary()
    expected = math.log2(fp8_health(x, q)["scale_inv_min"])
    assert s["scale_exp_min/layer1/combine_grad"] == s["scale_exp_max/layer1/combine_grad"] == expected
    assert expected < -20  # not the scale 1 of the five all-zero blocks
    empty = Fp8HealthMonitor()
    empty.enabled = True
    z = torch.zeros(2, 128)
    empty.observe("layer1/tokens", z, quantize_1x128(z))
    assert "scale_exp_min/layer1/tokens" not in empty.summary()


def test_routing_statistics(monitor):
    monitor.observe_routing("layer1", torch.tensor([3, 0, 1, 0]))
    monitor.observe_routing("layer1", torch.tensor([1, 0, 1, 0]))  # a second micro-batch: counts add up
    monitor.observe_routing("layer2", torch.tensor([2, 2, 2, 2]))
    g1, g2 = torch.full((4, 4), 0.5), torch.full((2, 4), 1.0)
    monitor.observe_router_grad("layer1", g1)
    monitor.observe_router_grad("layer1", g2)
    monitor.observe_router_grad("layer2", g2)
    s = monitor.summary()
    assert s["layer1/dead_expert_frac"] == 0.5 and s["layer2/dead_expert_frac"] == 0.0
    assert s["dead_expert_frac"] == pytest.approx(2 / 8)
    assert s["layer1/load_imbalance"] == pytest.approx(4 / 1.5) and s["layer2/load_imbalance"] == 1.0
    assert s["load_imbalance"] == pytest.approx(4 / 1.5)  # the worst layer
    n1 = math.sqrt(g1.square().sum() + g2.square().sum())
    assert s["layer1/router_grad_norm"] == pytest.approx(n1)
    assert s["router_grad_norm"] == pytest.approx(math.sqrt(n1**2 + g2.square().sum()))


def test_layers_are_ordered_by_number(monitor):
    for layer in ("layer10", "layer2", "layer1"):
        monitor.observe_routing(layer, torch.tensor([1, 1]))
    assert [k for k in monitor.summary() if k.endswith("/dead_expert_frac")] == [
        "layer1/dead_expert_frac", "layer2/dead_expert_frac", "layer10/dead_expert_frac"]


def test_disabled_monitor_records_nothing():
    m = Fp8HealthMonitor()
    x = _block([1.0])
    m.observe("layer1/tokens", x, quantize_1x128(x))
    m.observe_routing("layer1", torch.tensor([1, 0]))
    m.observe_router_grad("layer1", torch.ones(2, 2))
    assert m.summary() == {"underflow_frac": 0.0, "saturated_frac": 0.0, "dead_expert_frac": 0.0}


def test_nonfinite_input_is_left_to_the_guard(monitor):
    # the non-finite guard (ops/nonfinite.py) reports it at the end of the step on every rank; raising here, inside one
    # rank's forward/backward, would leave the other ranks waiting in a collective. The statistics count finite values.
    x = _block([1.0, 2.0 ** -20, float("nan")])
    monitor.observe("layer4/dswiglu_out", x, quantize_1x128(x))
    s = monitor.summary()
    # two finite nonzero inputs; the NaN made the block's scale 1, so 2^-20 is coded 0
    assert s["underflow_frac/layer4/dswiglu_out"] == 0.5
    assert s["saturated_frac/layer4/dswiglu_out"] == 0.0


def test_reset_clears(monitor):
    monitor.observe_routing("layer1", torch.tensor([1, 0]))
    monitor.reset()
    assert "layer1/dead_expert_frac" not in monitor.summary()
