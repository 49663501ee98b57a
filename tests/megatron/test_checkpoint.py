"""Distributed-checkpoint interchange: a stock MoE layer (SequentialMLP experts) and an FP8-Flow layer
(FP8FlowGroupedMLP, TEGroupedMLP layout) load each other's checkpoints, and continue with identical results."""

import torch

from .mcore_env import copy_stock_weights, init_megatron, moe_config, moe_layer, run_layer, spawn


def _save(layer, path):
    import os

    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    if dist.get_rank() == 0:
        os.makedirs(path, exist_ok=True)
    dist.barrier()
    dist_checkpointing.save(layer.sharded_state_dict(), str(path))


def _load(layer, path):
    from megatron.core import dist_checkpointing

    state = dist_checkpointing.load(layer.sharded_state_dict(), str(path))
    layer.load_state_dict(state)


def _roundtrip_worker(rank, world_size, port, tmp):
    init_megatron(rank, world_size, port, ep=world_size, seed=7)
    torch.manual_seed(3)
    stock = moe_layer(moe_config(False))
    flow = moe_layer(moe_config(True))
    x = torch.randn(12, 2, 128)
    # stock -> FP8-Flow
    _save(stock, f"{tmp}/stock")
    _load(flow, f"{tmp}/stock")
    reference = moe_layer(moe_config(True))
    copy_stock_weights(stock, reference)
    for (n, p), (_, q) in zip(flow.named_parameters(), reference.named_parameters()):
        assert torch.equal(p, q), n
    y_loaded, dx_loaded, _ = run_layer(flow, x)
    y_ref, dx_ref, _ = run_layer(reference, x)
    assert torch.equal(y_loaded, y_ref) and torch.equal(dx_loaded, dx_ref)
    # FP8-Flow -> stock (perturb first so the direction is really tested)
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(0.01)
    _save(flow, f"{tmp}/flow")
    stock2 = moe_layer(moe_config(False))
    _load(stock2, f"{tmp}/flow")
    for i, ex in enumerate(stock2.experts.local_experts):
        assert torch.equal(ex.linear_fc1.weight, getattr(flow.experts.linear_fc1, f"weight{i}"))
        assert torch.equal(ex.linear_fc2.weight, getattr(flow.experts.linear_fc2, f"weight{i}"))
    assert torch.equal(stock2.router.weight, flow.router.weight)
    return True


def test_checkpoint_interchange_ep1(tmp_path):
    assert spawn(_roundtrip_worker, 1, str(tmp_path)) == {0: True}


def test_checkpoint_interchange_ep2(tmp_path):
    assert spawn(_roundtrip_worker, 2, str(tmp_path)) == {0: True, 1: True}
