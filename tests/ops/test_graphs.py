"""ops/graphs.py's autograd plumbing on CPU: a CapturedFwdBwd whose two "graphs" are stand-ins that recompute into
the static buffers (capture itself needs CUDA: tests/ops/test_gpu_cuda_graph_layer.py). Checks which gradient goes
where (inputs, params, a non-differentiable input), that outputs and gradients are copies of the static buffers, the
zeroed gradient of an unused output, clone_param_grads=False, and after_backward."""

import torch

from fp8flow_megatron.ops.graphs import CapturedFwdBwd


class _Recompute:
    def __init__(self, fn):
        self.fn = fn

    def replay(self):
        self.fn()


def _stand_in(w, clone_param_grads=True, after_backward=None):
    """y = (x * mask) @ w, z = x.sum(1) (two outputs), with the static buffers a capture of that would leave."""
    g = CapturedFwdBwd(None, [w], clone_param_grads=clone_param_grads, after_backward=after_backward)
    x_s, m_s = torch.zeros(4, 3, requires_grad=True), torch.zeros(4, 3)
    g.static_inputs, g._grad_inputs, g._grad_params = [x_s, m_s], [0], [0]
    g.static_outputs = [torch.zeros(4, 2), torch.zeros(4)]
    g._diff_outputs = [0, 1]
    g.static_grad_outputs = [torch.zeros(4, 2), torch.zeros(4)]
    g.static_grads = [torch.zeros(4, 3), torch.zeros(3, 2)]

    def forward():
        with torch.no_grad():
            g.static_outputs[0].copy_((x_s * m_s) @ w)
            g.static_outputs[1].copy_(x_s.sum(1))

    def backward():
        gy, gz = g.static_grad_outputs
        with torch.no_grad():
            g.static_grads[0].copy_((gy @ w.t()) * m_s + gz[:, None])
            g.static_grads[1].copy_((x_s * m_s).t() @ gy)

    g.fwd_graph, g.bwd_graph = _Recompute(forward), _Recompute(backward)
    return g


def test_gradients_reach_inputs_and_params_as_eager():
    torch.manual_seed(0)
    w = torch.randn(3, 2, requires_grad=True)
    calls = []
    graphed = _stand_in(w, after_backward=lambda: calls.append(1))
    w_ref = w.detach().clone().requires_grad_()
    for step in range(2):
        x, mask = torch.randn(4, 3, requires_grad=True), (torch.rand(4, 3) > 0.3).float()
        y, z = graphed(x, mask)
        assert y.data_ptr() != graphed.static_outputs[0].data_ptr()  # a copy: the next replay may overwrite
        (y.square().sum() + (z * 3).sum()).backward()
        xr = x.detach().clone().requires_grad_()
        yr, zr = (xr * mask) @ w_ref, xr.sum(1)
        (yr.square().sum() + (zr * 3).sum()).backward()
        assert torch.allclose(y, yr) and torch.allclose(z, zr)
        assert torch.allclose(x.grad, xr.grad) and x.grad.data_ptr() != graphed.static_grads[0].data_ptr()
        assert torch.allclose(w.grad, w_ref.grad), step  # accumulated over both steps, like eager
    assert calls == [1, 1]


def test_unused_output_gets_a_zero_gradient_and_param_grads_can_pass_through():
    w = torch.randn(3, 2, requires_grad=True)
    graphed = _stand_in(w, clone_param_grads=False)
    x, mask = torch.randn(4, 3, requires_grad=True), torch.ones(4, 3)
    y, _ = graphed(x, mask)
    y.sum().backward()
    assert torch.equal(graphed.static_grad_outputs[1], torch.zeros(4))  # z unused: its gradient zeroed, not stale
    assert torch.allclose(x.grad, torch.ones(4, 2) @ w.detach().t())
    assert torch.equal(w.grad, graphed.static_grads[1])
