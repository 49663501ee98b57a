"""CUDA-graph capture of a differentiable function's forward and backward, replayed under autograd.

    graphed = CapturedFwdBwd(fn, params, clone_param_grads=True)
    graphed.capture(*sample_inputs)          # warm-up on a side stream, then one forward and one backward graph
    out = graphed(*inputs)                   # autograd op: forward replays the forward graph, backward the backward one

What torch.cuda.make_graphed_callables does, with the differences a training layer needs:
- Inputs are copied into static input buffers at each call; `params` (the tensors fn reads by closure: weights) are
  static by identity and never copied. Their gradients leave the backward graph as the layer computed them: returned
  to autograd (cloned when clone_param_grads, because the next replay overwrites the graph's buffers and autograd may
  adopt a returned tensor as `.grad`), or -- megatron's gradient_accumulation_fusion -- already accumulated into
  `main_grad` by a kernel inside the graph, with the static zero dummies returned uncloned (clone_param_grads=False).
- Outputs and input gradients are cloned out of the graph's pool: a caller may hold the previous micro-batch's output
  while the next replay runs.
- The warm-up backward runs with ZERO output gradients, so a gradient accumulated inside fn (main_grad += dW) is left
  as it was (x + 0 == x in fp32; only a -0.0 becomes +0.0): capturing inside a training step does not disturb it.
  Capture itself launches nothing.
- Device tables that kernels/_tables.py hands out during warm-up and capture (addresses of main_grads, weights) are
  kept alive by the graph: it reads them by address at every replay.

Contract for fn: no device -> host read and no host-dependent control flow on device values (a sync raises during
capture: "operation not permitted when stream is capturing"); every Python side effect (an attribute set in a
backward, a counter) happens once at capture, not at replay -- the caller redoes those through `after_backward`.
Per-call work that must stay eager (weight quantization into persistent buffers) is the caller's, before the call.
Between a forward replay and its backward replay the graph's saved activations live in its pool, so calls must
alternate forward, backward, forward, backward (megatron's schedule without pipelining does; interleaved pipeline
schedules do not, and are refused by the caller).
"""

from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple

import torch

from ..kernels._tables import retain_tables


