#!/usr/bin/env python
"""Megatron-LM's pretrain_gpt with --moe-fp8-flow, without patching Megatron-LM (core_v0.16.x, or core_v0.19.x with
megatron-core 0.19.2; the version switches are in fp8flow_megatron/megatron/compat.py).

    export PYTHONPATH=/path/to/Megatron-LM:$PYTHONPATH        # a core_v0.16.x / core_v0.19.x checkout
    torchrun --nproc-per-node 8 scripts/pretrain_gpt_fp8flow.py <the usual pretrain_gpt.py flags> \
        --fp8-format e4m3 --fp8-recipe blockwise --moe-token-dispatcher-type alltoall --moe-grouped-gemm \
        --moe-router-dtype fp32 --moe-fp8-flow [--moe-expert-recompute]

Everything but the model builder is Megatron-LM's own pretrain_gpt: its datasets provider, forward_step, embedding
ranks, in-process restart wrapper and argument defaults. The plugin adds --moe-fp8-flow / --moe-expert-recompute to the
argument parser (chained after modelopt's provider when modelopt is installed) and builds the GPT model with the
FP8-Flow MoE spec. Without --moe-fp8-flow the run is stock pretrain_gpt.

core_v0.16.x: pretrain(datasets_provider, partial(model_provider, fp8flow_gpt_builder), ...).
core_v0.19.x: as its pretrain_gpt's __main__: parse_and_validate_args, gpt_config_from_args (the TransformerConfig built
first, so the FP8-Flow fields are on it, and the MoE spec factory patched before the model is built),
pretrain_cfg_container_from_args, pretrain(cfg_container, datasets_provider, ...).
"""

from __future__ import annotations

import inspect
import sys
import time
from functools import partial

_PROGRAM_START_TIME = time.time()


def _import_pretrain_gpt():
    try:
        import pretrain_gpt  # Megatron-LM's root module; its training entry is guarded by __main__
    except ImportError as exc:
        raise SystemExit(
            f"pretrain_gpt_fp8flow.py needs Megatron-LM's pretrain_gpt.py on PYTHONPATH ({exc}). Fix: "
            "git clone https://github.com/NVIDIA/Megatron-LM && git -C Megatron-LM checkout core_v0.16.1 && "
            "export PYTHONPATH=$PWD/Megatron-LM:$PYTHONPATH"
        ) from exc
    return pretrain_gpt


def extra_args_provider(parser, pretrain_gpt=None):
    """modelopt's arguments (when Megatron-LM has them) then --moe-fp8-flow / --moe-expert-recompute."""
    from fp8flow_megatron.megatron import add_fp8_flow_args

    if pretrain_gpt is not None and getattr(pretrain_gpt, "has_nvidia_modelopt", False):
        parser = pretrain_gpt.add_modelopt_args(parser)
    return add_fp8_flow_args(parser)


def make_gpt_builder(gpt_builder, core_transformer_config_from_args):
    """Megatron-LM's gpt_builder with FP8-Flow MoE layers when --moe-fp8-flow is on."""
    from fp8flow_megatron.megatron import apply_to_transformer_config, install_fp8flow_spec, validate_fp8_flow

    def fp8flow_gpt_builder(args, pre_process, post_process, vp_stage=None, config=None, pg_collection=None):
        fp8_flow = validate_fp8_flow(args)  # FP8FlowConfigError names each conflicting flag and the fix
        if fp8_flow.enabled:
            install_fp8flow_spec()  # MoE spec factory -> FP8FlowMoELayer / FP8FlowGroupedMLP (decoder and MTP)
            if config is None and getattr(args, "yaml_cfg", None) is None:
                # may switch the config class (MLATransformerConfig), so the FP8-Flow fields are set afterwards
                config = core_transformer_config_from_args(args)
            if config is not None:
                config = apply_to_transformer_config(config, fp8_flow)
        return gpt_builder(args, pre_process, post_process, vp_stage, config=config, pg_collection=pg_collection)

    return fp8flow_gpt_builder


