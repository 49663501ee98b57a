import argparse

import pytest

from fp8flow_megatron.megatron import FP8FlowConfigError, add_fp8_flow_args, parse_args_with_yaml, validate_fp8_flow
from fp8flow_megatron.megatron.config import validation_errors

GOOD = dict(
    moe_fp8_flow=True, moe_expert_recompute=False, fp8="e4m3", fp8_recipe="blockwise", moe_token_dispatcher_type="alltoall",
    num_moe_experts=64, hidden_size=2048, moe_ffn_hidden_size=1408, swiglu=True, moe_grouped_gemm=True,
    moe_router_dtype="fp32", expert_tensor_parallel_size=1, tensor_model_parallel_size=1, moe_expert_capacity_factor=None,
    moe_pad_expert_input_to_capacity=False, moe_router_padding_for_quantization=False, add_bias_linear=False,
    moe_apply_probs_on_input=False, moe_latent_size=None, recompute_modules=None,
)


def test_good_config_validates():
    cfg = validate_fp8_flow(argparse.Namespace(**GOOD))
    assert cfg.enabled and not cfg.expert_recompute and cfg.align == 16


@pytest.mark.parametrize(
    "change,flag_in_message,fix_in_message",
    [
        ({"fp8": "hybrid"}, "--fp8-format", "--fp8-format e4m3"),
        ({"fp8": None}, "--fp8-format", "--fp8-format e4m3"),
        ({"fp8_recipe": "delayed"}, "--fp8-recipe", "--fp8-recipe blockwise"),
        ({"fp8_recipe": "mxfp8"}, "--fp8-recipe", "--fp8-recipe blockwise"),
        ({"moe_token_dispatcher_type": "allgather"}, "--moe-token-dispatcher-type", "alltoall"),
        ({"moe_token_dispatcher_type": "flex"}, "--moe-token-dispatcher-type", "alltoall"),
        ({"hidden_size": 2000}, "--hidden-size 2000", "divisible by 128"),
        ({"moe_ffn_hidden_size": 1400}, "--moe-ffn-hidden-size 1400", "multiple of 128"),
        ({"swiglu": False}, "SwiGLU", "--swiglu"),
        ({"moe_grouped_gemm": False}, "grouped GEMM", "--moe-grouped-gemm"),
        ({"moe_router_dtype": None}, "--moe-router-dtype", "--moe-router-dtype fp32"),
        ({"moe_router_dtype": "fp64"}, "--moe-router-dtype", "--moe-router-dtype fp32"),
        ({"expert_tensor_parallel_size": 2}, "--expert-tensor-parallel-size 2", "--expert-tensor-parallel-size 1"),
        ({"tensor_model_parallel_size": 2}, "--tensor-model-parallel-size 2", "TP=1"),
        ({"moe_expert_capacity_factor": 1.25}, "--moe-expert-capacity-factor", "dropless"),
        ({"moe_router_padding_for_quantization": True}, "--moe-router-padding-for-quantization", "remove the flag"),
        ({"add_bias_linear": True}, "bias", "--disable-bias-linear"),
        ({"num_moe_experts": None}, "MoE", "--num-experts"),
        ({"recompute_modules": ["moe_act"]}, "moe_act", "--moe-expert-recompute"),
        ({"moe_latent_size": 256}, "--moe-latent-size", "remove"),
        ({"moe_fp8_flow_gemm": "cublas"}, "--moe-fp8-flow-gemm is 'cublas'", "--moe-fp8-flow-gemm auto"),
        ({"fp8_param_gather": True}, "--fp8-param-gather", "drop --fp8-param-gather"),
        ({"fp8_param": True}, "--fp8-param-gather", "drop --fp8-param-gather"),
        ({"delay_wgrad_compute": True}, "--delay-wgrad-compute", "remove --delay-wgrad-compute"),
        ({"overlap_moe_expert_parallel_comm": True}, "--overlap-moe-expert-parallel-comm", "remove"),
        ({"moe_shared_expert_overlap": True}, "--moe-shared-expert-overlap", "remove --moe-shared-expert-overlap"),
        ({"moe_permute_fusion": True}, "--moe-permute-fusion", "remove --moe-permute-fusion"),
        ({"moe_use_legacy_grouped_gemm": True}, "--moe-use-legacy-grouped-gemm", "remove"),
        ({"moe_enable_deepep": True}, "--moe-enable-deepep", "remove"),
        ({"moe_extended_tp": True}, "--moe-extended-tp", "remove"),
        ({"moe_token_dropping": True}, "--moe-token-dropping", "remove"),
        ({"moe_router_padding_for_fp8": True}, "--moe-router-padding-for-fp8", "remove"),
        ({"moe_router_fusion": True}, "--moe-router-fusion", "remove --moe-router-fusion"),
        ({"use_megatron_fsdp": True}, "--use-megatron-fsdp", "remove --use-megatron-fsdp"),
        ({"use_torch_fsdp2": True}, "--use-torch-fsdp2", "remove --use-torch-fsdp2"),
        ({"cuda_graph_impl": "transformer_engine"}, "--cuda-graph-impl transformer_engine", "--cuda-graph-impl none"),
        ({"cuda_graph_impl": "local"}, "--cuda-graph-impl local", "--cuda-graph-impl none"),
        ({"enable_cuda_graph": True}, "--enable-cuda-graph", "--cuda-graph-impl none"),
        ({"external_cuda_graph": True}, "--external-cuda-graph", "--cuda-graph-impl none"),
    ],
)
def test_each_validation_error_names_flag_and_fix(change, flag_in_message, fix_in_message):
    bad = argparse.Namespace(**{**GOOD, **change})
    with pytest.raises(FP8FlowConfigError) as err:
        validate_fp8_flow(bad)
    msg = str(err.value)
    assert flag_in_message in msg and fix_in_message in msg, msg
    assert len(validation_errors(bad)) == 1  # exactly this problem, nothing else


