"""scripts/pretrain_gpt_fp8flow.py against a stand-in for Megatron-LM's training tree (not in the megatron-core wheel):
what it hands to pretrain() (core_v0.16.x: model provider; core_v0.19.x: config container), the chained argument
provider, the builder / model config with the flag off and on, and the refusals."""

from __future__ import annotations

import argparse
import importlib.util
import sys
import types
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "pretrain_gpt_fp8flow.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("pretrain_gpt_fp8flow", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture
def fake_megatron_lm(monkeypatch):
    """core_v0.16.x's entry: pretrain(datasets_provider, model_provider, ...) parses the arguments itself."""
    from fp8flow_megatron.megatron import compat

    monkeypatch.setattr(compat, "pretrain_takes_cfg_container", lambda: False)
    calls = {}

    def pretrain(datasets_provider, model_provider, model_type, forward_step, args_defaults=None,
                 extra_args_provider=None, store=None, get_embedding_ranks=None):
        calls["pretrain"] = dict(datasets_provider=datasets_provider, model_provider=model_provider,
                                 forward_step=forward_step, extra_args_provider=extra_args_provider,
                                 store=store, get_embedding_ranks=get_embedding_ranks)

    training = types.ModuleType("megatron.training")
    training.pretrain = pretrain
    training.inprocess_restart = types.SimpleNamespace(maybe_wrap_for_inprocess_restart=lambda fn: (fn, "store"))
    arguments = types.ModuleType("megatron.training.arguments")
    arguments.core_transformer_config_from_args = lambda args: types.SimpleNamespace(from_args=True)

    pg = types.ModuleType("pretrain_gpt")
    pg.has_nvidia_modelopt = False
    pg.train_valid_test_datasets_provider = lambda *a: None
    pg.forward_step = lambda *a: None
    pg.get_embedding_ranks = lambda ranks: ranks

    def gpt_builder(args, pre_process, post_process, vp_stage=None, config=None, pg_collection=None):
        calls["builder_config"] = config
        return "model"

    pg.gpt_builder = gpt_builder
    pg.model_provider = lambda builder, pre_process=True, post_process=True, **kw: builder(
        calls["args"], pre_process, post_process, **kw)
    for name, mod in {"megatron.training": training, "megatron.training.arguments": arguments, "pretrain_gpt": pg}.items():
        monkeypatch.setitem(sys.modules, name, mod)
    return calls


def test_hands_megatron_lm_pieces_to_pretrain(fake_megatron_lm):
    _load_script().main()
    got = fake_megatron_lm["pretrain"]
    pg = sys.modules["pretrain_gpt"]
    assert got["datasets_provider"] is pg.train_valid_test_datasets_provider
    assert got["forward_step"] is pg.forward_step and got["get_embedding_ranks"] is pg.get_embedding_ranks
    assert got["store"] == "store"
    parser = got["extra_args_provider"](argparse.ArgumentParser())
    args = parser.parse_args(["--moe-fp8-flow", "--moe-expert-recompute"])
    assert args.moe_fp8_flow and args.moe_expert_recompute


def test_builder_is_stock_without_the_flag(fake_megatron_lm):
    _load_script().main()
    fake_megatron_lm["args"] = argparse.Namespace(moe_fp8_flow=False, moe_expert_recompute=False, yaml_cfg=None)
    assert fake_megatron_lm["pretrain"]["model_provider"]() == "model"
    assert fake_megatron_lm["builder_config"] is None  # gpt_builder builds its own config: stock behaviour


def test_builder_rejects_an_invalid_fp8_flow_configuration(fake_megatron_lm):
    from fp8flow_megatron.megatron import FP8FlowConfigError

    _load_script().main()
    fake_megatron_lm["args"] = argparse.Namespace(moe_fp8_flow=True, moe_expert_recompute=False, yaml_cfg=None)
    with pytest.raises(FP8FlowConfigError):
        fake_megatron_lm["pretrain"]["model_provider"]()


