"""On the GPU: --moe-fp8-flow-cuda-graph (megatron/cuda_graph.py) replays the FP8-Flow MoE layer's dispatch + experts
+ combine from CUDA graphs, bit-identical to the eager layer.

Two layers with the same weights, one eager (flag off: the sync-free Triton layer), one graphed, run the same
training steps: each step is megatron's step signal (is_first_microbatch: the expert weights are re-quantized) and
two micro-batches of fwd+bwd with gradients accumulating, then an optimizer-like update written through `.data` (as
megatron's optimizers do: no version counter, no new address). Outputs, input grads, router grads (the aux loss and
z-loss gradients join the graph's probs gradient) and expert weight gradients -- `.grad`, or fp32 `main_grad` with
megatron's gradient_accumulation_fusion -- must be equal bit for bit at every step. The graph is captured at the
second training call and replayed after that; an evaluation forward runs eager; a new token count runs eager once,
then gets its own graph.
"""

import pytest
import torch

pytestmark = pytest.mark.gpu

STEPS = 3
MICROBATCHES = 2


def _layer(graphed: bool, num_experts, topk, hidden, ffn, shared, aux_losses=True):
    from tests.megatron.mcore_env import moe_config, moe_layer

    extra = {"moe_shared_expert_intermediate_size": 2 * ffn} if shared else {}
    if aux_losses:  # megatron's aux loss and z-loss: eager, their gradients join the graph's probs gradient
        extra.update(moe_aux_loss_coeff=1e-2, moe_z_loss_coeff=1e-3)
    cfg = moe_config(True, num_experts=num_experts, topk=topk, hidden=hidden, ffn=ffn, params_dtype=torch.bfloat16,
                     **extra)
    cfg.moe_fp8_flow_gemm = "triton"
    cfg.moe_fp8_flow_cuda_graph = graphed
    return moe_layer(cfg).cuda()


def _use_main_grads(layer):
    layer.experts.fuse_wgrad_accumulation = True
    for p in layer.experts.parameters():
        p.main_grad = torch.zeros(p.shape, dtype=torch.float32, device=p.device)


def _micro(layer, x, g):
    xi = x.clone().requires_grad_()
    y, _ = layer(xi)
    (y.float() * g).sum().backward()
    return y.detach().clone(), xi.grad.detach().clone()


def _grads(layer, fuse):
    out = {}
    for name, p in layer.named_parameters():
        grad = p.main_grad if fuse and hasattr(p, "main_grad") else p.grad
        out[name] = None if grad is None else grad.detach().clone()
    return out


def _step_end(layer, fuse, step):
    """An optimizer-like update through .data, then zeroed gradients (as megatron's zero_grad_buffer)."""
    with torch.no_grad():
        for name, p in layer.named_parameters():
            grad = p.main_grad if fuse and hasattr(p, "main_grad") else p.grad
            if grad is not None:
                p.data.add_(grad.to(p.dtype), alpha=-0.05 * (step + 1))
            p.grad = None
            if fuse and hasattr(p, "main_grad"):
                p.main_grad.zero_()
                p.grad_added_to_main_grad = False


def _assert_equal(got, ref, what):
    assert got.shape == ref.shape, what
    if not torch.equal(got, ref):
        diff = (got.float() - ref.float()).abs()
        idx = tuple(int(i) for i in (diff == diff.max()).nonzero()[0])
        raise AssertionError(f"{what}: not bit-identical; max |diff| {float(diff.max()):.3e} at {idx}: "
                             f"{float(got[idx])} vs {float(ref[idx])}")


