"""Minimal shims that let megatron-core 0.16.1 build and run a GPT MoE model on CPU (gloo), for tests and the
CPU emulation path. Each one replaces a CUDA-only call that has a direct CPU meaning:

1. RNG: megatron's CUDA RNG tracker (model_parallel_cuda_manual_seed) uses the CUDA generator -> the CPU generator.
2. CUDA streams/events/sync (the alltoall dispatcher's D2H side stream) -> no-op stand-ins.
3. torch.cuda.current_device() (RoPE, attention buffers) -> "cpu".
4. moe_utils binds te_general_gemm / fused_* only when TE imports (a megatron-core 0.16.1 bug) -> bind them to None.
5. Split sizes for all_to_all: on GPU megatron hands numpy arrays to all_to_all_single; on CPU it would hand tensors,
   which gloo rejects -> convert the same way.
6. The pipeline schedules count tokens in torch.zeros(..., device="cuda") -> the schedules module sees a torch whose
   zeros() puts device="cuda" on the CPU (its only CUDA allocation; the model's ops run untouched).
Installed only when CUDA is unavailable, idempotent, and logged.

Loading a distributed-optimizer checkpoint without apex/TE (torch's Adam keeps a per-parameter 'step'; apex's and TE's
fused Adam keep it per group), two megatron-core 0.16.1 gaps in optimizer/distrib_optimizer.py:
  a. DistributedOptimizer.state_dict() asserts `len(steps) == 1` over the parameters' 'step', which a fresh optimizer
     has not created: the load template cannot be built. `init_torch_adam_state_for_load` creates the state megatron's
     init_state_fn would, with step 0 (the checkpoint then overwrites it).
  b. load_state_dict() sets every parameter's 'step' from the checkpoint's param groups, then
     load_parameter_state_from_dp_reshardable() copies the template's per-parameter tensors -- 'step' included, still
     0 -- over it, so Adam's bias correction restarts. `restore_torch_adam_step_after_load` sets it back from the
     loaded param groups.

megatron.core.optimizer also creates tensors with device='cuda' (loss scale, grad-norm buffers); `cuda_to_cpu()` is a
TorchFunctionMode for wrapping those calls (construction, step, state dict) without slowing the model's own ops.
"""

from __future__ import annotations

import contextlib
import logging
import types

import torch

log = logging.getLogger(__name__)
_MARKER = "_fp8flow_cpu_shims"


class _FakeEvent:
    def __init__(self, *args, **kwargs):
        pass

    def record(self, *args, **kwargs):
        return None

    def synchronize(self):
        return None

    def wait(self, *args, **kwargs):
        return None

    def query(self):
        return True


class _FakeStream:
    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, *args, **kwargs):
        return None

    def record_event(self, event=None):
        return _FakeEvent()

    def synchronize(self):
        return None

    def __eq__(self, other):
        return isinstance(other, _FakeStream)

    def __hash__(self):
        return 0


class _CudaToCpu(torch.overrides.TorchFunctionMode):
    """Rewrites device='cuda' to 'cpu' in factory calls, makes .cuda() / .to('cuda') no-ops, and reports CPU
    tensors' legacy type() string as the CUDA one (megatron asserts on it)."""

    @staticmethod
    def _is_cuda(dev) -> bool:
        return dev is not None and not isinstance(dev, (bool, torch.dtype)) and str(dev).startswith("cuda")

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if self._is_cuda(kwargs.get("device")):
            kwargs["device"] = "cpu"
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:  # clip_grads asserts 'torch.cuda.FloatTensor'
            return func(*args).replace("torch.", "torch.cuda.", 1)
        if func is torch.Tensor.to:
            args = tuple("cpu" if self._is_cuda(a) else a for a in args)
        return func(*args, **kwargs)


def cuda_to_cpu():
    """Context: device='cuda' means the CPU (for megatron.core.optimizer on a machine without CUDA)."""
    if torch.cuda.is_available():
        return contextlib.nullcontext()
    return _CudaToCpu()


