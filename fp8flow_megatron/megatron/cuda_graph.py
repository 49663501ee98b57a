"""--moe-fp8-flow-cuda-graph: each FP8-Flow MoE layer replays its dispatch + experts + combine from CUDA graphs.

Why: at EP=1 the sync-free layer is host-issue bound (DeepSeek-V2-Lite layer, 16k tokens: ~22-24 ms wall for
~17.5 ms of kernels), and a graph replay issues the whole region in one launch.

What is captured, per layer and per input signature (shapes, dtypes), forward and backward (ops/graphs.py):
    dispatch_preprocess (cast #1, device row maps, permute + pad) -> token_dispatch (identity at EP=1)
    -> dispatch_postprocess -> experts (fc1, SwiGLU + quant, fc2; backward: cast #2, dgrads, transposes, wgrads,
    main_grad accumulation) -> combine_preprocess / token_combine (identities) -> combine_postprocess (unpermute)
What stays eager, and why:
- the router (gating, top-k, MoEAuxLossAutoScaler on the probs, z-loss, the aux-loss tracker's in-place adds, the
  expert-bias token counts): Python side effects and megatron state (the tracker is re-created and the aux-loss scale
  reset by the schedule) that a replay would not redo. The graph takes the router's probs and routing map as inputs
  and returns the probs' gradient, so the aux-loss gradients join it in autograd as they do eagerly.
- the shared experts: TE linears with their own FP8 weight caches and fp8_autocast state.
- the expert weight quantization: on megatron's step signal (set_is_first_microbatch), eagerly before the replay,
  into the persistent buffers the graph reads (FP8FlowGroupedMLP.prepare_weights); weights follow the optimizer.
- megatron's gradient_accumulation_fusion bookkeeping: the wgrad kernels inside the graph accumulate into main_grad
  (fixed addresses: megatron's DDP grad buffer), and `grad_added_to_main_grad` is set after each backward replay.
Which calls run eager instead: evaluation / no-grad forwards, the first training call of each input signature (the
warm-up: Triton compilation and autotuning, cached device tables), logged iterations (FP8 health telemetry reads its
tensors on the host), and new signatures once MAX_GRAPHS are held. A signature's second training call captures
(logged); a changed environment -- the guard's flag buffer grew, main_grad or weight buffers moved -- re-captures
(logged). Every replay is bit-identical to the eager layer: same kernels, same inputs, same order.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Dict, Optional, Tuple

import torch

from ..ops.graphs import CapturedFwdBwd
from ..ops.nonfinite import guard
from ..ops.telemetry import monitor
from .config import FP8FlowConfigError

log = logging.getLogger(__name__)

FLAG = "--moe-fp8-flow-cuda-graph"
MAX_GRAPHS = 4  # per layer: each graph keeps its own memory pool (its activations and temporaries)


class MoELayerCudaGraphs:
    """The captured graphs of one FP8FlowMoELayer (owned by the layer, built when config.moe_fp8_flow_cuda_graph)."""

    def __init__(self, layer) -> None:
        problems = []
        experts, dispatcher, config = layer.experts, layer.token_dispatcher, layer.config
        if getattr(experts, "gemm_engine", None) != "triton":
            problems.append(f"the experts run the {getattr(experts, 'gemm_engine', None)!r} GEMM engine; {FLAG} needs "
                            f"the Triton engine (--moe-fp8-flow-gemm triton)")
        if dispatcher.ep_size != 1 or not dispatcher.sync_free:
            problems.append(f"the dispatcher is not the sync-free EP=1 one (EP={dispatcher.ep_size}); {FLAG} needs "
                            f"--expert-model-parallel-size 1")
        if getattr(experts, "expert_recompute", False):
            problems.append(f"{FLAG} does not capture --moe-expert-recompute; drop one of them")
        if getattr(experts, "_transient_weights", False):
            problems.append(f"{FLAG} reads persistent FP8 weight buffers, which --disable-parameter-transpose-cache "
                            f"drops; use one of the two")
        if layer.shared_expert_overlap or getattr(config, "moe_latent_size", None) or layer.moe_layer_recompute:
            problems.append(f"{FLAG} needs no --moe-shared-expert-overlap, --moe-latent-size or 'moe' recompute")
        if problems:
            raise FP8FlowConfigError(f"{FLAG}: " + "; ".join(problems))
        self.layer = layer
        self._graphs: Dict[tuple, Tuple[tuple, CapturedFwdBwd]] = {}
        self._calls: Counter = Counter()
        self.num_captures = 0  # read by tests
        self.num_replays = 0
        self._warned_full = False

    # ----------------------------------------------------------------------------------------------- dispatch
    def usable(self, hidden_states: torch.Tensor) -> bool:
        """Whether this call may take the graphed path (else the layer runs megatron's eager MoELayer.forward)."""
        return (
            self.layer.training
            and torch.is_grad_enabled()
            and hidden_states.is_cuda
            and hidden_states.requires_grad
            and not monitor.enabled  # logged iterations observe FP8 health with host reads
            and not torch.cuda.is_current_stream_capturing()
        )

    def forward(self, hidden_states: torch.Tensor, padding_mask: Optional[torch.Tensor] = None):
        """MoELayer.forward with the routed-expert region graphed: shared experts, router, region, sum."""
        layer = self.layer
        if padding_mask is not None:
            padding_mask = padding_mask.transpose(0, 1).bool()
        shared_expert_output = layer.shared_experts_compute(hidden_states)
        probs, routing_map = layer.route(hidden_states, padding_mask)
        output = self.routed(hidden_states, probs, routing_map)
        if shared_expert_output is not None:
            output = output + shared_expert_output
        return output, None

    def routed(self, hidden_states: torch.Tensor, probs: torch.Tensor, routing_map: torch.Tensor) -> torch.Tensor:
        """The routed-expert region: replayed from this signature's graph, captured now, or run eagerly."""
        signature = (
            tuple(hidden_states.shape), hidden_states.dtype, tuple(probs.shape), probs.dtype, probs.requires_grad,
            tuple(routing_map.shape), routing_map.dtype, hidden_states.device,
        )
        self._calls[signature] += 1
        entry = self._graphs.get(signature)
        if entry is None and (self._calls[signature] < 2 or len(self._graphs) >= MAX_GRAPHS):
            if self._calls[signature] >= 2 and not self._warned_full:
                log.warning("fp8flow: %s layer %s holds %d graphs already; input shape %s runs eager", FLAG,
                            self.layer.layer_number, MAX_GRAPHS, signature[0])
                self._warned_full = True
            return self.layer.routed_experts_eager(hidden_states, probs, routing_map)
        self.layer.experts.prepare_weights(hidden_states.device)  # eager: the step's weight quantization
        environment = self._environment(hidden_states.device)
        if entry is None or entry[0] != environment:
            if entry is not None:
                log.info("fp8flow: %s layer %s: re-capturing for %s (%s changed)", FLAG, self.layer.layer_number,
                         signature[0], self._what_changed(entry[0], environment))
            entry = (environment, self._capture(hidden_states, probs, routing_map))
            self._graphs[signature] = entry
        self.num_replays += 1
        return entry[1](hidden_states, probs, routing_map)

    # ------------------------------------------------------------------------------------------------ capture
    def _params(self):
        experts = self.layer.experts
        return experts._weights(experts.linear_fc1) + experts._weights(experts.linear_fc2)

    _ENV_FIELDS = ("the non-finite guard switch", "the guard's flag buffer", "the expert weights' addresses",
                   "the main_grad buffers", "the cached FP8 weight buffers", "gradient_accumulation_fusion")

    def _environment(self, device) -> tuple:
        """What a captured graph reads by address or was specialized on, outside its inputs."""
        experts = self.layer.experts
        params = self._params()
        fuse = bool(experts.fuse_wgrad_accumulation)
        main_grads = tuple(getattr(p, "main_grad", None) is not None and p.main_grad.data_ptr() for p in params)
        return (
            guard.enabled, guard.buffer_address(device), tuple(p.data_ptr() for p in params),
            main_grads if fuse else (), experts._weight_cache.addresses(), fuse,
        )

    def _what_changed(self, old: tuple, new: tuple) -> str:
        return ", ".join(name for name, a, b in zip(self._ENV_FIELDS, old, new) if a != b) or "nothing"

    def _capture(self, hidden_states, probs, routing_map) -> CapturedFwdBwd:
        experts = self.layer.experts
        params = self._params()
        fuse = bool(experts.fuse_wgrad_accumulation)

        def grads_added_to_main_grad():
            # set by the experts' backward in Python, which a replay does not run; megatron's DDP hook reads it
            for p in params:
                p.grad_added_to_main_grad = True

        graphed = CapturedFwdBwd(
            self.layer.routed_experts_eager, params, clone_param_grads=not fuse,
            after_backward=grads_added_to_main_grad if fuse else None,
        )
        log.info("fp8flow: %s layer %s: capturing dispatch + experts + combine for input %s", FLAG,
                 self.layer.layer_number, tuple(hidden_states.shape))
        try:
            with experts.weights_quantized_outside():
                graphed.capture(hidden_states, probs, routing_map)
        except Exception as exc:
            raise RuntimeError(
                f"fp8flow: capturing the CUDA graph of MoE layer {self.layer.layer_number} failed ({exc}). The region "
                f"must be sync-free (tests/ops/test_gpu_sync_free_layer.py checks it). Fix: run without {FLAG}, and "
                f"report the error."
            ) from exc
        self.num_captures += 1
        return graphed
