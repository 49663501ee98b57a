"""Helpers for the non-finite guard's layer tests (CPU here, GPU in tests/ops/test_gpu_nonfinite.py): one training
step of an FP8-Flow MoE layer with an inf or NaN injected at exactly one FP8 quantization site.

How each site is reached (the quantizers themselves -- kernels on the GPU, the spec on CPU -- are never replaced):
  tokens        (forward)   the layer input
  fc1_weight, fc2_weight    one element of one expert's weight, for the step (weights are quantized at its start)
                (forward)
  swiglu_out    (forward)   the fc1 output that the fused SwiGLU + quantize receives (the backend's function is
                            wrapped to poison its input)
  combine_grad  (backward)  the layer's output gradient
  dswiglu_out   (backward)  the fc2 dgrad that the fused dSwiGLU + quantize receives (wrapped as above)
"""

import contextlib
from types import SimpleNamespace
from unittest import mock

import torch

from .mcore_env import run_layer

SITES = {
    "tokens": "forward",
    "fc1_weight": "forward",
    "fc2_weight": "forward",
    "swiglu_out": "forward",
    "combine_grad": "backward",
    "dswiglu_out": "backward",
}
VALUES = {"inf": float("inf"), "-inf": float("-inf"), "nan": float("nan")}


@contextlib.contextmanager
def _poisoned_backend(fn_name: str, arg: int, value: float):
    """ops.experts' backend with `fn_name`'s argument number `arg` poisoned at [0, 0] (a copy; the caller's tensor,
    e.g. the fc1 output saved for backward, is left alone)."""
    from fp8flow_megatron.ops import experts

    original_for = experts.backend_for

    def backend_for(device):
        b = original_for(device)
        fn = getattr(b, fn_name)

        def poisoned(*args, **kwargs):
            args = list(args)
            args[arg] = args[arg].clone()
            args[arg][0, 0] = value
            return fn(*args, **kwargs)

        return SimpleNamespace(**{**vars(b), fn_name: poisoned})

    with mock.patch.object(experts, "backend_for", backend_for):
        yield


@contextlib.contextmanager
def _poisoned_weight(layer, linear: str, value: float):
    w = getattr(getattr(layer.experts, linear), "weight1")
    with torch.no_grad():
        saved = w[3, 5].clone()
        w[3, 5] = value
    try:
        yield
    finally:
        with torch.no_grad():
            w[3, 5] = saved


def step(layer, x, site=None, value=None):
    """One training step of `layer` on x (the layer's weights requantized first, as megatron's schedule does), with
    `value` injected at `site` (None: a clean step). Returns run_layer's (output, input grad, router grad)."""
    layer.set_is_first_microbatch()
    grad = torch.linspace(-1, 1, x.numel(), device=x.device).view_as(x)
    context = contextlib.nullcontext()
    if site == "tokens":
        x = x.clone()
        x[1, 0, 3] = value
    elif site == "combine_grad":
        grad[2, 0, 5] = value
    elif site in ("fc1_weight", "fc2_weight"):
        context = _poisoned_weight(layer, "linear_" + site.split("_")[0], value)
    elif site == "swiglu_out":
        context = _poisoned_backend("weighted_swiglu_quant", 0, value)
    elif site == "dswiglu_out":
        context = _poisoned_backend("weighted_swiglu_quant_backward", 0, value)
    elif site is not None:
        raise KeyError(site)
    with context:
        return run_layer(layer, x, grad_weight=grad)


def expected_message(site: str, layer_number: int, iteration: int) -> str:
    """What the guard's error must say first: the site, its layer, its pass and the iteration."""
    return f"reached the FP8 quantizer at '{site}' of MoE layer{layer_number} in the {SITES[site]} pass of iteration {iteration}"
