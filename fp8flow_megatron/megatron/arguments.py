"""The trainer's Megatron-style flags, and the TransformerConfig they build.

Flag names, dest names and meanings are Megatron-LM's (``--num-experts`` -> ``num_experts``; YAML keys are the dest
names), restricted to what fp8flow_megatron.train implements. The FP8-Flow flags come from config.add_fp8_flow_args.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any, Dict

import torch
import torch.nn.functional as F

from .compat import cuda_graph_off_kwargs
from .config import add_fp8_flow_args

_B = "bool"
# (flag, type, default, help). bool flags accept --flag / --no-flag.
_MODEL = [
    ("--num-layers", int, 2, "transformer layers"),
    ("--hidden-size", int, 128, "hidden size"),
    ("--ffn-hidden-size", int, None, "dense FFN size (default 4 x hidden)"),
    ("--num-attention-heads", int, 4, "attention heads"),
    ("--kv-channels", int, None, "head dim (default hidden / heads)"),
    ("--group-query-attention", _B, False, "grouped-query attention"),
    ("--num-query-groups", int, None, "KV groups for GQA"),
    ("--normalization", str, "RMSNorm", "LayerNorm or RMSNorm"),
    ("--layernorm-epsilon", float, 1e-5, "norm epsilon"),
    ("--swiglu", _B, True, "SwiGLU MLPs"),
    ("--init-method-std", float, 0.02, "init std"),
    ("--attention-dropout", float, 0.0, "attention dropout"),
    ("--hidden-dropout", float, 0.0, "hidden dropout"),
    ("--attention-softmax-in-fp32", _B, True, "softmax in fp32"),
    ("--untie-embeddings-and-output-weights", _B, False, "separate output layer"),
    ("--position-embedding-type", str, "rope", "rope, learned_absolute or none"),
    ("--rotary-base", int, 10000, "RoPE base"),
    ("--rotary-percent", float, 1.0, "fraction of head dim rotated"),
    ("--rotary-scaling-factor", float, 1.0, "RoPE (yarn) scaling factor"),
    ("--rope-type", str, None, "rope or yarn (MLA)"),
    ("--apply-rope-fusion", _B, False, "fused RoPE kernel (GPU)"),
    ("--qk-layernorm", _B, False, "norm on q/k"),
    ("--multi-latent-attention", _B, False, "MLA (DeepSeek)"),
    ("--q-lora-rank", int, None, "MLA q low rank (None: no q compression)"),
    ("--kv-lora-rank", int, 512, "MLA kv low rank"),
    ("--qk-head-dim", int, 128, "MLA qk head dim"),
    ("--qk-pos-emb-head-dim", int, 64, "MLA rope head dim"),
    ("--v-head-dim", int, 128, "MLA v head dim"),
    ("--mscale", float, 1.0, "yarn mscale"),
    ("--mscale-all-dim", float, 0.0, "yarn mscale_all_dim"),
    ("--mtp-num-layers", int, None, "multi-token prediction layers (not supported by this trainer)"),
    ("--mtp-loss-scaling-factor", float, 0.1, "MTP loss scale"),
    ("--transformer-impl", str, None, "transformer_engine or local (default: TE if importable)"),
    ("--use-cpu-initialization", _B, False, "initialize weights on CPU"),
    ("--bf16", _B, False, "bf16 parameters and activations"),
    ("--seed", int, 1234, "random seed"),
]
_MOE = [
    ("--num-experts", int, None, "routed experts"),
    ("--moe-layer-freq", str, "1", "1 = every layer MoE, or a Python list expression like ([0]+[1]*26)"),
    ("--moe-ffn-hidden-size", int, None, "expert FFN size"),
    ("--moe-shared-expert-intermediate-size", int, None, "shared experts' total FFN size"),
    ("--moe-shared-expert-overlap", _B, False, "overlap shared experts with the dispatcher"),
    ("--moe-router-topk", int, 2, "experts per token"),
    ("--moe-router-score-function", str, "softmax", "softmax or sigmoid"),
    ("--moe-router-pre-softmax", _B, False, "softmax before top-k"),
    ("--moe-router-topk-scaling-factor", float, None, "scale of the top-k probs"),
    ("--moe-router-load-balancing-type", str, "aux_loss", "aux_loss, seq_aux_loss, global_aux_loss, sinkhorn, none"),
    ("--moe-aux-loss-coeff", float, 0.0, "aux loss coefficient"),
    ("--moe-router-dtype", str, None, "fp32 or fp64 router"),
    ("--moe-router-num-groups", int, None, "group-limited routing groups"),
    ("--moe-router-group-topk", int, None, "groups selected per token"),
    ("--moe-router-enable-expert-bias", _B, False, "aux-loss-free expert bias"),
    ("--moe-router-bias-update-rate", float, 1e-3, "expert bias update rate"),
    ("--moe-grouped-gemm", _B, False, "grouped GEMM experts"),
    ("--moe-token-dispatcher-type", str, "alltoall", "allgather, alltoall or flex"),
    ("--moe-permute-fusion", _B, False, "TE fused permute (stock path)"),
    ("--moe-router-padding-for-quantization", _B, False, "router-side FP8 padding (stock path)"),
    ("--moe-expert-capacity-factor", float, None, "token dropping capacity"),
    ("--moe-pad-expert-input-to-capacity", _B, False, "pad to capacity"),
]
_FP8 = [
    ("--fp8-format", str, None, "e4m3 or hybrid (TE FP8 for the dense layers; FP8-Flow needs e4m3)"),
    ("--fp8-recipe", str, "delayed", "delayed, tensorwise, mxfp8, blockwise"),
]
_PARALLEL = [
    ("--tensor-model-parallel-size", int, 1, "TP"),
    ("--pipeline-model-parallel-size", int, 1, "PP (this trainer runs PP=1)"),
    ("--expert-model-parallel-size", int, 1, "EP"),
    ("--expert-tensor-parallel-size", int, 1, "expert TP"),
    ("--decoder-first-pipeline-num-layers", int, None, "layers on the first PP stage"),
    ("--decoder-last-pipeline-num-layers", int, None, "layers on the last PP stage"),
    ("--use-distributed-optimizer", _B, False, "shard optimizer state over DP"),
    ("--overlap-grad-reduce", _B, False, "overlap the gradient reduce-scatter/all-reduce with backward"),
    ("--overlap-param-gather", _B, False, "overlap the distributed optimizer's parameter all-gather with forward"),
    ("--gradient-accumulation-fusion", _B, None,
     "accumulate weight gradients straight into fp32 main_grad (default: on where TE and apex allow it)"),
    ("--distributed-backend", str, None, "nccl or gloo (default: nccl with CUDA, else gloo)"),
    ("--recompute-granularity", str, None, "full or selective"),
    ("--recompute-method", str, None, "uniform or block"),
    ("--recompute-num-layers", int, None, "layers per recompute unit"),
]
_TRAIN = [
    ("--seq-length", int, 128, "tokens per sample"),
    ("--max-position-embeddings", int, None, "max positions (default seq length)"),
    ("--micro-batch-size", int, 4, "samples per micro-batch per DP rank"),
    ("--global-batch-size", int, None, "samples per iteration (default micro x DP)"),
    ("--train-iters", int, 100, "iterations"),
    ("--lr", float, 1e-3, "peak learning rate"),
    ("--min-lr", float, 0.0, "final learning rate"),
    ("--lr-decay-style", str, "cosine", "constant, linear or cosine"),
    ("--lr-warmup-iters", int, 0, "warmup iterations"),
    ("--adam-beta1", float, 0.9, "Adam beta1"),
    ("--adam-beta2", float, 0.999, "Adam beta2"),
    ("--adam-eps", float, 1e-8, "Adam eps"),
    ("--weight-decay", float, 0.01, "weight decay"),
    ("--clip-grad", float, 1.0, "gradient clipping norm"),
    ("--log-interval", int, 10, "iterations per log line"),
    ("--eval-interval", int, 50, "iterations between evaluations"),
    ("--eval-iters", int, 2, "batches per evaluation"),
    ("--save", str, None, "checkpoint directory"),
    ("--save-interval", int, None, "iterations between checkpoints"),
    ("--load", str, None, "resume from this checkpoint directory"),
    ("--exit-duration-in-mins", float, None, "stop cleanly after this many minutes of training (saving a checkpoint "
     "with --save), as Megatron-LM"),
    ("--output-dir", str, None, "where the loss curve and metrics go (default runs/<config name>)"),
    ("--tensorboard-dir", str, None, "TensorBoard logs (needs the tensorboard package)"),
]
_DATA = [
    ("--data-path", str, None, "indexed dataset prefixes (weights allowed); default: the embedded text"),
    ("--train-data-path", str, None, "training-split prefixes (weights allowed); with per-split paths --split is "
     "ignored and --data-path must not be given"),
    ("--valid-data-path", str, None, "validation-split prefixes (weights allowed); per-split paths without it: "
     "no evaluation"),
    ("--test-data-path", str, None, "test-split prefixes (weights allowed)"),
    ("--data-cache-path", str, None, "index cache directory"),
    ("--split", str, "969,30,1", "train,valid,test weights"),
    ("--tokenizer-type", str, "ByteTokenizer", "ByteTokenizer or NullTokenizer"),
    ("--vocab-size", int, None, "NullTokenizer vocabulary"),
    ("--make-vocab-size-divisible-by", int, 128, "pad the vocabulary"),
]
_SPECIAL = {"--untie-embeddings-and-output-weights"}
# Megatron-LM's list-valued path flags: [prefix ...] or [weight prefix weight prefix ...].
_PATH_FLAGS = {"--data-path", "--train-data-path", "--valid-data-path", "--test-data-path"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m fp8flow_megatron.train",
        description="Train a GPT MoE model on megatron-core with FP8-Flow-MoE (defaults: configs/tiny_cpu.yaml).",
    )
    p.add_argument("--config", default=None, help="YAML of flag dest names -> values (command-line flags override)")
    for title, table in (("model", _MODEL), ("moe", _MOE), ("fp8", _FP8), ("parallel", _PARALLEL), ("training", _TRAIN), ("data", _DATA)):
        g = p.add_argument_group(title)
        for flag, typ, default, help_ in table:
            if typ == _B:
                g.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_)
            elif flag in _PATH_FLAGS:
                g.add_argument(flag, nargs="+", default=default, help=help_)
            else:
                g.add_argument(flag, type=typ, default=default, help=help_)
    # Megatron-LM spells this one negatively; the YAML key is its dest, add_bias_linear.
    p.add_argument("--disable-bias-linear", dest="add_bias_linear", action="store_false", default=True)
    p.add_argument("--add-bias-linear", dest="add_bias_linear", action="store_true")
    p.add_argument("--recompute-modules", nargs="*", default=None, help="selective recompute modules")
    add_fp8_flow_args(p)
    return p


def parse_moe_layer_freq(value: Any, num_layers: int):
    """Megatron's --moe-layer-freq: an int k (every k-th layer is MoE) or a list expression like ([0]+[1]*26)."""
    if isinstance(value, int):
        return value
    text = str(value).strip()
    if text.lstrip("-").isdigit():
        return int(text)
    pattern = eval(text, {"__builtins__": {}}, {})  # Megatron-LM evaluates the same expression
    if not isinstance(pattern, list) or len(pattern) != num_layers:
        raise ValueError(f"--moe-layer-freq {text!r} must give a list of {num_layers} 0/1 entries")
    return pattern


