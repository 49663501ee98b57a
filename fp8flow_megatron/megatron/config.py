"""FP8-Flow flags, the validated config object, and YAML loading with the flags' own names.

Flags (Megatron style, usable as Megatron-LM's extra_args_provider):
  --moe-fp8-flow           FP8-Flow dataflow for the routed experts (needs --fp8-format e4m3 --fp8-recipe blockwise).
  --moe-expert-recompute   Expert-level recompute: keep only the FP8 fc1 input and recompute fc1 -> SwiGLU in backward
                           (the `moe_expert` recompute module of upstream PR Megatron-LM#2764, as a flag because
                           megatron-core 0.16 rejects unknown --recompute-modules entries).
  --moe-fp8-flow-gemm      auto | triton | te | te_grouped: who runs the experts' FP8 grouped GEMMs on CUDA.
  --moe-fp8-flow-cuda-graph  CUDA-graph capture of each FP8-Flow MoE layer's dispatch + experts + combine, forward
                           and backward (EP=1, Triton engine; megatron/cuda_graph.py). Megatron's own CUDA graphs
                           (--cuda-graph-impl, --enable-cuda-graph, --external-cuda-graph) stay refused with FP8-Flow.
  --disable-parameter-transpose-cache  megatron-core's TransformerConfig field of that name (Megatron-LM has no flag
                           for it): no FP8 weight cache across micro-batches, and no transposed FP8 expert weights held
                           from forward to backward (megatron/experts.py).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

import yaml

from ..ops.gemm_engine import GEMM_ENGINES, te_available

GEMM_ALIGN = 16  # TE's blockwise GEMM needs every non-empty expert's rows to be a multiple of 8; 16 as megatron pads
BLOCK = 128


# "triton": one Triton launch per grouped GEMM for all experts; "te": TE's grouped GEMM (one cuBLASLt call per expert);
# "te_grouped": TE's single-launch grouped-tensor GEMM (Hopper, cuBLASLt >= 13.6; ops/te_grouped_gemm.py);
# "auto" (default): te for a layer with <= 32 local experts, else triton -- each where it measured faster
# (ops.gemm_engine.resolve_gemm_engine, BENCHMARKS.md).
DEFAULT_GEMM = "auto"


class FP8FlowConfigError(ValueError):
    """A configuration FP8-Flow cannot run; the message names each offending flag and the fix."""


@dataclass(frozen=True)
class FP8FlowConfig:
    enabled: bool = False  # --moe-fp8-flow
    expert_recompute: bool = False  # --moe-expert-recompute
    gemm: str = DEFAULT_GEMM  # --moe-fp8-flow-gemm: who runs the experts' FP8 GEMMs on CUDA
    # --moe-fp8-flow-cuda-graph: replay the layer's dispatch + experts + combine (fwd and bwd) from CUDA graphs; the
    # layer is host-issue bound at EP=1 (~22-24 ms wall for ~17.5 ms of kernels at DeepSeek-V2-Lite shapes)
    cuda_graph: bool = False
    align: int = GEMM_ALIGN  # rows per expert are padded to a multiple of this inside the dispatcher

    @classmethod
    def from_source(cls, src: Any) -> "FP8FlowConfig":
        return cls(
            enabled=bool(_get(src, "moe_fp8_flow", default=False)),
            expert_recompute=bool(_get(src, "moe_expert_recompute", default=False)),
            gemm=_get(src, "moe_fp8_flow_gemm", default=DEFAULT_GEMM) or DEFAULT_GEMM,
            cuda_graph=bool(_get(src, "moe_fp8_flow_cuda_graph", default=False)),
        )


def _has_option(parser: argparse.ArgumentParser, option: str) -> bool:
    return any(option in action.option_strings for action in parser._actions)


def add_fp8_flow_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the FP8-Flow flags; chainable as Megatron-LM's extra_args_provider (returns the parser).

    A flag that already exists (e.g. a future upstream TransformerConfig.moe_fp8_flow field turned into a flag) is not
    added again.
    """
    group = parser.add_argument_group(title="FP8-Flow MoE (fp8flow_megatron)")
    if not _has_option(parser, "--moe-fp8-flow"):
        group.add_argument(
            "--moe-fp8-flow",
            action=argparse.BooleanOptionalAction,
            default=False,
            help="Casting-free FP8 dataflow for the routed experts: tokens quantized once (1x128, E4M3, power-of-two "
            "scales) before the expert all-to-all and kept FP8 through the grouped GEMMs. Needs --fp8-format e4m3 "
            "--fp8-recipe blockwise --moe-token-dispatcher-type alltoall --moe-grouped-gemm --swiglu.",
        )
    if not _has_option(parser, "--moe-expert-recompute"):
        group.add_argument(
            "--moe-expert-recompute",
            action=argparse.BooleanOptionalAction,
            default=False,
            help="With --moe-fp8-flow: keep only the FP8 fc1 input of the experts and recompute fc1 -> SwiGLU in "
            "backward instead of storing BF16 activations (upstream's `moe_expert` recompute module).",
        )
    if not _has_option(parser, "--moe-fp8-flow-gemm"):
        group.add_argument(
            "--moe-fp8-flow-gemm",
            choices=GEMM_ENGINES,
            default=DEFAULT_GEMM,
            help="With --moe-fp8-flow on CUDA: who runs the experts' blockwise-FP8 grouped GEMMs. triton: "
            "fp8flow_megatron's kernels, one launch per GEMM for all experts; te: TransformerEngine's grouped GEMM "
            "(one cuBLASLt call per expert); te_grouped: TE's single-launch grouped-tensor GEMM, counts on the device "
            "(Hopper, TE 2.20, run-time cuBLASLt >= 13.6); auto (default): te_grouped where it can run, else te when a "
            "layer holds <= 32 local experts (e.g. 64 experts at EP>=2), else triton. All read the same FP8 operands.",
        )
    if not _has_option(parser, "--moe-fp8-flow-cuda-graph"):
        group.add_argument(
            "--moe-fp8-flow-cuda-graph",
            action=argparse.BooleanOptionalAction,
            default=False,
            help="With --moe-fp8-flow at EP=1 on the Triton GEMM engine: capture each MoE layer's dispatch, experts "
            "and combine (forward and backward) as CUDA graphs at its second training call and replay them; the "
            "router, aux losses and shared experts stay eager, the expert weights are re-quantized eagerly once per "
            "step into the buffers the graphs read. Experimental: refused unless FP8FLOW_EXPERIMENTAL_CUDA_GRAPH=1 "
            "(its backward capture fails inside megatron's training loop). Evaluation, logged (telemetry) "
            "iterations and a new input shape's first call run eager. Not with megatron's --cuda-graph-impl.",
        )
    if not _has_option(parser, "--disable-parameter-transpose-cache"):
        # megatron-core's TransformerConfig.disable_parameter_transpose_cache, which Megatron-LM has no flag for: the
        # dest is the field's name, so Megatron-LM's core_transformer_config_from_args (and this package's trainer)
        # carry it onto the config, where TE's linears read it too
        group.add_argument(
            "--disable-parameter-transpose-cache",
            action=argparse.BooleanOptionalAction,
            default=False,
            help="megatron-core's TransformerConfig.disable_parameter_transpose_cache: no FP8 weight copy is cached "
            "across micro-batches (TE's linears and FP8-Flow's experts quantize their weights on every call), and "
            "FP8-Flow's experts hold no FP8 weight copy at all (each GEMM's codes are made right before it and "
            "freed after; Triton engine): two E*N*K-byte copies per expert linear less, for two weight "
            "quantizations per linear per micro-batch. Not with --moe-fp8-flow-cuda-graph.",
        )
    return parser


