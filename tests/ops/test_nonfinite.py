"""ops.nonfinite: the flag registry and the once-per-iteration check (message, clearing, ordering, growth, two ranks),
and the expert MLP raising its sites' flags (weights, a BF16 output gradient) on CPU."""

import pytest
import torch

from fp8flow_megatron.numerics import quantize_1x128
from fp8flow_megatron.ops.experts import fp8_flow_experts
from fp8flow_megatron.ops.fp8_tensor import Fp8FlowTensor
from fp8flow_megatron.ops.nonfinite import NonfiniteGuard, describe, guard

from ..megatron.mcore_env import spawn


@pytest.fixture
def fresh():
    return NonfiniteGuard()


def test_a_clean_check_raises_nothing(fresh):
    fresh.check(1)  # nothing registered yet: nothing to read
    fresh.flag("layer1/tokens", "forward", "cpu")
    fresh.check(2)


def test_the_error_names_layer_site_pass_and_iteration_and_the_flags_clear(fresh):
    fresh.flag("layer3/tokens", "forward", "cpu")
    fresh.flag("layer3/dswiglu_out", "backward", "cpu").fill_(1)
    with pytest.raises(FloatingPointError) as err:
        fresh.check(17)
    msg = str(err.value)
    assert "'dswiglu_out' of MoE layer3 in the backward pass of iteration 17" in msg
    assert "'tokens'" not in msg  # only the sites that saw one
    assert "--no-moe-fp8-flow" in msg and "learning rate" in msg  # what to do about it
    fresh.check(18)  # cleared


def test_sites_are_listed_in_dataflow_order(fresh):
    for site, direction in [("layer2/dswiglu_out", "backward"), ("layer1/combine_grad", "backward"),
                            ("layer2/swiglu_out", "forward"), ("layer1/fc2_weight", "forward"),
                            ("layer2/combine_grad", "backward")]:
        fresh.flag(site, direction, "cpu").fill_(1)
    with pytest.raises(FloatingPointError) as err:
        fresh.check(1)
    msg = str(err.value)
    order = [describe("layer1/fc2_weight", "forward"), describe("layer2/swiglu_out", "forward"),
             describe("layer2/combine_grad", "backward"), describe("layer2/dswiglu_out", "backward"),
             describe("layer1/combine_grad", "backward")]
    positions = [msg.index(d) for d in order]
    assert positions == sorted(positions), msg
    assert "reached the FP8 quantizer at " + order[0] in msg  # the earliest is the one named first


def test_an_evaluation_is_named_as_such(fresh):
    fresh.flag("layer1/tokens", "forward", "cpu").fill_(1)
    with pytest.raises(FloatingPointError, match="'tokens' of MoE layer1 in the forward pass of the evaluation after "
                                                 "iteration 50"):
        fresh.check(50, phase="evaluation")


def test_a_site_without_a_layer(fresh):
    fresh.flag("tokens", "forward", "cpu").fill_(1)
    with pytest.raises(FloatingPointError, match="at 'tokens' in the forward pass of iteration 1"):
        fresh.check(1)


def test_flags_survive_the_buffer_growing(fresh):
    first = fresh.flag("layer0/tokens", "forward", "cpu")
    first.fill_(1)
    for i in range(1, 600):  # past the initial capacity, twice
        fresh.flag(f"layer{i}/tokens", "forward", "cpu")
    fresh.flag("layer599/swiglu_out", "forward", "cpu").fill_(1)
    with pytest.raises(FloatingPointError) as err:
        fresh.check(1)
    assert "MoE layer0 in the forward" in str(err.value) and "MoE layer599 in the forward" in str(err.value)
    assert fresh.flag("layer0/tokens", "forward", "cpu") is not first  # a view of the new buffer


def test_the_same_slot_is_handed_out_again(fresh):
    a = fresh.flag("layer1/tokens", "forward", "cpu")
    assert fresh.flag("layer1/tokens", "forward", "cpu") is a
    assert fresh.flag("layer1/tokens", "backward", "cpu") is not a
    with pytest.raises(ValueError, match="direction"):
        fresh.flag("layer1/tokens", "sideways", "cpu")