def test_all_errors_reported_at_once_and_flag_off_is_silent():
    bad = argparse.Namespace(**{**GOOD, "fp8_recipe": "delayed", "hidden_size": 100})
    assert len(validation_errors(bad)) == 2
    off = argparse.Namespace(**{**GOOD, "moe_fp8_flow": False, "fp8_recipe": "delayed"})
    assert validation_errors(off) == []
    with pytest.raises(FP8FlowConfigError, match="--moe-expert-recompute only applies"):
        validate_fp8_flow(argparse.Namespace(**{**GOOD, "moe_fp8_flow": False, "moe_expert_recompute": True}))


def test_validation_reads_a_transformer_config():
    import torch.nn.functional as F
    from megatron.core.transformer.transformer_config import TransformerConfig

    cfg = TransformerConfig(
        num_layers=1, hidden_size=256, num_attention_heads=4, num_moe_experts=4, moe_ffn_hidden_size=128,
        gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False, moe_router_dtype="fp32",
        moe_grouped_gemm=True, moe_token_dispatcher_type="alltoall",
    )
    cfg.moe_fp8_flow = True
    # no FP8 recipe set on this config: both fp8 errors, nothing else
    errs = validation_errors(cfg)
    assert len(errs) == 2 and "--fp8-format" in errs[0] and "--fp8-recipe" in errs[1]


def test_flags_parse_and_chain():
    p = argparse.ArgumentParser()
    assert add_fp8_flow_args(p) is p
    add_fp8_flow_args(p)  # a second provider in the chain must not add the flags twice
    a = p.parse_args(["--moe-fp8-flow", "--moe-expert-recompute"])
    assert a.moe_fp8_flow and a.moe_expert_recompute
    assert not p.parse_args([]).moe_fp8_flow
    # the GEMM engine: triton by default, te selectable, anything else rejected by argparse
    assert p.parse_args([]).moe_fp8_flow_gemm == "auto"
    assert p.parse_args(["--moe-fp8-flow-gemm", "triton"]).moe_fp8_flow_gemm == "triton"
    assert p.parse_args(["--moe-fp8-flow-gemm", "te"]).moe_fp8_flow_gemm == "te"
    with pytest.raises(SystemExit):
        p.parse_args(["--moe-fp8-flow-gemm", "cublas"])


def test_gemm_engine_reaches_the_transformer_config():
    from types import SimpleNamespace

    from fp8flow_megatron.megatron.config import FP8FlowConfig, apply_to_transformer_config

    config = apply_to_transformer_config(SimpleNamespace(), FP8FlowConfig.from_source(argparse.Namespace(**GOOD, moe_fp8_flow_gemm="te")))
    assert config.moe_fp8_flow_gemm == "te" and config.moe_fp8_flow
    assert FP8FlowConfig.from_source(argparse.Namespace(**GOOD)).gemm == "auto"  # absent -> the default


def test_disable_parameter_transpose_cache_reaches_the_transformer_config():
    # megatron-core's TransformerConfig field, which Megatron-LM has no flag for: the flag's dest is the field's name,
    # so the trainer's config builder (like Megatron-LM's core_transformer_config_from_args) carries it over
    import dataclasses

    from megatron.core.transformer.transformer_config import TransformerConfig

    from fp8flow_megatron.megatron.arguments import build_parser, transformer_config_from_args

    assert "disable_parameter_transpose_cache" in {f.name for f in dataclasses.fields(TransformerConfig)}
    p = argparse.ArgumentParser()
    add_fp8_flow_args(p)
    assert not p.parse_args([]).disable_parameter_transpose_cache
    assert p.parse_args(["--disable-parameter-transpose-cache"]).disable_parameter_transpose_cache
    args = build_parser().parse_args(["--disable-parameter-transpose-cache"])
    assert transformer_config_from_args(args, use_te=False).disable_parameter_transpose_cache
    assert not transformer_config_from_args(build_parser().parse_args([]), use_te=False).disable_parameter_transpose_cache