def _get(src: Any, *names: str, default=None):
    for name in names:
        if isinstance(src, dict) and name in src:
            return src[name]
        if hasattr(src, name):
            return getattr(src, name)
    return default


def _is_swiglu(src: Any) -> bool:
    if _get(src, "swiglu") is not None:
        return bool(_get(src, "swiglu"))
    import torch.nn.functional as F

    return bool(_get(src, "gated_linear_unit", default=False)) and _get(src, "activation_func") is F.silu


# (flag, dest, why): MoE flags of megatron-core 0.16.1 / 0.19.2 that FP8-Flow's layer does not implement, each refused
# at start. A flag that the installed megatron-core does not have (0.19 removed --moe-use-legacy-grouped-gemm and
# --moe-extended-tp; 0.16 lacks --overlap-dispatch-backward-with-experts-wgrad) is absent from args and passes.
_UNSUPPORTED_WITH_FP8_FLOW = (
    ("--delay-wgrad-compute", "delay_wgrad_compute", "splits the experts' weight gradients out of their backward "
     "(megatron's backward_dw); FP8-Flow's experts compute wgrad inside their fused backward."),
    ("--overlap-moe-expert-parallel-comm", "overlap_moe_expert_parallel_comm", "runs megatron's A2A-overlap "
     "schedule, which no test has run with FP8-Flow's FP8 payloads yet."),
    ("--moe-shared-expert-overlap", "moe_shared_expert_overlap", "overlaps the shared experts with the dispatcher on "
     "a side CUDA stream, which no test has run with FP8-Flow's dispatcher yet (the shared experts work without it)."),
    ("--moe-permute-fusion", "moe_permute_fusion", "selects TE's fused permute for megatron's dispatcher; FP8-Flow's "
     "dispatcher replaces that permute with its own fused permute+pad of FP8 codes, so the flag would do nothing."),
    ("--moe-use-legacy-grouped-gemm", "moe_use_legacy_grouped_gemm", "selects megatron's legacy GroupedMLP; "
     "FP8-Flow replaces the experts, so the flag would do nothing."),
    ("--moe-enable-deepep", "moe_enable_deepep", "selects DeepEP's dispatcher; FP8-Flow's dispatcher is all-to-all "
     "based."),
    ("--moe-extended-tp", "moe_extended_tp", "shards experts over tensor-parallel ranks; FP8-Flow needs expert "
     "tensor-parallel size 1."),
    ("--moe-token-dropping", "moe_token_dropping", "drops tokens; FP8-Flow is dropless."),
    ("--overlap-dispatch-backward-with-experts-wgrad", "overlap_dispatch_backward_with_experts_wgrad", "delays the "
     "experts' weight gradients to a side stream (megatron-core 0.19, backward_dw); FP8-Flow's experts compute wgrad "
     "inside their fused backward."),
    ("--moe-router-padding-for-fp8", "moe_router_padding_for_fp8", "pads the routing for FP8 GEMMs; FP8-Flow pads "
     "each expert inside its fused permute without sending extra tokens."),
    ("--moe-router-fusion", "moe_router_fusion", "runs TE's fused router kernels, which no FP8-Flow test has run on a "
     "GPU yet (megatron's unfused router, tested with FP8-Flow under every routing flag, computes the same routing)."),
    ("--use-megatron-fsdp", "use_megatron_fsdp", "shards the parameters and gathers them around each module's forward "
     "and backward; no FP8-Flow test has run under it (the experts quantize their whole BF16 weights once per step "
     "and read them again in backward, which FSDP's resharding may have released). The distributed optimizer "
     "(--use-distributed-optimizer, also with --overlap-param-gather) is tested with FP8-Flow."),
    ("--use-torch-fsdp2", "use_torch_fsdp2", "wraps the model in torch's FSDP2, which no FP8-Flow test has run under "
     "(see --use-megatron-fsdp); use --use-distributed-optimizer."),
)