def transformer_config_from_args(args: argparse.Namespace, use_te: bool):
    """TransformerConfig (MLATransformerConfig with --multi-latent-attention) from the trainer's flags.

    Without TE (CPU) the dense layers cannot run TE FP8, so config.fp8 stays None there; the MoE experts still run the
    FP8-Flow dataflow (emulated exactly by fp8flow_megatron.numerics) because that is keyed on config.moe_fp8_flow.
    """
    from megatron.core.transformer.transformer_config import MLATransformerConfig, TransformerConfig

    cls = MLATransformerConfig if args.multi_latent_attention else TransformerConfig
    names = {f.name for f in dataclasses.fields(cls)}
    kw: Dict[str, Any] = {k: v for k, v in vars(args).items() if k in names and v is not None}
    kw.update(
        num_moe_experts=args.num_experts,
        moe_layer_freq=parse_moe_layer_freq(args.moe_layer_freq, args.num_layers),
        gated_linear_unit=args.swiglu,
        activation_func=F.silu if args.swiglu else F.gelu,
        params_dtype=torch.bfloat16 if args.bf16 else torch.float32,
        pipeline_dtype=torch.bfloat16 if args.bf16 else torch.float32,
        ffn_hidden_size=args.ffn_hidden_size or 4 * args.hidden_size,
        num_query_groups=args.num_query_groups if args.group_query_attention else None,
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        bias_dropout_fusion=False,
        gradient_accumulation_fusion=bool(args.gradient_accumulation_fusion),
        num_layers_in_first_pipeline_stage=args.decoder_first_pipeline_num_layers,
        num_layers_in_last_pipeline_stage=args.decoder_last_pipeline_num_layers,
        # no CUDA graph scope, without megatron-core 0.16.1's deprecation warning (compat.cuda_graph_off_kwargs).
        # This trainer does not capture CUDA graphs.
        **cuda_graph_off_kwargs(names),
    )
    if args.multi_latent_attention and args.rope_type is None:
        kw.pop("rope_type", None)
    if use_te and args.fp8_format:
        kw.update(fp8=args.fp8_format, fp8_recipe=args.fp8_recipe)
    else:
        kw.pop("fp8_recipe", None)
    config = cls(**kw)
    return config
