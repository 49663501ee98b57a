"""configs/*.yaml: well-formed, Megatron-LM flag names with valid values, FP8-Flow constraints, and the model shapes."""

import glob
import json
import math
import os

import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml")))
with open(os.path.join(os.path.dirname(__file__), "megatron_lm_core_v0.16.1_arg_dests.json")) as f:
    MEGATRON_DESTS = {k: v for k, v in json.load(f).items() if not k.startswith("_")}
# Not Megatron-LM 0.16.1 dests: the plugin's own flags, and fp8_format, the project's name for --fp8-format (whose
# Megatron dest is `fp8`).
PLUGIN_KEYS = {"moe_fp8_flow", "moe_expert_recompute", "fp8_format"}
EXTRA_CHOICES = {"tokenizer_type": ["ByteTokenizer"], "fp8_format": ["e4m3", "hybrid"]}
# Values that are strings on purpose; any other string that parses as a number is a YAML typo (PyYAML reads 1e-6 as
# a string: it needs 1.0e-6).
STRING_KEYS = {"split", "moe_layer_freq"}


class UniqueKeyLoader(yaml.SafeLoader):
    def construct_mapping(self, node, deep=False):
        keys = [self.construct_object(k, deep=deep) for k, _ in node.value]
        duplicates = sorted({k for k in keys if keys.count(k) > 1})
        if duplicates:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate keys {duplicates}", node.start_mark)
        return super().construct_mapping(node, deep=deep)


def load(path):
    with open(path, encoding="utf-8") as f:
        return yaml.load(f, Loader=UniqueKeyLoader)


def by_name(name):
    return load(os.path.join(ROOT, "configs", name))


def layer_pattern(config):
    """moe_layer_freq as Megatron expands it: a list of num_layers entries, 1 = MoE layer."""
    freq, num_layers = config.get("moe_layer_freq", 1), config["num_layers"]
    if isinstance(freq, int):
        return [1 if i % freq == 0 else 0 for i in range(num_layers)]
    return list(eval(freq, {"__builtins__": {}}, {}))  # Megatron evals the same expression (moe_freq_type)


def padded_vocab(config):
    """Megatron's vocabulary padding; NullTokenizer adds one id for end-of-document, ByteTokenizer has 257."""
    vocab = 257 if config["tokenizer_type"] == "ByteTokenizer" else config["vocab_size"] + 1
    multiple = config["make_vocab_size_divisible_by"] * config.get("tensor_model_parallel_size", 1)
    return math.ceil(vocab / multiple) * multiple


def test_the_configs_are_all_there():
    names = {os.path.basename(p) for p in CONFIGS}
    assert {"tiny_cpu.yaml", "deepseek_v2_lite.yaml", "deepseek_v2_lite_proxy.yaml", "qwen3_30b_a3b.yaml",
            "deepseek_v3.yaml"} <= names


def test_duplicate_keys_are_rejected():
    with pytest.raises(yaml.constructor.ConstructorError, match=r"duplicate keys \['num_layers'\]"):
        yaml.load("num_layers: 2\nhidden_size: 128\nnum_layers: 4\n", Loader=UniqueKeyLoader)


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_config_is_flat_megatron_flags_with_valid_values(path):
    config = load(path)
    assert isinstance(config, dict) and config
    unknown = sorted(set(config) - set(MEGATRON_DESTS) - PLUGIN_KEYS)
    assert not unknown, f"not Megatron-LM 0.16.1 argument dests: {unknown}"
    for key, value in config.items():
        assert not isinstance(value, dict), f"{key}: nested mappings are not flags"
        choices = (MEGATRON_DESTS.get(key) or []) + EXTRA_CHOICES.get(key, [])
        if choices:
            for v in value if isinstance(value, list) else [value]:
                assert str(v) in choices, f"{key}: {v!r} is not one of {choices}"
        if isinstance(value, str) and key not in STRING_KEYS:
            try:
                float(value)
            except ValueError:
                continue
            pytest.fail(f"{key}: {value!r} is a string that looks like a number (write 1.0e-6, not 1e-6)")
    assert ("fp8" in config) + ("fp8_format" in config) <= 1, "set the FP8 format once, as fp8_format"


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_layers_vocab_and_pipeline_add_up(path):
    config = load(path)
    pattern = layer_pattern(config)
    assert len(pattern) == config["num_layers"] and set(pattern) <= {0, 1}
    if 0 in pattern:
        assert "ffn_hidden_size" in config, "dense layers need ffn_hidden_size"
    assert padded_vocab(config) % config["make_vocab_size_divisible_by"] == 0
    pp = config.get("pipeline_model_parallel_size", 1)
    first = config.get("decoder_first_pipeline_num_layers")
    last = config.get("decoder_last_pipeline_num_layers")
    if pp > 1:
        middle = config["num_layers"] - (first or 0) - (last or 0)
        stages = pp - (first is not None) - (last is not None)
        assert middle > 0 and middle % stages == 0, f"{middle} layers do not split over {stages} stages"
    assert config["global_batch_size"] % config["micro_batch_size"] == 0