def _cuda_without_te() -> bool:
    """A GPU is here but TransformerEngine does not import (the --moe-fp8-flow-gemm te engine cannot run); on CPU the
    experts run the numerics spec whatever the engine."""
    import torch

    return torch.cuda.is_available() and not te_available()


def _te_grouped_unsupported() -> str:
    """Why the te_grouped engine cannot run on this GPU ("" when it can, and on CPU, where the experts run the
    numerics spec whatever the engine)."""
    import torch

    if not torch.cuda.is_available():
        return ""
    from ..ops.te_grouped_gemm import te_grouped_support

    return te_grouped_support()[1]


def validation_errors(src: Any) -> List[str]:
    """Every reason the configuration cannot run FP8-Flow, as actionable messages (empty when fine or disabled).

    src: Megatron-LM args (argparse.Namespace), a TransformerConfig, or a dict with the same names.
    """
    fp8_flow = FP8FlowConfig.from_source(src)
    errors: List[str] = []
    if not fp8_flow.enabled:
        if fp8_flow.expert_recompute:
            errors.append("--moe-expert-recompute only applies with --moe-fp8-flow. Fix: add --moe-fp8-flow or drop it.")
        if fp8_flow.cuda_graph:
            errors.append("--moe-fp8-flow-cuda-graph only applies with --moe-fp8-flow. Fix: add --moe-fp8-flow or drop "
                          "it.")
        return errors

    def need(ok: bool, msg: str) -> None:
        if not ok:
            errors.append(msg)

    need(
        fp8_flow.gemm in GEMM_ENGINES,
        f"--moe-fp8-flow-gemm is {fp8_flow.gemm!r}. Fix: --moe-fp8-flow-gemm auto (default), triton, te or te_grouped "
        f"(YAML moe_fp8_flow_gemm: auto).",
    )
    fmt = _get(src, "fp8", "fp8_format")
    need(
        fmt == "e4m3",
        f"--fp8-format is {fmt!r}; FP8-Flow keeps activations and gradients in E4M3. Fix: --fp8-format e4m3 "
        f"(YAML fp8_format: e4m3).",
    )
    recipe = _get(src, "fp8_recipe")
    recipe = getattr(recipe, "value", recipe)
    need(
        recipe == "blockwise",
        f"--fp8-recipe is {recipe!r}; FP8-Flow uses 1x128 / 128x128 blockwise scaling with power-of-two scales. "
        f"Fix: --fp8-recipe blockwise (YAML fp8_recipe: blockwise).",
    )
    dispatcher = _get(src, "moe_token_dispatcher_type")
    need(
        dispatcher == "alltoall",
        f"--moe-token-dispatcher-type is {dispatcher!r}; FP8-Flow's dispatcher is all-to-all based (flex/DeepEP is "
        f"not supported yet). Fix: --moe-token-dispatcher-type alltoall.",
    )
    need(_get(src, "num_moe_experts", "num_experts") is not None, "FP8-Flow is for MoE models. Fix: set --num-experts.")
    hidden = _get(src, "hidden_size")
    need(
        hidden is not None and hidden % BLOCK == 0,
        f"--hidden-size {hidden} is not a multiple of 128; FP8-Flow's 1x128 blocks must tile the hidden dimension. "
        f"Fix: use a hidden size divisible by 128.",
    )
    ffn = _get(src, "moe_ffn_hidden_size")
    if ffn is None:
        ffn = _get(src, "ffn_hidden_size")
    need(
        ffn is not None and ffn % BLOCK == 0,
        f"--moe-ffn-hidden-size {ffn} is not a multiple of 128; the fused SwiGLU+quant tiles it in 1x128 blocks. "
        f"Fix: use a multiple of 128 (DeepSeek-V2-Lite's 1408 = 11*128 works).",
    )
    need(_is_swiglu(src), "FP8-Flow experts are SwiGLU (the fused weighted SwiGLU+quant kernel). Fix: add --swiglu.")
    need(
        bool(_get(src, "moe_grouped_gemm", default=False)),
        "FP8-Flow runs the experts as grouped GEMMs. Fix: add --moe-grouped-gemm.",
    )
    router_dtype = _get(src, "moe_router_dtype")
    need(
        router_dtype == "fp32",
        f"--moe-router-dtype is {router_dtype!r}; the router and aux loss must run in fp32 next to FP8 experts. "
        f"Fix: --moe-router-dtype fp32.",
    )
    etp = _get(src, "expert_tensor_parallel_size", default=1) or 1
    need(etp == 1, f"--expert-tensor-parallel-size {etp} is not supported with FP8-Flow. Fix: --expert-tensor-parallel-size 1.")
    tp = _get(src, "tensor_model_parallel_size", default=1) or 1
    need(tp == 1, f"--tensor-model-parallel-size {tp} is not supported with FP8-Flow yet. Fix: use TP=1 with EP/DP.")
    need(
        _get(src, "moe_expert_capacity_factor") is None and not _get(src, "moe_pad_expert_input_to_capacity", default=False),
        "Token dropping (--moe-expert-capacity-factor / --moe-pad-expert-input-to-capacity) is not supported with "
        "FP8-Flow. Fix: remove them (dropless).",
    )
    need(
        not _get(src, "moe_router_padding_for_quantization", default=False),
        "--moe-router-padding-for-quantization is redundant with FP8-Flow, which pads each expert inside its fused "
        "permute without sending extra tokens. Fix: remove the flag.",
    )
    need(
        not _get(src, "add_bias_linear", default=False),
        "FP8-Flow experts have no bias. Fix: add --disable-bias-linear.",
    )
    need(not _get(src, "moe_apply_probs_on_input", default=False), "--moe-apply-probs-on-input is not supported with FP8-Flow. Fix: remove it.")
    need(_get(src, "moe_latent_size") is None, "--moe-latent-size is not supported with FP8-Flow. Fix: remove it.")
    need(
        not (_get(src, "fp8_param_gather", default=False) or _get(src, "fp8_param", default=False)),
        "--fp8-param-gather keeps the weights as TE FP8 tensors that TE requantizes inside the optimizer step; "
        "FP8-Flow's experts quantize their BF16 weights themselves once per step (and its 128x128 codes are not TE's "
        "parameter storage), so the experts would read neither copy correctly. Fix: drop --fp8-param-gather (the "
        "BF16 parameter all-gather of the distributed optimizer works with FP8-Flow, also with "
        "--overlap-param-gather).",
    )
    for flag, dest, why in _UNSUPPORTED_WITH_FP8_FLOW:
        need(not _get(src, dest, default=False), f"{flag} {why} Fix: remove {flag} (or run without --moe-fp8-flow).")
    graph_impl = _get(src, "cuda_graph_impl", default="none") or "none"
    need(
        graph_impl == "none" and not _get(src, "enable_cuda_graph", default=False)
        and not _get(src, "external_cuda_graph", default=False),
        f"megatron's CUDA graphs (--cuda-graph-impl {graph_impl}, --enable-cuda-graph, --external-cuda-graph) are not "
        f"supported with FP8-Flow: they capture whole transformer layers with megatron's own graph manager, which "
        f"knows neither FP8-Flow's per-step weight quantization nor its device-side row groups, and no such capture "
        f"is tested. Fix: --cuda-graph-impl none, and add --moe-fp8-flow-cuda-graph to graph the FP8-Flow MoE "
        f"layers (EP=1, --moe-fp8-flow-gemm triton).",
    )
    if fp8_flow.cuda_graph:
        errors.extend(_cuda_graph_errors(src, fp8_flow))
    need(
        fp8_flow.gemm != "te" or not _cuda_without_te(),
        "--moe-fp8-flow-gemm te needs TransformerEngine, which does not import here; without it the experts would run "
        "the dequantize -> fp32 reference GEMMs (orders of magnitude slower). Fix: pip install "
        "'transformer-engine[pytorch]>=2.12', or --moe-fp8-flow-gemm triton (or auto).",
    )
    te_grouped_reason = _te_grouped_unsupported() if fp8_flow.gemm == "te_grouped" else ""
    need(
        not te_grouped_reason,
        f"--moe-fp8-flow-gemm te_grouped cannot run here: {te_grouped_reason}.",
    )
    modules = _get(src, "recompute_modules", default=None) or []
    need(
        "moe_act" not in modules,
        "--recompute-modules moe_act recomputes a BF16 activation FP8-Flow never stores. Fix: use "
        "--moe-expert-recompute instead.",
    )
    return errors


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _cuda_graph_errors(src: Any, fp8_flow: FP8FlowConfig) -> List[str]:
    """Why --moe-fp8-flow-cuda-graph cannot run with this configuration (megatron/cuda_graph.py says why each holds)."""
    errors: List[str] = []
    flag = "--moe-fp8-flow-cuda-graph"

    def need(ok: bool, msg: str) -> None:
        if not ok:
            errors.append(f"{flag} {msg}")

    import os

    # Known broken in training (H200, 2026-12-02): the layer captures and replays bit-identically on its own
    # (tests/ops/test_gpu_cuda_graph_layer.py), but inside the trainer (megatron-core's schedule, DDP, distributed
    # optimizer) the backward capture fails with cudaErrorStreamCaptureImplicit (an op on the legacy stream during
    # capture, not yet located), and the captured layer measured 0.93x its eager twin (BENCHMARKS.md). Until both are
    # fixed the flag is refused unless asked for explicitly, rather than crashing a run at its second step.
    need(
        os.environ.get("FP8FLOW_EXPERIMENTAL_CUDA_GRAPH") == "1",
        "is experimental and known to fail inside megatron's training loop (backward capture: "
        "cudaErrorStreamCaptureImplicit), and it measured no speedup (0.93x eager). Fix: drop the flag; to try it "
        "anyway (layer benchmarks, debugging), set FP8FLOW_EXPERIMENTAL_CUDA_GRAPH=1.",
    )
    ep = _get(src, "expert_model_parallel_size", default=1) or 1
    experts = _get(src, "num_moe_experts", "num_experts")
    local = experts // ep if experts else None
    resolves_te = fp8_flow.gemm in ("te", "te_grouped") or (fp8_flow.gemm == "auto" and local is not None and local <= 32)
    need(
        not resolves_te,
        f"needs the Triton GEMM engine, whose kernels read the expert row counts on the device (a capturable, "
        f"sync-free layer); --moe-fp8-flow-gemm {fp8_flow.gemm} runs TE's grouped GEMM here (host m_splits for te; "
        f"te_grouped's capture is untested). Fix: --moe-fp8-flow-gemm triton.",
    )
    need(
        not _get(src, "disable_parameter_transpose_cache", default=False),
        "reads the expert weights' FP8 codes from persistent buffers refreshed before each replay, which "
        "--disable-parameter-transpose-cache (no FP8 weight copy held) drops. Fix: use one of the two flags.",
    )
    need(
        ep == 1,
        f"needs --expert-model-parallel-size 1 (got {ep}): with EP>1 the dispatcher's all-to-all splits are host "
        f"values that change every step. Fix: --expert-model-parallel-size 1, or drop {flag}.",
    )
    pp = _get(src, "pipeline_model_parallel_size", default=1) or 1
    need(
        pp == 1,
        f"needs --pipeline-model-parallel-size 1 (got {pp}): a graph keeps one micro-batch's activations, and "
        f"pipeline schedules run several forwards before their backwards. Fix: PP=1, or drop {flag}.",
    )
    need(
        not fp8_flow.expert_recompute,
        f"does not capture --moe-expert-recompute (untested in a graph). Fix: drop --moe-expert-recompute or {flag}.",
    )
    modules = _get(src, "recompute_modules", default=None) or []
    granularity = _get(src, "recompute_granularity")
    need(
        granularity != "full" and not (granularity == "selective" and "moe" in modules),
        f"does not run under layer recompute (--recompute-granularity full, or --recompute-modules moe): the "
        f"recomputed forward would replay a graph whose activations another micro-batch may own (untested). Fix: "
        f"drop that recompute, or drop {flag}.",
    )
    need(
        not (_get(src, "fine_grained_activation_offloading", default=False) or _get(src, "cpu_offloading", default=False)),
        f"does not run with activation offloading (--fine-grained-activation-offloading / --cpu-offloading): the "
        f"graph's saved activations live in its own memory pool, which offloading cannot move. Fix: drop the "
        f"offloading, or drop {flag}.",
    )
    need(_cuda_available(), f"needs a CUDA device (none here). Fix: drop {flag} on CPU.")
    return errors


