"""The non-finite guard end to end on CPU: an inf or NaN injected at each FP8-Flow quantization site of a megatron MoE
layer, on an iteration that is not logged (telemetry off), stops the step's check with an error naming layer, site,
pass and iteration; the iterations before and after it raise nothing. Also Megatron-LM's training loop hook
(megatron/step_check.py) against a stand-in for megatron.training.training, and the trainer itself on two ranks."""

import os
import sys
import types

import pytest
import torch

from fp8flow_megatron.ops.nonfinite import guard
from fp8flow_megatron.ops.telemetry import monitor
from fp8flow_megatron.train import DEFAULT_CONFIG

from .mcore_env import moe_config, moe_layer, spawn
from .nonfinite_sites import SITES, VALUES, expected_message, step

LAYER = 3


def _layer(recompute=False, sync_free=True):
    torch.manual_seed(0)
    cfg = moe_config(True, 4, 2, num_layers=4)
    cfg.moe_expert_recompute = recompute
    layer = moe_layer(cfg)
    layer.set_layer_number(LAYER)
    # EP=1 with the Triton engine (the CPU default): the sync-free dispatch (device row maps, RowGroups)
    assert layer.token_dispatcher.sync_free
    layer.token_dispatcher.sync_free = sync_free
    return layer


@pytest.mark.parametrize("logged", [False, True], ids=["not_logged", "logged"])
@pytest.mark.parametrize("value", list(VALUES))
@pytest.mark.parametrize("site", list(SITES))
def test_each_site_stops_the_step_naming_it(megatron_ep1, clean_guard, site, value, logged):
    layer = _layer()
    x = torch.randn(16, 1, 128)
    monitor.enabled = logged
    try:
        step(layer, x)
        clean_guard.check(1)  # a clean iteration raises nothing
        step(layer, x, site, VALUES[value])
        with pytest.raises(FloatingPointError) as err:
            clean_guard.check(2)
        assert expected_message(site, LAYER, 2) in str(err.value), str(err.value)
        step(layer, x)
        clean_guard.check(3)  # the flags were cleared, and the clean iteration after it raises nothing
    finally:
        monitor.enabled = False
        monitor.reset()


@pytest.mark.parametrize("site", list(SITES))
def test_host_count_dispatch_keeps_the_sites(megatron_ep1, clean_guard, site):
    # the other EP=1 layout (counts read on the host, exact buffer): the same sites, the same error
    layer = _layer(sync_free=False)
    x = torch.randn(16, 1, 128)
    step(layer, x)
    clean_guard.check(1)
    step(layer, x, site, float("nan"))
    with pytest.raises(FloatingPointError) as err:
        clean_guard.check(2)
    assert expected_message(site, LAYER, 2) in str(err.value), str(err.value)


@pytest.mark.parametrize("site", ["swiglu_out", "dswiglu_out"])
def test_expert_recompute_keeps_the_sites(megatron_ep1, clean_guard, site):
    layer = _layer(recompute=True)
    x = torch.randn(16, 1, 128)
    step(layer, x, site, float("nan"))
    with pytest.raises(FloatingPointError) as err:
        clean_guard.check(5)
    assert expected_message(site, LAYER, 5) in str(err.value), str(err.value)


def test_several_micro_batches_are_covered_by_one_check(megatron_ep1, clean_guard):
    layer = _layer()
    x = torch.randn(16, 1, 128)
    step(layer, x)
    step(layer, x, "combine_grad", float("inf"))  # the second micro-batch of the iteration
    step(layer, x)
    with pytest.raises(FloatingPointError, match="'combine_grad' of MoE layer3 in the backward pass of iteration 9"):
        clean_guard.check(9)


# ----------------------------------------------------------------------------------- Megatron-LM's training loop
@pytest.fixture
def fake_megatron_lm(monkeypatch):
    """A stand-in for megatron.training.training with train_step / evaluate_and_print_results, as core_v0.16.1 has
    them (called by module-global name from train())."""
    training = types.ModuleType("megatron.training.training")
    calls = []

    def train_step(forward_step_func, data_iterator, model, optimizer, opt_param_scheduler, config, fbf, iteration=None):
        calls.append(("train_step", iteration))
        if getattr(training, "fail_with", None):
            raise training.fail_with
        return "step result"

    def evaluate_and_print_results(prefix, forward_step_func, data_iterator, model, iteration, *args, **kwargs):
        calls.append(("evaluate", iteration))

    training.train_step, training.evaluate_and_print_results, training.calls = train_step, evaluate_and_print_results, calls
    monkeypatch.setitem(sys.modules, "megatron.training.training", training)
    return training


