"""Helpers for CPU tests that build megatron-core modules: gloo process groups, configs, stock vs FP8-Flow MoE layers."""

import io
import queue
import socket
import traceback

import torch
import torch.distributed as dist
import torch.nn.functional as F


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_megatron(rank: int, world_size: int, port: int, ep: int = 1, seed: int = 1234):
    from fp8flow_megatron.megatron.cpu_shims import install_cpu_shims

    install_cpu_shims()
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    if not dist.is_initialized():
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(1, 1, expert_model_parallel_size=ep)
    model_parallel_cuda_manual_seed(seed)


def teardown():
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def moe_config(flow: bool, num_experts: int = 4, topk: int = 2, hidden: int = 128, ffn: int = 128, **overrides):
    from megatron.core.transformer.transformer_config import TransformerConfig

    kw = dict(
        num_layers=1, hidden_size=hidden, num_attention_heads=4, ffn_hidden_size=2 * hidden,
        num_moe_experts=num_experts, moe_router_topk=topk, moe_ffn_hidden_size=ffn,
        moe_token_dispatcher_type="alltoall", gated_linear_unit=True, activation_func=F.silu,
        bias_activation_fusion=False, add_bias_linear=False, normalization="RMSNorm", use_cpu_initialization=True,
        params_dtype=torch.float32, moe_router_dtype="fp32", moe_grouped_gemm=flow,  # stock CPU experts: SequentialMLP
        hidden_dropout=0.0, attention_dropout=0.0, moe_aux_loss_coeff=0.0,
    )
    kw.update(overrides)
    cfg = TransformerConfig(**kw)
    cfg.moe_fp8_flow = flow
    cfg.moe_expert_recompute = False
    return cfg


def moe_layer(config):

    from fp8flow_megatron.megatron import get_fp8flow_decoder_block_spec
    from fp8flow_megatron.megatron.compat import build_mlp

    spec = get_fp8flow_decoder_block_spec(config, use_transformer_engine=False, normalization="RMSNorm")
    return build_mlp(spec.layer_specs[0].submodules.mlp, config)


def copy_stock_weights(stock, flow):
    """SequentialMLP (local experts) -> FP8FlowGroupedMLP (weight{i}); router too."""
    with torch.no_grad():
        flow.router.weight.copy_(stock.router.weight)
        for i, ex in enumerate(stock.experts.local_experts):
            getattr(flow.experts.linear_fc1, f"weight{i}").copy_(ex.linear_fc1.weight)
            getattr(flow.experts.linear_fc2, f"weight{i}").copy_(ex.linear_fc2.weight)


def run_layer(layer, x, grad_weight=None):
    """Forward + backward with a fixed, non-uniform output gradient; returns output, input grad, router grad."""
    xi = x.clone().requires_grad_()
    y, _ = layer(xi)
    g = grad_weight if grad_weight is not None else torch.linspace(-1, 1, y.numel(), device=y.device).view_as(y)
    (y * g).sum().backward()
    return y.detach(), xi.grad.detach(), layer.router.weight.grad.detach().clone()


def rel(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


def spawn(fn, world_size: int, *args, mp_context=None):
    """Run fn(rank, world_size, port, *args) in world_size processes; re-raise the first failure with its traceback.
    mp_context: a multiprocessing context (default: spawn), e.g. a forkserver that preloaded the heavy imports."""
    import torch.multiprocessing as mp

    port = free_port()
    ctx = mp_context or mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(fn, r, world_size, port, q, args)) for r in range(world_size)]
    for p in procs:
        p.start()
    results = []
    while len(results) < len(procs):
        try:
            results.append(q.get(timeout=5))
        except queue.Empty:
            # a rank that died without reporting (a segfault, an abort in CUDA) would otherwise block this forever
            dead = [(r, p.exitcode) for r, p in enumerate(procs) if p.exitcode not in (None, 0)]
            if dead and not any(r[0] == "error" for r in results):
                for p in procs:
                    p.kill()
                raise AssertionError(f"rank {dead[0][0]} died with exit code {dead[0][1]} before reporting a result")
            if dead:
                break
    for p in procs:
        p.join(timeout=120)
    errors = [r for r in results if r[0] == "error"]
    if errors:
        raise AssertionError(f"rank {errors[0][1]} failed:\n{errors[0][2]}")
    return {r[1]: torch.load(io.BytesIO(r[2]), weights_only=False) for r in results}


def _worker(fn, rank, world_size, port, q, args):
    try:
        out = fn(rank, world_size, port, *args)
        # as bytes: a tensor put on the queue as itself travels as a file descriptor the parent fetches from this
        # process later, which fails ("Connection reset by peer") when this process has exited by then
        buf = io.BytesIO()
        torch.save(out, buf)
        q.put(("ok", rank, buf.getvalue()))
    except BaseException:
        q.put(("error", rank, traceback.format_exc()))
    finally:
        try:
            teardown()
        except Exception:
            pass
