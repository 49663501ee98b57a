"""Spec injection: the GPT decoder block spec with FP8-Flow MoE layers.

megatron-core 0.16 specs the MoE mlp as ModuleSpec(MoELayer, submodules=MoESubmodules(experts=ModuleSpec(TEGroupedMLP,
MLPSubmodules))), 0.19 as partial(MoELayer, submodules=MoESubmodules(experts=partial(TEGroupedMLP,
submodules=GroupedMLPSubmodules))); the rewrite keeps the style it finds (compat.spec_with / compat.experts_spec).

get_fp8flow_decoder_block_spec(config, ...) is the public entry: it is megatron's get_gpt_decoder_block_spec, and when
config.moe_fp8_flow is set every MoE layer's mlp becomes FP8FlowMoELayer with FP8FlowGroupedMLP experts. With the flag
off it returns megatron's spec object untouched. install_fp8flow_spec() is the narrow monkeypatch for code that builds
specs itself (Megatron-LM's gpt_builders): idempotent, lazy, logged; inside Megatron-LM's training loop it also installs
the non-finite guard's per-iteration check (megatron/step_check.py).
"""

from __future__ import annotations

import copy
import logging
import sys
from typing import Optional

from .compat import experts_spec, mlp_kwargs_passed_to_moe_subclasses, spec_module, spec_submodules, spec_with

log = logging.getLogger(__name__)
_PATCH_MARKER = "_fp8flow_patched"


def _te_available() -> bool:
    try:
        from megatron.core.extensions.transformer_engine import TEColumnParallelGroupedLinear

        return TEColumnParallelGroupedLinear is not None
    except Exception:
        return False


def fp8flow_moe_spec(moe_spec):
    """A copy of a MoE spec (ModuleSpec or partial, as megatron-core made it) with FP8FlowMoELayer and
    FP8FlowGroupedMLP (TE grouped linears when TE is present, EmulatedGroupedLinear otherwise; parameter names and
    checkpoint layout are TEGroupedMLP's either way)."""
    from megatron.core.transformer.moe.experts import TEGroupedMLP
    from megatron.core.transformer.moe.moe_layer import MoESubmodules

    from .experts import EmulatedGroupedLinear, EmulatedRowGroupedLinear, FP8FlowGroupedMLP
    from .moe_layer import FP8FlowMoELayer

    old = spec_submodules(moe_spec)
    old_experts = old.experts
    if spec_module(old_experts) is TEGroupedMLP and _te_available():
        experts = spec_with(old_experts, FP8FlowGroupedMLP, copy.copy(spec_submodules(old_experts)))
    else:
        experts = experts_spec(FP8FlowGroupedMLP, EmulatedGroupedLinear, EmulatedRowGroupedLinear, like=old_experts)
    submodules = MoESubmodules(experts=experts, shared_experts=old.shared_experts, router=old.router)
    if not mlp_kwargs_passed_to_moe_subclasses():
        _quiet_unknown_mlp_type()
    return spec_with(moe_spec, FP8FlowMoELayer, submodules)