class CapturedFwdBwd:
    """One captured forward graph + backward graph of fn(*inputs) -> tensor or tuple of tensors.

    fn:        the function; reads `params` by closure.
    params:    tensors that fn differentiates with respect to without receiving them as inputs (weights).
    clone_param_grads: see the module docstring.
    after_backward: called after each backward replay (eager Python side effects of fn's backward).
    warmup:    warm-up fwd+bwd iterations on a side stream before capture (lazy CUDA state, allocator pools).
    """

    def __init__(
        self,
        fn: Callable,
        params: Sequence[torch.Tensor],
        *,
        clone_param_grads: bool = True,
        after_backward: Optional[Callable[[], None]] = None,
        warmup: int = 1,
    ) -> None:
        self.fn = fn
        self.params = list(params)
        self.clone_param_grads = clone_param_grads
        self.after_backward = after_backward
        self.warmup = warmup
        self.fwd_graph: Optional[torch.cuda.CUDAGraph] = None
        self.bwd_graph: Optional[torch.cuda.CUDAGraph] = None
        self.num_replays = 0

    # ------------------------------------------------------------------------------------------------- capture
    def capture(self, *inputs: torch.Tensor) -> None:
        """Warm up and capture on these inputs (their values matter only for the warm-up: capture runs nothing)."""
        self.static_inputs = [x.detach().clone().requires_grad_(x.requires_grad) for x in inputs]
        self._grad_inputs = [i for i, x in enumerate(self.static_inputs) if x.requires_grad]
        self._grad_params = [i for i, p in enumerate(self.params) if p.requires_grad]
        targets = [self.static_inputs[i] for i in self._grad_inputs] + [self.params[i] for i in self._grad_params]
        with retain_tables() as tables:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(self.warmup):
                    outs = self._as_tuple(self.fn(*self.static_inputs))
                    diff = [o for o in outs if o.requires_grad]
                    torch.autograd.grad(diff, targets, grad_outputs=[torch.zeros_like(o) for o in diff], allow_unused=True)
                    del outs, diff
            torch.cuda.current_stream().wait_stream(side)

            self.fwd_graph = torch.cuda.CUDAGraph()
            # thread_local: another thread's CUDA calls (NCCL's proxy, an async param all-gather's host side) must
            # not invalidate the capture; only this thread's unsafe calls are errors
            with torch.cuda.graph(self.fwd_graph, capture_error_mode="thread_local"):
                outs = self._as_tuple(self.fn(*self.static_inputs))
            self.static_outputs = [o.detach() for o in outs]
            self._diff_outputs = [i for i, o in enumerate(outs) if o.requires_grad]
            # allocated outside the graph (as make_graphed_callables): the caller's gradients are copied in
            self.static_grad_outputs = [torch.empty_like(outs[i]) for i in self._diff_outputs]
            self.bwd_graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.bwd_graph, pool=self.fwd_graph.pool(), capture_error_mode="thread_local"):
                grads = torch.autograd.grad(
                    [outs[i] for i in self._diff_outputs], targets, grad_outputs=self.static_grad_outputs,
                    allow_unused=True,
                )
            del outs
        self.static_grads = [None if g is None else g.detach() for g in grads]
        self._tables = tables
        self.num_replays = 0

    @staticmethod
    def _as_tuple(out) -> Tuple[torch.Tensor, ...]:
        return tuple(out) if isinstance(out, (tuple, list)) else (out,)

    # -------------------------------------------------------------------------------------------------- replay
    def __call__(self, *inputs: torch.Tensor):
        if self.fwd_graph is None:
            raise RuntimeError("CapturedFwdBwd: call capture(*inputs) before replaying")
        outs = _Replay.apply(self, len(inputs), *inputs, *self.params)
        return outs[0] if len(outs) == 1 else outs

    def _replay_forward(self, inputs: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        for static, x in zip(self.static_inputs, inputs):
            if static.data_ptr() != x.data_ptr():
                static.detach().copy_(x)
        self.fwd_graph.replay()
        self.num_replays += 1
        return [o.clone() for o in self.static_outputs]

    def _replay_backward(self, grad_outputs) -> Tuple[List[Optional[torch.Tensor]], List[Optional[torch.Tensor]]]:
        for static, i in zip(self.static_grad_outputs, self._diff_outputs):
            g = grad_outputs[i]
            if g is None:
                static.zero_()
            else:
                static.copy_(g)
        self.bwd_graph.replay()
        if self.after_backward is not None:
            self.after_backward()
        n = len(self._grad_inputs)
        input_grads = [None if g is None else g.clone() for g in self.static_grads[:n]]
        param_grads = self.static_grads[n:]
        if self.clone_param_grads:
            param_grads = [None if g is None else g.clone() for g in param_grads]
        return input_grads, list(param_grads)


class _Replay(torch.autograd.Function):
    @staticmethod
    def forward(ctx, graphed: CapturedFwdBwd, num_inputs: int, *tensors):
        ctx.graphed, ctx.num_inputs = graphed, num_inputs
        outs = graphed._replay_forward(tensors[:num_inputs])
        non_diff = [o for i, o in enumerate(outs) if i not in graphed._diff_outputs]
        if non_diff:
            ctx.mark_non_differentiable(*non_diff)
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grad_outputs):
        graphed = ctx.graphed
        input_grads, param_grads = graphed._replay_backward(grad_outputs)
        grads: List[Optional[torch.Tensor]] = [None] * (ctx.num_inputs + len(graphed.params))
        for g, i in zip(input_grads, graphed._grad_inputs):
            grads[i] = g
        for g, i in zip(param_grads, graphed._grad_params):
            grads[ctx.num_inputs + i] = g
        return (None, None, *grads)
