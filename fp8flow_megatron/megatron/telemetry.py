"""Routing telemetry for every MoE layer, whatever runs the experts (BF16, TE FP8 or FP8-Flow).

attach_routing_telemetry(model) hooks each megatron router (megatron.core.transformer.moe.router.Router) below
`model` so that, on the iterations the trainer logs (ops.telemetry.monitor.enabled), the monitor receives

  - the tokens each expert got in each micro-batch (the router's routing_map summed over tokens), for the
    dead-expert fraction and the load imbalance (max / mean tokens per expert), and
  - the gradient of the router logits (the output of Router.gating, before z-loss and the score function), for its
    L2 norm: FP8 underflow that starves the router shows up here first.

On other iterations each hook is one attribute test: no device work, no sync. The hooks are per module instance
(a forward hook and a wrapped `gating` bound method), not a patch of megatron's classes; attaching twice is a no-op.
"""

from __future__ import annotations

import logging

import torch

from ..ops.telemetry import monitor

log = logging.getLogger(__name__)
_MARKER = "_fp8flow_routing_telemetry"


def attach_routing_telemetry(model: torch.nn.Module) -> int:
    """Hook every megatron Router below `model`; returns how many routers are hooked (including earlier attaches)."""
    from megatron.core.transformer.moe.router import Router

    count = 0
    for index, router in enumerate(m for m in model.modules() if isinstance(m, Router)):
        count += 1
        if getattr(router, _MARKER, False):
            continue
        setattr(router, _MARKER, True)
        _hook(router, index)
    if count:
        log.info("fp8flow: routing telemetry attached to %d MoE routers", count)
    return count


def _layer_tag(router, index: int) -> str:
    # megatron sets layer_number on the router (BaseMoELayer.set_layer_number); fall back to the discovery order
    number = getattr(router, "layer_number", None)
    return f"layer{number if number is not None else index + 1}"


def _hook(router, index: int) -> None:
    gating = router.gating  # the bound method of this instance's class

    def gating_with_grad_telemetry(input):
        logits = gating(input)
        if monitor.enabled and logits.requires_grad:
            layer = _layer_tag(router, index)
            logits.register_hook(lambda grad: monitor.observe_router_grad(layer, grad))
        return logits

    def after_forward(module, inputs, output):
        if monitor.enabled:
            routing_map = output[1]  # [tokens, num_experts] bool
            monitor.observe_routing(_layer_tag(router, index), routing_map.sum(dim=0))

    router.gating = gating_with_grad_telemetry
    router.register_forward_hook(after_forward)