def main() -> None:
    from fp8flow_megatron.megatron.compat import check_mcore_version, pretrain_takes_cfg_container

    check_mcore_version()
    pretrain_gpt = _import_pretrain_gpt()
    from megatron.training import inprocess_restart, pretrain

    main_entry_time = time.time()
    if hasattr(pretrain_gpt, "set_startup_timestamps"):  # core_v0.16.1 and later; absent from older 0.16 checkouts
        pretrain_gpt.set_startup_timestamps(program_start=_PROGRAM_START_TIME, main_entry=main_entry_time)

    datasets_provider = pretrain_gpt.train_valid_test_datasets_provider
    datasets_provider.is_distributed = True  # as pretrain_gpt's __main__ does
    pretrain_fn, store = inprocess_restart.maybe_wrap_for_inprocess_restart(pretrain)
    extra = partial(extra_args_provider, pretrain_gpt=pretrain_gpt)
    defaults = {"tokenizer_type": "GPT2BPETokenizer"}
    if pretrain_takes_cfg_container():
        _pretrain_cfg_container(pretrain_gpt, pretrain_fn, store, datasets_provider, extra, defaults)
    else:
        _pretrain_model_provider(pretrain_gpt, pretrain_fn, store, datasets_provider, extra, defaults)


def _pretrain_model_provider(pretrain_gpt, pretrain_fn, store, datasets_provider, extra, defaults) -> None:
    """core_v0.16.x: pretrain() parses the arguments and calls the model provider."""
    from megatron.core.enums import ModelType
    from megatron.training import pretrain
    from megatron.training.arguments import core_transformer_config_from_args

    builder = make_gpt_builder(pretrain_gpt.gpt_builder, core_transformer_config_from_args)
    kwargs = dict(args_defaults=defaults, extra_args_provider=extra)
    params = inspect.signature(pretrain).parameters
    if "store" in params:
        kwargs["store"] = store
    if "get_embedding_ranks" in params and hasattr(pretrain_gpt, "get_embedding_ranks"):
        kwargs["get_embedding_ranks"] = pretrain_gpt.get_embedding_ranks
    pretrain_fn(
        datasets_provider,
        partial(pretrain_gpt.model_provider, builder),
        ModelType.encoder_or_decoder,
        pretrain_gpt.forward_step,
        **kwargs,
    )


def fp8flow_gpt_config(args, gpt_config_from_args, core_transformer_config_from_args, **kwargs):
    """core_v0.19.x: Megatron-LM's gpt_config_from_args(args), with FP8-Flow MoE layers when --moe-fp8-flow is on."""
    from fp8flow_megatron.megatron import apply_to_transformer_config, install_fp8flow_spec, validate_fp8_flow

    fp8_flow = validate_fp8_flow(args)  # FP8FlowConfigError names each conflicting flag and the fix
    if fp8_flow.enabled:
        # the builder's default layer spec (decoder and MTP) calls megatron's MoE spec factory: patched here
        install_fp8flow_spec()
        if getattr(args, "yaml_cfg", None) is None:
            # may switch the config class (MLATransformerConfig), so the FP8-Flow fields are set afterwards
            config = apply_to_transformer_config(core_transformer_config_from_args(args), fp8_flow)
            return gpt_config_from_args(args, config=config, **kwargs)
        model_cfg = gpt_config_from_args(args, **kwargs)
        apply_to_transformer_config(model_cfg.transformer, fp8_flow)
        return model_cfg
    return gpt_config_from_args(args, **kwargs)


def _pretrain_cfg_container(pretrain_gpt, pretrain_fn, store, datasets_provider, extra, defaults) -> None:
    """core_v0.19.x: the arguments are parsed first and the model comes from a GPTModelConfig in the config
    container (pretrain_gpt's own __main__, with the FP8-Flow config)."""
    from megatron.core.enums import ModelType
    from megatron.training.argument_utils import gpt_config_from_args, pretrain_cfg_container_from_args
    from megatron.training.arguments import core_transformer_config_from_args, parse_and_validate_args

    args = parse_and_validate_args(extra_args_provider=extra, args_defaults=defaults)
    kwargs = {}
    if getattr(pretrain_gpt, "has_nvidia_modelopt", False):
        pretrain_gpt.maybe_enable_modelopt(args)
        if getattr(args, "modelopt_enabled", False):
            kwargs["model_config_cls"] = pretrain_gpt.ModelOptModelConfig
    model_cfg = fp8flow_gpt_config(args, gpt_config_from_args, core_transformer_config_from_args, **kwargs)
    pretrain_fn(
        pretrain_cfg_container_from_args(args, model_cfg),
        datasets_provider,
        ModelType.encoder_or_decoder,
        pretrain_gpt.forward_step,
        store=store,
        get_embedding_ranks=pretrain_gpt.get_embedding_ranks,
    )


if __name__ == "__main__":
    sys.exit(main())