class _SchedulesTorch(types.ModuleType):
    """torch as megatron.core.pipeline_parallel.schedules sees it on CPU: zeros(device="cuda") allocates on the CPU."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def zeros(*args, **kwargs):
        if _CudaToCpu._is_cuda(kwargs.get("device")):
            kwargs["device"] = "cpu"
        return torch.zeros(*args, **kwargs)


def install_cpu_shims(force: bool = False) -> bool:
    """Install the shims if CUDA is unavailable (or force). Returns True if they are (now) installed."""
    if torch.cuda.is_available() and not force:
        return False
    if getattr(torch, _MARKER, False):
        return True
    from megatron.core.pipeline_parallel import schedules
    from megatron.core.tensor_parallel import random as mp_random
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    # 1. RNG
    # (torch.manual_seed itself calls torch.cuda.manual_seed_all, which stays a no-op without CUDA: seed the CPU
    # generator directly)
    torch.cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    torch.cuda.get_rng_state = lambda *a, **k: torch.get_rng_state()
    torch.cuda.set_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    mp_random._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    mp_random._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    # 2. streams, events, synchronization
    torch.cuda.Stream = _FakeStream
    torch.cuda.Event = _FakeEvent
    torch.cuda.current_stream = lambda *a, **k: _FakeStream()
    torch.cuda.default_stream = lambda *a, **k: _FakeStream()
    torch.cuda.stream = lambda *a, **k: contextlib.nullcontext()
    torch.cuda.synchronize = lambda *a, **k: None
    # 3. device
    torch.cuda.current_device = lambda: "cpu"
    # 4. TE names moe_utils only binds when TE imports
    for name in (
        "te_general_gemm",
        "fused_compute_score_for_moe_aux_loss",
        "fused_moe_aux_loss",
        "fused_permute",
        "fused_permute_with_probs",
        "fused_sort_chunks_by_index",
        "fused_sort_chunks_by_index_with_probs",
        "fused_topk_with_score_function",
        "fused_unpermute",
    ):
        if not hasattr(moe_utils, name):
            setattr(moe_utils, name, None)
    # 5. split sizes as numpy, as on GPU
    original = token_dispatcher.maybe_move_tensor_to_cpu

    def maybe_move_tensor_to_cpu(tensor, as_numpy=False, record_stream=False):
        out = original(tensor, as_numpy=as_numpy, record_stream=False)
        if as_numpy and torch.is_tensor(out):
            out = out.numpy()
        return out

    token_dispatcher.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu
    # 6. the schedules' token counter
    schedules.torch = _SchedulesTorch("torch")
    setattr(torch, _MARKER, True)
    log.info("fp8flow: CUDA unavailable; installed megatron-core CPU shims (RNG, streams, device, TE names, splits, schedules)")
    return True


def _torch_adams_of_distributed_optimizers(optimizer):
    """The torch Adam inside each DistributedOptimizer of a (chained) megatron optimizer -- none when megatron-core
    runs apex's or TE's fused Adam, which keeps 'step' per group (see the module docstring)."""
    from megatron.core.optimizer import distrib_optimizer

    if distrib_optimizer.HAVE_APEX_OR_TE:
        return []
    return [
        opt.optimizer
        for opt in getattr(optimizer, "chained_optimizers", [optimizer])
        if isinstance(opt, distrib_optimizer.DistributedOptimizer)
    ]


def init_torch_adam_state_for_load(optimizer) -> None:
    """Give every parameter of each distributed optimizer's torch Adam the state it has after a step (zeros, step 0),
    where megatron-core runs without apex/TE (see the module docstring); a no-op elsewhere."""
    for adam in _torch_adams_of_distributed_optimizers(optimizer):
        for group in adam.param_groups:
            for p in group["params"]:
                if not adam.state[p]:
                    adam.state[p].update(exp_avg=torch.zeros_like(p.data), exp_avg_sq=torch.zeros_like(p.data), step=torch.tensor(0.0))


def restore_torch_adam_step_after_load(optimizer) -> None:
    """Every parameter's torch Adam 'step' from its loaded param group (see the module docstring); a no-op with
    apex/TE."""
    for adam in _torch_adams_of_distributed_optimizers(optimizer):
        for group in adam.param_groups:
            for p in group["params"]:
                if "step" in group and "step" in adam.state[p]:
                    adam.state[p]["step"] = torch.tensor(float(group["step"]))