@pytest.fixture
def fake_megatron_lm_019(fake_megatron_lm, monkeypatch):
    """core_v0.19.x's entry: parse_and_validate_args, gpt_config_from_args, pretrain(cfg_container, ...)."""
    from fp8flow_megatron.megatron import compat

    calls = fake_megatron_lm
    monkeypatch.setattr(compat, "pretrain_takes_cfg_container", lambda: True)

    def pretrain(cfg_container, datasets_provider, model_type, forward_step, model_provider=None, store=None,
                 get_embedding_ranks=None):
        calls["pretrain"] = dict(cfg_container=cfg_container, datasets_provider=datasets_provider,
                                 forward_step=forward_step, store=store, get_embedding_ranks=get_embedding_ranks)

    def parse_and_validate_args(extra_args_provider=None, args_defaults=None):
        calls["parse"] = dict(extra_args_provider=extra_args_provider, args_defaults=args_defaults)
        return calls["args"]

    def gpt_config_from_args(args, config=None):
        return types.SimpleNamespace(transformer=config if config is not None else types.SimpleNamespace(from_args=True))

    sys.modules["megatron.training"].pretrain = pretrain
    sys.modules["megatron.training.arguments"].parse_and_validate_args = parse_and_validate_args
    utils = types.ModuleType("megatron.training.argument_utils")
    utils.gpt_config_from_args = gpt_config_from_args
    utils.pretrain_cfg_container_from_args = lambda args, model_cfg: types.SimpleNamespace(model=model_cfg)
    monkeypatch.setitem(sys.modules, "megatron.training.argument_utils", utils)
    return calls


def test_cfg_container_pretrain_is_stock_without_the_flag(fake_megatron_lm_019):
    calls = fake_megatron_lm_019
    calls["args"] = argparse.Namespace(moe_fp8_flow=False, moe_expert_recompute=False, yaml_cfg=None)
    _load_script().main()
    got = calls["pretrain"]
    pg = sys.modules["pretrain_gpt"]
    assert got["datasets_provider"] is pg.train_valid_test_datasets_provider and got["forward_step"] is pg.forward_step
    assert got["store"] == "store" and got["get_embedding_ranks"] is pg.get_embedding_ranks
    assert got["cfg_container"].model.transformer.from_args  # gpt_config_from_args built its own config
    args = calls["parse"]["extra_args_provider"](argparse.ArgumentParser()).parse_args(["--moe-fp8-flow"])
    assert args.moe_fp8_flow and calls["parse"]["args_defaults"] == {"tokenizer_type": "GPT2BPETokenizer"}


def test_cfg_container_pretrain_carries_fp8_flow_and_patches_the_spec(fake_megatron_lm_019, monkeypatch):
    from fp8flow_megatron.megatron import spec

    installed = []
    monkeypatch.setattr(spec, "install_fp8flow_spec", lambda: installed.append(True))
    import fp8flow_megatron.megatron as plugin

    monkeypatch.setattr(plugin, "install_fp8flow_spec", spec.install_fp8flow_spec)
    monkeypatch.setattr(plugin, "validate_fp8_flow", lambda args: plugin.FP8FlowConfig(enabled=True))
    calls = fake_megatron_lm_019
    calls["args"] = argparse.Namespace(moe_fp8_flow=True, moe_expert_recompute=False, yaml_cfg=None)
    _load_script().main()
    transformer = calls["pretrain"]["cfg_container"].model.transformer
    assert installed and transformer.from_args and transformer.moe_fp8_flow is True
    assert transformer.moe_fp8_flow_gemm == "auto"


def test_cfg_container_pretrain_rejects_an_invalid_fp8_flow_configuration(fake_megatron_lm_019):
    from fp8flow_megatron.megatron import FP8FlowConfigError

    fake_megatron_lm_019["args"] = argparse.Namespace(moe_fp8_flow=True, moe_expert_recompute=False, yaml_cfg=None)
    with pytest.raises(FP8FlowConfigError):
        _load_script().main()


def test_explains_a_missing_megatron_lm_checkout(monkeypatch):
    monkeypatch.setitem(sys.modules, "pretrain_gpt", None)  # import fails
    with pytest.raises(SystemExit, match="PYTHONPATH"):
        _load_script()._import_pretrain_gpt()
