"""Megatron-core integration: flags and validation, the FP8-Flow dispatcher, experts and MoE layer, spec injection.

Public entry points:
    add_fp8_flow_args(parser)                 Megatron-LM extra_args_provider (chainable)
    validate_fp8_flow(args_or_config)         raises FP8FlowConfigError with actionable messages
    apply_to_transformer_config(cfg, fp8cfg)  carry the settings on a TransformerConfig
    get_fp8flow_decoder_block_spec(config, use_transformer_engine, ...)
    install_fp8flow_spec()                    patch megatron's MoE spec factory (idempotent)
"""

from .compat import check_mcore_version

check_mcore_version()  # fail at import, with the fix, on a megatron-core this plugin was not tested with

from .config import (  # noqa: E402
    FP8FlowConfig,
    FP8FlowConfigError,
    add_fp8_flow_args,
    apply_to_transformer_config,
    parse_args_with_yaml,
    validate_fp8_flow,
)
from .spec import get_fp8flow_decoder_block_spec, install_fp8flow_spec  # noqa: E402

__all__ = [
    "FP8FlowConfig",
    "FP8FlowConfigError",
    "add_fp8_flow_args",
    "apply_to_transformer_config",
    "get_fp8flow_decoder_block_spec",
    "install_fp8flow_spec",
    "parse_args_with_yaml",
    "validate_fp8_flow",
]
