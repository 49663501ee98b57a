"""Narrow fixes to stock megatron-core code that the plugin's trainer and tests run as baselines.

install_grouped_extra_state_fix()
    megatron-core 0.16.1's TEGroupedLinear._split_extra_state (transformer_engine.py) decodes the grouped linear's
    `_extra_state` whenever FP8 is active. TE 2.x's stateless recipes (blockwise, MXFP8, current scaling) store "no
    state" as an empty byte tensor, which decodes to None, and the split then fails with
    `TypeError: 'NoneType' object is not subscriptable`: a stock TE-blockwise MoE model cannot save a distributed
    checkpoint (Megatron-LM PR #6509). The fix gives every expert the same empty tensor, which is what that
    PR does. It replaces only that case, and the load path already accepts an empty state. Without TE it does nothing.
    It is idempotent and logged.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)

_MARKER = "_fp8flow_empty_extra_state_fix"


def install_grouped_extra_state_fix() -> bool:
    """Returns True when the fix is in place (now or before), False where megatron-core has no TE grouped linear."""
    try:
        from megatron.core.extensions import transformer_engine as mcore_te
    except ImportError:  # no TransformerEngine: the stock grouped linear does not exist
        return False
    cls = getattr(mcore_te, "TEGroupedLinear", None)
    if cls is None or not hasattr(cls, "_split_extra_state"):
        return False
    original = cls._split_extra_state
    if getattr(original, _MARKER, False):
        return True

    def _split_extra_state(self, state):
        if isinstance(state, torch.Tensor) and state.numel() == 0:  # a stateless recipe: nothing to split
            return [state] * self.num_gemms
        return original(self, state)

    setattr(_split_extra_state, _MARKER, True)
    cls._split_extra_state = _split_extra_state
    log.info("fp8flow: patched megatron.core.extensions.transformer_engine.TEGroupedLinear._split_extra_state "
             "(empty TE extra state of stateless FP8 recipes; Megatron-LM PR #6509)")
    return True
