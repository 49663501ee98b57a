#!/usr/bin/env python
"""Megatron-LM's pretrain_gpt with --moe-fp8-flow, without patching Megatron-LM (megatron-core / Megatron-LM 0.16.x).

    export PYTHONPATH=/path/to/Megatron-LM:$PYTHONPATH        # a core_v0.16.x checkout (pretrain_gpt.py at its root)
    torchrun --nproc-per-node 8 scripts/pretrain_gpt_fp8flow.py <the usual pretrain_gpt.py flags> \
        --fp8-format e4m3 --fp8-recipe blockwise --moe-token-dispatcher-type alltoall --moe-grouped-gemm \
        --moe-router-dtype fp32 --moe-fp8-flow [--moe-expert-recompute]

Everything but the model builder is Megatron-LM's own pretrain_gpt: its datasets provider, forward_step, embedding
ranks, in-process restart wrapper and argument defaults. The plugin adds --moe-fp8-flow / --moe-expert-recompute to the
argument parser (chained after modelopt's provider when modelopt is installed) and builds the GPT model with the
FP8-Flow MoE spec. Without --moe-fp8-flow the run is stock pretrain_gpt. megatron-core >= 0.18 (pretrain(cfg_container,
...)) is refused with the fix.
"""

from __future__ import annotations

import inspect
import sys
import time

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
    from functools import partial

    from fp8flow_megatron.megatron.compat import check_mcore_version, require_positional_pretrain

    check_mcore_version()
    require_positional_pretrain("scripts/pretrain_gpt_fp8flow.py")
    pretrain_gpt = _import_pretrain_gpt()
    from megatron.core.enums import ModelType
    from megatron.training import inprocess_restart, pretrain
    from megatron.training.arguments import core_transformer_config_from_args

    main_entry_time = time.time()
    if hasattr(pretrain_gpt, "set_startup_timestamps"):  # core_v0.16.1; absent from older 0.16 checkouts
        pretrain_gpt.set_startup_timestamps(program_start=_PROGRAM_START_TIME, main_entry=main_entry_time)

    datasets_provider = pretrain_gpt.train_valid_test_datasets_provider
    datasets_provider.is_distributed = True  # as pretrain_gpt's __main__ does
    pretrain_fn, store = inprocess_restart.maybe_wrap_for_inprocess_restart(pretrain)

    builder = make_gpt_builder(pretrain_gpt.gpt_builder, core_transformer_config_from_args)
    kwargs = dict(
        args_defaults={"tokenizer_type": "GPT2BPETokenizer"},
        extra_args_provider=partial(extra_args_provider, pretrain_gpt=pretrain_gpt),
    )
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


if __name__ == "__main__":
    sys.exit(main())