def test_a_disabled_guard_hands_out_no_flag(fresh, monkeypatch):
    fresh.enabled = False
    assert fresh.flag("layer1/tokens", "forward", "cpu") is None
    monkeypatch.setenv("FP8FLOW_NONFINITE_GUARD", "0")
    assert NonfiniteGuard().enabled is False
    monkeypatch.setenv("FP8FLOW_NONFINITE_GUARD", "1")
    assert NonfiniteGuard().enabled is True


def test_a_local_check_needs_no_collective(fresh):
    fresh.flag("layer4/combine_grad", "backward", "cpu").fill_(1)
    with pytest.raises(FloatingPointError, match="'combine_grad' of MoE layer4 in the backward pass of iteration 2"):
        fresh.check(2, collective=False)


def _two_ranks(rank, world_size, port):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    g = NonfiniteGuard()
    if rank == 1:  # rank 0 quantizes nothing at all: it must still take part in the check
        g.flag("layer1/tokens", "forward", "cpu")
    g.check(1)
    if rank == 1:
        g.flag("layer2/dswiglu_out", "backward", "cpu").fill_(1)
    try:
        g.check(2)
        message = None
    except FloatingPointError as e:
        message = str(e)
    g.check(3)  # every rank cleared, both clean again
    return message


def test_every_rank_raises_together_and_names_where():
    messages = spawn(_two_ranks, 2)
    assert "'dswiglu_out' of MoE layer2 in the backward pass of iteration 2 on rank 1" in messages[1]
    assert messages[0] is not None and "on rank 1 during iteration 2" in messages[0], messages[0]


# ------------------------------------------------------------------------------------- the expert MLP's own sites
def _experts_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = Fp8FlowTensor(quantize_1x128(torch.randn(32, 128, generator=g)), torch.float32)
    probs = torch.rand(32, generator=g).requires_grad_()
    w1 = [(torch.randn(256, 128, generator=g) * 0.05).requires_grad_() for _ in range(2)]
    w2 = [(torch.randn(128, 128, generator=g) * 0.05).requires_grad_() for _ in range(2)]
    return x, probs, w1, w2


@pytest.fixture
def global_guard():
    guard.reset()
    yield guard
    guard.reset()


@pytest.mark.parametrize("value", [float("inf"), float("nan")], ids=["inf", "nan"])
@pytest.mark.parametrize("linear", ["fc1", "fc2"])
def test_an_expert_weight_is_flagged_when_quantized(global_guard, linear, value):
    x, probs, w1, w2 = _experts_inputs()
    with torch.no_grad():
        (w1 if linear == "fc1" else w2)[1][5, 7] = value
    fp8_flow_experts(x, probs, [16, 16], w1, w2, telemetry_site_prefix="layer7/")
    with pytest.raises(FloatingPointError, match=f"at '{linear}_weight' of MoE layer7 in the forward pass of iteration 4"):
        global_guard.check(4)


@pytest.mark.parametrize("recompute", [False, True])
def test_a_bf16_output_gradient_is_flagged(global_guard, recompute):
    x, probs, w1, w2 = _experts_inputs(1)
    y = fp8_flow_experts(x, probs, [16, 16], w1, w2, recompute=recompute, telemetry_site_prefix="layer2/")
    global_guard.check(1)  # the forward was clean
    grad = torch.randn_like(y)
    grad[3, 5] = float("-inf")
    y.backward(grad)
    with pytest.raises(FloatingPointError, match="at 'expert_out_grad' of MoE layer2 in the backward pass of iteration 2"):
        global_guard.check(2)


def test_clean_experts_raise_nothing(global_guard):
    x, probs, w1, w2 = _experts_inputs(2)
    y = fp8_flow_experts(x, probs, [16, 16], w1, w2, recompute=True, telemetry_site_prefix="layer1/")
    y.backward(torch.randn_like(y))
    global_guard.check(1)