def test_every_model_config_uses_fp8_flow():
    assert [os.path.basename(p) for p in CONFIGS if not load(p).get("moe_fp8_flow")] == []


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_fp8_flow_requirements(path):
    c = load(path)
    if not c.get("moe_fp8_flow"):
        pytest.skip("moe_fp8_flow is off")
    assert c["hidden_size"] % 128 == 0, "FP8-Flow's 1x128 blocks tile hidden"
    assert c["moe_ffn_hidden_size"] % 128 == 0, "FP8-Flow's 1x128 blocks tile the expert FFN"
    assert (c["fp8_format"], c["fp8_recipe"]) == ("e4m3", "blockwise")
    assert c["moe_token_dispatcher_type"] == "alltoall" and c["moe_router_dtype"] == "fp32"
    assert c["moe_grouped_gemm"] is True and c["swiglu"] is True and c["add_bias_linear"] is False
    assert c.get("tensor_model_parallel_size", 1) == 1 and c.get("expert_tensor_parallel_size", 1) == 1
    assert "moe_act" not in (c.get("recompute_modules") or [])
    assert not c.get("moe_router_padding_for_quantization") and c.get("moe_expert_capacity_factor") is None


def expect(config, **want):
    got = {k: config.get(k) for k in want}
    assert got == want


def test_deepseek_v2_lite_shapes():
    c = by_name("deepseek_v2_lite.yaml")
    expect(c, num_layers=27, hidden_size=2048, ffn_hidden_size=10944, num_attention_heads=16,
           multi_latent_attention=True, q_lora_rank=None, kv_lora_rank=512, qk_head_dim=128, qk_pos_emb_head_dim=64,
           v_head_dim=128, num_experts=64, moe_router_topk=6, moe_ffn_hidden_size=1408,
           moe_shared_expert_intermediate_size=2 * 1408, moe_router_score_function="softmax",
           moe_router_pre_softmax=True, rope_type="yarn", rotary_scaling_factor=40, mscale=0.707, mscale_all_dim=0.707,
           moe_router_num_groups=None, untie_embeddings_and_output_weights=True)
    assert layer_pattern(c) == [0] + [1] * 26 and padded_vocab(c) == 102400


def test_deepseek_v2_lite_proxy_differs_only_in_depth_parallelism_and_schedule():
    full, proxy = by_name("deepseek_v2_lite.yaml"), by_name("deepseek_v2_lite_proxy.yaml")
    allowed = {"num_layers", "moe_layer_freq", "expert_model_parallel_size", "recompute_granularity",
               "recompute_method", "recompute_num_layers", "global_batch_size", "train_iters", "lr_warmup_iters",
               "eval_interval"}
    differing = {k for k in set(full) | set(proxy) if full.get(k) != proxy.get(k)}
    assert differing <= allowed, f"the proxy changes layer shapes: {sorted(differing - allowed)}"
    assert proxy["num_layers"] == 4 and layer_pattern(proxy) == [0, 1, 1, 1]
    assert proxy["expert_model_parallel_size"] == 1 and proxy["seq_length"] <= 4096


def test_qwen3_30b_a3b_shapes():
    c = by_name("qwen3_30b_a3b.yaml")
    expect(c, num_layers=48, hidden_size=2048, num_attention_heads=32, group_query_attention=True,
           num_query_groups=4, kv_channels=128, qk_layernorm=True, num_experts=128, moe_router_topk=8,
           moe_ffn_hidden_size=768, moe_shared_expert_intermediate_size=None, rotary_base=1000000,
           layernorm_epsilon=1.0e-6, multi_latent_attention=None)
    assert layer_pattern(c) == [1] * 48 and padded_vocab(c) == 151936


def test_deepseek_v3_shapes():
    c = by_name("deepseek_v3.yaml")
    expect(c, num_layers=61, hidden_size=7168, ffn_hidden_size=18432, num_attention_heads=128,
           multi_latent_attention=True, q_lora_rank=1536, kv_lora_rank=512, num_experts=256, moe_router_topk=8,
           moe_ffn_hidden_size=2048, moe_shared_expert_intermediate_size=2048, moe_router_num_groups=8,
           moe_router_group_topk=4, moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True,
           moe_router_topk_scaling_factor=2.5, mtp_num_layers=1, rope_type="yarn")
    assert layer_pattern(c) == [0] * 3 + [1] * 58 and padded_vocab(c) == 129280


def test_tiny_cpu_is_tiny_and_byte_level():
    c = by_name("tiny_cpu.yaml")
    assert c["tokenizer_type"] == "ByteTokenizer" and "vocab_size" not in c and padded_vocab(c) == 384
    assert c["hidden_size"] <= 256 and c["num_layers"] <= 4 and c["num_experts"] <= 8 and c["seq_length"] <= 256
    assert c["transformer_impl"] == "local" and "data_path" not in c  # the embedded corpus