CASES = {
    # name: (experts, topk, seq (x batch 2), hidden, ffn, shared experts, fuse main_grad)
    "e8_grad": (8, 2, 96, 128, 128, False, False),
    "e64_top6_main_grad": (64, 6, 200, 256, 384, False, True),
    "e16_shared_main_grad": (16, 2, 64, 128, 256, True, True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_graphed_layer_is_bit_identical_to_eager_over_steps(megatron_gpu, clean_guard, case):
    num_experts, topk, seq, hidden, ffn, shared, fuse = CASES[case]
    torch.manual_seed(0)
    eager = _layer(False, num_experts, topk, hidden, ffn, shared)
    graphed = _layer(True, num_experts, topk, hidden, ffn, shared)
    graphed.load_state_dict(eager.state_dict())
    assert graphed.cuda_graphs is not None and graphed.experts._weight_cache.persistent
    if fuse:
        _use_main_grads(eager)
        _use_main_grads(graphed)
    gen = torch.Generator(device="cuda").manual_seed(1)
    for step in range(STEPS):
        for layer in (eager, graphed):
            layer.experts.is_first_microbatch = True  # megatron's step signal: re-quantize the expert weights
        for micro in range(MICROBATCHES):
            x = torch.randn(seq, 2, hidden, device="cuda", generator=gen).to(torch.bfloat16)
            g = torch.randn(seq, 2, hidden, device="cuda", generator=gen)
            ref, got = _micro(eager, x, g), _micro(graphed, x, g)
            _assert_equal(got[0], ref[0], f"{case} step {step} micro {micro} output")
            _assert_equal(got[1], ref[1], f"{case} step {step} micro {micro} input grad")
        ref_g, got_g = _grads(eager, fuse), _grads(graphed, fuse)
        assert ref_g.keys() == got_g.keys()
        for name, v in ref_g.items():
            assert (got_g[name] is None) == (v is None), name
            if v is not None:
                _assert_equal(got_g[name], v, f"{case} step {step} grad of {name}")
        if fuse:
            assert all(p.grad_added_to_main_grad for p in graphed.experts.parameters())
        _step_end(eager, fuse, step)
        _step_end(graphed, fuse, step)
    graphs = graphed.cuda_graphs
    assert graphs.num_captures == 1, "captured once, at the second training call"
    assert graphs.num_replays == STEPS * MICROBATCHES - 1
    assert graphed.experts._weight_cache.num_quantizations == eager.experts._weight_cache.num_quantizations
    clean_guard.check(STEPS)

    # evaluation: eager (no replay), same numbers
    replays = graphs.num_replays
    x = torch.randn(seq, 2, hidden, device="cuda", generator=gen).to(torch.bfloat16)
    for layer in (eager, graphed):
        layer.eval()
        layer.experts.is_first_microbatch = True
    with torch.no_grad():
        _assert_equal(graphed(x)[0], eager(x)[0], f"{case} evaluation output")
    assert graphs.num_replays == replays
    for layer in (eager, graphed):
        layer.train()

    # a new token count: eager once, then captured for it (the first shape's graph is kept)
    seq2 = seq // 2 + 3
    for call in range(3):
        x = torch.randn(seq2, 2, hidden, device="cuda", generator=gen).to(torch.bfloat16)
        g = torch.randn(seq2, 2, hidden, device="cuda", generator=gen)
        ref, got = _micro(eager, x, g), _micro(graphed, x, g)
        _assert_equal(got[0], ref[0], f"{case} new shape call {call} output")
        _assert_equal(got[1], ref[1], f"{case} new shape call {call} input grad")
        assert graphs.num_captures == (1 if call == 0 else 2)
    assert graphs.num_replays == replays + 2
    # and back to the first shape: its graph replays, no capture
    x = torch.randn(seq, 2, hidden, device="cuda", generator=gen).to(torch.bfloat16)
    g = torch.randn(seq, 2, hidden, device="cuda", generator=gen)
    ref, got = _micro(eager, x, g), _micro(graphed, x, g)
    _assert_equal(got[0], ref[0], f"{case} first shape again: output")
    assert graphs.num_captures == 2 and graphs.num_replays == replays + 3


def test_replay_is_sync_free_and_reads_new_weights(megatron_gpu, clean_guard):
    """A replayed step (weights re-quantized eagerly, then the graphs) never synchronizes, and a weight written through
    .data between steps changes the graph's output exactly as it changes the eager layer's."""
    torch.manual_seed(0)
    # no aux losses: only the layer is checked for syncs here (the sync-free test's router settings)
    eager = _layer(False, 16, 2, 128, 128, False, aux_losses=False)
    graphed = _layer(True, 16, 2, 128, 128, False, aux_losses=False)
    graphed.load_state_dict(eager.state_dict())
    x = torch.randn(64, 2, 128, device="cuda").to(torch.bfloat16)
    g = torch.randn(64, 2, 128, device="cuda")
    for _ in range(2):  # eager warm-up call, then the capture
        _micro(graphed, x, g)
        _micro(eager, x, g)
    with torch.no_grad():
        for layer in (eager, graphed):
            layer.experts.linear_fc1.weight3.data.mul_(-1.5)
            layer.experts.is_first_microbatch = True
            layer.zero_grad(set_to_none=True)
    ref = _micro(eager, x, g)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = _micro(graphed, x, g)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    assert graphed.cuda_graphs.num_replays == 2
    _assert_equal(got[0], ref[0], "output after a weight update")
    _assert_equal(got[1], ref[1], "input grad after a weight update")
    _assert_equal(graphed.experts.linear_fc1.weight3.grad, eager.experts.linear_fc1.weight3.grad, "dW fc1[3]")
    clean_guard.check(1)


def test_weight_stack_kernel_quantizes_into_given_buffers():
    from fp8flow_megatron.kernels import quantize_weight_stack_triton
    from fp8flow_megatron.numerics.gemm import quantize_weight_stack

    torch.manual_seed(0)
    weights = [torch.randn(2816, 2048, device="cuda").to(torch.bfloat16) for _ in range(4)]
    first = quantize_weight_stack_triton(weights)
    new = [w * 3 for w in weights]
    got = quantize_weight_stack_triton(new, out=first)
    ref = quantize_weight_stack(new)
    assert got is first
    for a, b in zip(got, ref):
        assert torch.equal(a.data.view(torch.uint8), b.data.view(torch.uint8)) and torch.equal(a.scale_inv, b.scale_inv)