class _Fp8FlowUnknownMlpFilter(logging.Filter):
    """megatron-core 0.16's TransformerLayer passes pg_collection only to the exact stock MLP classes and logs "Unknown
    MLP type ... Using default kwargs." for any other one, FP8FlowMoELayer included, which then builds megatron's
    default process-group collection itself (as MoELayer does when given none). That record says nothing to a user of
    FP8-Flow, so it is dropped when the layer being built has an FP8-Flow MoE layer; any other unknown MLP type still
    warns."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith("Unknown MLP type"):
            return True
        from .moe_layer import FP8FlowMoELayer

        frame = sys._getframe()
        while frame is not None:  # the TransformerLayer.__init__ that logs holds the layer's `submodules`
            module = getattr(getattr(frame.f_locals.get("submodules"), "mlp", None), "module", None)
            if module is not None:
                return not (isinstance(module, type) and issubclass(module, FP8FlowMoELayer))
            frame = frame.f_back
        return True


def _quiet_unknown_mlp_type() -> None:
    """Install the filter above once (idempotent, logged)."""
    layer_log = logging.getLogger("megatron.core.transformer.transformer_layer")
    if not any(isinstance(f, _Fp8FlowUnknownMlpFilter) for f in layer_log.filters):
        layer_log.addFilter(_Fp8FlowUnknownMlpFilter())
        log.debug("fp8flow: megatron's 'Unknown MLP type' warning is dropped for FP8-Flow MoE layers")


def _is_moe_spec(spec) -> bool:
    from megatron.core.transformer.moe.moe_layer import MoELayer

    module = spec_module(spec)
    return isinstance(module, type) and issubclass(module, MoELayer)


def rewrite_block_spec(block_spec):
    """A copy of a TransformerBlockSubmodules whose MoE layers use FP8-Flow (layers are copied, not shared)."""
    new_block = copy.copy(block_spec)
    new_layers = []
    for layer_spec in block_spec.layer_specs:
        mlp = getattr(layer_spec.submodules, "mlp", None)
        if _is_moe_spec(mlp):
            layer_spec = copy.copy(layer_spec)
            layer_spec.submodules = copy.copy(layer_spec.submodules)
            layer_spec.submodules.mlp = fp8flow_moe_spec(mlp)
        new_layers.append(layer_spec)
    new_block.layer_specs = new_layers
    return new_block


def get_fp8flow_decoder_block_spec(
    config,
    use_transformer_engine: bool,
    normalization: Optional[str] = None,
    qk_l2_norm: Optional[bool] = False,
    vp_stage: Optional[int] = None,
    pp_rank: Optional[int] = None,
):
    """megatron's get_gpt_decoder_block_spec, with FP8-Flow MoE layers when config.moe_fp8_flow is set."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

    spec = get_gpt_decoder_block_spec(
        config, use_transformer_engine, normalization=normalization, qk_l2_norm=qk_l2_norm, vp_stage=vp_stage, pp_rank=pp_rank
    )
    if not getattr(config, "moe_fp8_flow", False):
        return spec
    return rewrite_block_spec(spec)


def install_fp8flow_spec() -> bool:
    """Make megatron's MoE spec factory return FP8-Flow layers (for code that builds specs itself, e.g. Megatron-LM's
    gpt_builders). FP8FlowMoELayer / FP8FlowGroupedMLP behave exactly like the stock classes while config.moe_fp8_flow
    is off, and only TEGroupedMLP expert specs are rewritten. Returns False if it was already installed.

    Both Megatron-LM routes call it from their model builder, inside Megatron-LM's pretrain(): there it also wraps
    Megatron-LM's train_step with the non-finite guard's check (install_megatron_lm_step_check), so that an inf or NaN
    reaching an FP8 quantizer stops the run at the end of that iteration, naming layer, site and pass."""
    from .step_check import install_megatron_lm_step_check

    install_megatron_lm_step_check()  # a no-op outside Megatron-LM's training loop, and when installed already
    from megatron.core.models.gpt import gpt_layer_specs, moe_module_specs
    from megatron.core.transformer.moe.experts import TEGroupedMLP

    original = moe_module_specs.get_moe_module_spec_for_backend
    if getattr(original, _PATCH_MARKER, False):
        return False

    def get_moe_module_spec_for_backend(*args, **kwargs):
        spec = original(*args, **kwargs)
        if spec_module(spec_submodules(spec).experts) is TEGroupedMLP:
            return fp8flow_moe_spec(spec)
        return spec

    setattr(get_moe_module_spec_for_backend, _PATCH_MARKER, True)
    get_moe_module_spec_for_backend.__wrapped__ = original
    moe_module_specs.get_moe_module_spec_for_backend = get_moe_module_spec_for_backend
    gpt_layer_specs.get_moe_module_spec_for_backend = get_moe_module_spec_for_backend
    log.info("fp8flow: patched megatron.core.models.gpt.{moe_module_specs,gpt_layer_specs}.get_moe_module_spec_for_backend")
    return True