def test_megatron_lm_train_step_ends_with_the_check(clean_guard, fake_megatron_lm):
    from fp8flow_megatron.megatron.step_check import install_megatron_lm_step_check

    assert install_megatron_lm_step_check() is True
    assert install_megatron_lm_step_check() is False  # idempotent
    t = fake_megatron_lm
    assert t.train_step(*[None] * 7, iteration=0) == "step result"  # clean
    guard.flag("layer2/swiglu_out", "forward", "cpu").fill_(1)
    with pytest.raises(FloatingPointError, match="'swiglu_out' of MoE layer2 in the forward pass of iteration 5"):
        t.train_step(*[None] * 7, iteration=4)  # 0-based, as train() passes it; logged as 5
    guard.flag("layer1/tokens", "forward", "cpu").fill_(1)
    with pytest.raises(FloatingPointError, match="the evaluation after iteration 6"):
        t.evaluate_and_print_results("valid", None, None, None, 6, None, None)
    assert t.calls == [("train_step", 0), ("train_step", 4), ("evaluate", 6)]


def test_megatron_lm_own_nan_check_gets_the_site_named(clean_guard, fake_megatron_lm):
    from fp8flow_megatron.megatron.step_check import install_megatron_lm_step_check

    install_megatron_lm_step_check()
    t = fake_megatron_lm
    t.fail_with = RuntimeError("Rank 0, node x, device 0, iteration -1: Unexpected result nan")  # validate_result's
    guard.flag("layer1/dswiglu_out", "backward", "cpu").fill_(1)
    with pytest.raises(FloatingPointError, match="'dswiglu_out' of MoE layer1 in the backward pass of iteration 3") as err:
        t.train_step(*[None] * 7, iteration=2)
    assert isinstance(err.value.__cause__, RuntimeError)
    with pytest.raises(RuntimeError, match="Unexpected result nan"):  # nothing flagged: Megatron-LM's error as it was
        t.train_step(*[None] * 7, iteration=3)


def test_install_fp8flow_spec_installs_the_megatron_lm_check(fake_megatron_lm):
    from fp8flow_megatron.megatron import install_fp8flow_spec
    from fp8flow_megatron.megatron.step_check import _MARKER

    install_fp8flow_spec()
    assert getattr(fake_megatron_lm.train_step, _MARKER, False)


# --------------------------------------------------------------------------------------------------- the trainer
TRAIN_ARGS = ["--config", str(DEFAULT_CONFIG), "--num-layers", "2", "--seq-length", "64", "--max-position-embeddings",
              "64", "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "3", "--lr-warmup-iters", "1", "--log-interval",
              "100", "--eval-interval", "1000", "--eval-iters", "1"]


def _trainer_worker(rank, world_size, port, tmp):
    """train.main with a NaN injected into layer 1's swiglu_out on rank 1 during iteration 2 (not a logged one: the
    log interval is 100 and the last iteration is 3). Returns (iterations finished, the error's message)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size))
    from fp8flow_megatron import train
    from fp8flow_megatron.ops import experts

    original_step, original_for, now = train.train_step, experts.backend_for, {}

    def train_step(args, schedule, model, optimizer, scheduler, dataset, step_index, device):
        now["iteration"] = step_index + 1
        return original_step(args, schedule, model, optimizer, scheduler, dataset, step_index, device)

    def backend_for(device):
        b = original_for(device)
        if rank != 1 or now.get("iteration") != 2:
            return b
        quantize = b.weighted_swiglu_quant

        def poisoned(fc1_out, probs, flag=None):
            fc1_out = fc1_out.clone()
            fc1_out[0, 0] = float("nan")
            return quantize(fc1_out, probs, flag)

        return types.SimpleNamespace(**{**vars(b), "weighted_swiglu_quant": poisoned})

    train.train_step, experts.backend_for = train_step, backend_for
    try:
        train.main(TRAIN_ARGS + ["--output-dir", f"{tmp}/run{rank}", "--data-cache-path", f"{tmp}/cache"])
    except FloatingPointError as e:
        return now["iteration"], str(e)
    return now.get("iteration"), None


@pytest.mark.slow
def test_the_trainer_stops_every_rank_at_the_iteration_naming_the_site(tmp_path):
    results = spawn(_trainer_worker, 2, str(tmp_path))
    (it0, msg0), (it1, msg1) = results[0], results[1]
    assert it0 == it1 == 2
    # the FP8 site, not "training loss is nan": the guard's check comes before the loss check
    assert msg1 is not None and expected_message("swiglu_out", 1, 2) + " on rank 1" in msg1, msg1
    assert msg0 is not None and "on rank 1 during iteration 2" in msg0, msg0