def validate_fp8_flow(src: Any) -> FP8FlowConfig:
    """Raise FP8FlowConfigError listing every problem; return the FP8FlowConfig when the configuration is valid."""
    errors = validation_errors(src)
    if errors:
        raise FP8FlowConfigError("FP8-Flow configuration is invalid:\n  - " + "\n  - ".join(errors))
    return FP8FlowConfig.from_source(src)


def apply_to_transformer_config(config: Any, fp8_flow: FP8FlowConfig) -> Any:
    """Carry the FP8-Flow settings on megatron's TransformerConfig as plain attributes (they survive deepcopy, and
    core_transformer_config_from_args may swap the config class, e.g. to MLATransformerConfig)."""
    config.moe_fp8_flow = fp8_flow.enabled
    config.moe_expert_recompute = fp8_flow.expert_recompute
    config.moe_fp8_flow_gemm = fp8_flow.gemm
    config.moe_fp8_flow_cuda_graph = fp8_flow.cuda_graph
    return config


# ----------------------------------------------------------------------------------------------------------- YAML


class _UniqueKeyLoader(yaml.SafeLoader):
    pass


def _construct_unique_mapping(loader, node, deep=False):
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise FP8FlowConfigError(f"duplicate key {key!r} in YAML config (line {key_node.start_mark.line + 1})")
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping)