def test_existing_upstream_flag_is_not_added_again():
    p = argparse.ArgumentParser()
    p.add_argument("--moe-fp8-flow", action="store_true")  # as if upstream TransformerConfig grew the field
    add_fp8_flow_args(p)
    assert sum("--moe-fp8-flow" in a.option_strings for a in p._actions) == 1
    assert p.parse_args(["--moe-expert-recompute"]).moe_expert_recompute


def _parser():
    p = argparse.ArgumentParser()
    p.add_argument("--config")
    p.add_argument("--hidden-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--recompute-modules", nargs="*", default=None)
    return add_fp8_flow_args(p)


def test_yaml_sets_defaults_and_cli_overrides(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("hidden_size: 256\nlr: 3.0e-4\nmoe_fp8_flow: true\nrecompute_modules: [moe, layernorm]\n")
    a = parse_args_with_yaml(_parser(), ["--config", str(y)])
    assert a.hidden_size == 256 and a.lr == 3e-4 and a.moe_fp8_flow and a.recompute_modules == ["moe", "layernorm"]
    b = parse_args_with_yaml(_parser(), ["--config", str(y), "--hidden-size", "512", "--no-moe-fp8-flow"])
    assert b.hidden_size == 512 and not b.moe_fp8_flow and b.lr == 3e-4


def test_yaml_unknown_and_duplicate_keys_are_errors(tmp_path):
    y = tmp_path / "bad.yaml"
    y.write_text("hidden_sise: 256\n")
    with pytest.raises(FP8FlowConfigError, match="unknown config keys: 'hidden_sise' \\(did you mean 'hidden_size'\\?\\)"):
        parse_args_with_yaml(_parser(), ["--config", str(y)])
    d = tmp_path / "dup.yaml"
    d.write_text("lr: 1.0\nlr: 2.0\n")
    with pytest.raises(FP8FlowConfigError, match="duplicate key 'lr'"):
        parse_args_with_yaml(_parser(), ["--config", str(d)])


def test_the_te_engine_without_te_on_a_gpu_is_refused(monkeypatch):
    import torch

    from fp8flow_megatron.megatron import config as config_module

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(config_module, "te_available", lambda: False)
    msg = "; ".join(validation_errors(argparse.Namespace(**{**GOOD, "moe_fp8_flow_gemm": "te"})))
    assert "--moe-fp8-flow-gemm te needs TransformerEngine" in msg and "--moe-fp8-flow-gemm triton" in msg
    assert validation_errors(argparse.Namespace(**{**GOOD, "moe_fp8_flow_gemm": "triton"})) == []
    assert validation_errors(argparse.Namespace(**{**GOOD, "moe_fp8_flow_gemm": "auto"})) == []  # auto picks triton
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # CPU: the spec runs whatever the engine
    assert validation_errors(argparse.Namespace(**{**GOOD, "moe_fp8_flow_gemm": "te"})) == []


@pytest.mark.parametrize("scope", [None, "none"])
def test_no_cuda_graphs_is_accepted(scope):
    assert validation_errors(argparse.Namespace(**{**GOOD, "cuda_graph_impl": scope})) == []


def test_the_unknown_mlp_warning_is_dropped_only_for_fp8flow_layers():
    import logging
    from types import SimpleNamespace

    from fp8flow_megatron.megatron.moe_layer import FP8FlowMoELayer
    from fp8flow_megatron.megatron.spec import _Fp8FlowUnknownMlpFilter

    def record_while_building(module):
        submodules = SimpleNamespace(mlp=SimpleNamespace(module=module))  # noqa: F841 (read from this frame)
        record = logging.LogRecord("megatron.core.transformer.transformer_layer", logging.WARNING, __file__, 1,
                                   "Unknown MLP type: <class 'ModuleSpec'>. Using default kwargs.", None, None)
        return _Fp8FlowUnknownMlpFilter().filter(record)

    assert record_while_building(FP8FlowMoELayer) is False
    assert record_while_building(type("MyMoELayer", (FP8FlowMoELayer,), {})) is False
    assert record_while_building(argparse.ArgumentParser) is True  # someone else's unknown MLP still warns
    other = logging.LogRecord("x", logging.WARNING, __file__, 1, "something else", None, None)
    assert _Fp8FlowUnknownMlpFilter().filter(other) is True