def load_yaml(path: str) -> Dict[str, Any]:
    """A flat mapping of flag dest names (underscored) to values; duplicate keys are errors."""
    with open(path, encoding="utf-8") as f:
        data = yaml.load(f, Loader=_UniqueKeyLoader) or {}
    if not isinstance(data, dict):
        raise FP8FlowConfigError(f"{path}: a YAML config must be a mapping of flag names to values")
    return data


def parse_args_with_yaml(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse flags with an optional --config YAML whose keys are the flags' dest names (``--moe-fp8-flow`` ->
    ``moe_fp8_flow``). YAML values become defaults, so flags on the command line override them; unknown keys are
    errors that list the close matches."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    known, _ = pre.parse_known_args(argv)
    if known.config:
        values = load_yaml(known.config)
        dests = {a.dest: a for a in parser._actions}
        unknown = sorted(k for k in values if k not in dests or k == "help")
        if unknown:
            import difflib

            hints = [
                f"{k!r}" + (f" (did you mean {difflib.get_close_matches(k, dests, n=1)[0]!r}?)" if difflib.get_close_matches(k, dests, n=1) else "")
                for k in unknown
            ]
            raise FP8FlowConfigError(f"{known.config}: unknown config keys: {', '.join(hints)}")
        for key, value in values.items():
            action = dests[key]
            if action.type is not None and value is not None and not isinstance(value, (list, bool)):
                value = action.type(value)
            elif action.type is not None and isinstance(value, list):
                value = [action.type(v) for v in value]
            values[key] = value
        parser.set_defaults(**values)
    return parser.parse_args(argv)
