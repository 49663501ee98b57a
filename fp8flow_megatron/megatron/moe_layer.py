"""FP8FlowMoELayer: megatron's MoELayer with the FP8-Flow dispatcher swapped in when config.moe_fp8_flow is set.

MoELayer picks its dispatcher from a hard-coded if/elif, so the subclass builds the stock layer and then replaces
`token_dispatcher` (sync-free at EP=1 when the experts run the Triton GEMM engine). With --moe-fp8-flow-cuda-graph its
training forwards replay the routed-expert region from CUDA graphs (cuda_graph.py). With the flag off it is exactly
MoELayer.
"""

from __future__ import annotations

from megatron.core.transformer.moe.moe_layer import MoELayer

from .config import FP8FlowConfig
from .token_dispatcher import FP8FlowTokenDispatcher


class FP8FlowMoELayer(MoELayer):
    def __init__(self, config, submodules=None, layer_number=None, pg_collection=None, **kwargs):
        if pg_collection is None:
            # TransformerLayer passes pg_collection only to the exact stock MoE classes (megatron-core 0.16): use the
            # global parallel state, as MoELayer itself would.
            from megatron.core.transformer.moe.moe_utils import get_default_pg_collection

            pg_collection = get_default_pg_collection()
        super().__init__(config, submodules, layer_number, pg_collection, **kwargs)
        self.fp8_flow = FP8FlowConfig.from_source(config)
        if self.fp8_flow.enabled:
            self.token_dispatcher = FP8FlowTokenDispatcher(
                self.num_local_experts,
                self.local_expert_indices,
                config=self.config,
                pg_collection=pg_collection,
                align=self.fp8_flow.align,
            )
            if self.use_shared_expert and self.shared_expert_overlap:
                self.token_dispatcher.set_shared_experts(self.shared_experts)
            # The Triton and te_grouped GEMM engines take the expert counts on the device, so at EP=1 the dispatcher
            # never reads them on the host (sync-free); TE's per-expert grouped GEMM ("te") needs host m_splits, so
            # with it the counts are read once.
            self.token_dispatcher.sync_free = getattr(self.experts, "gemm_engine", None) in ("triton", "te_grouped")
        self.cuda_graphs = None
        if self.fp8_flow.enabled and self.fp8_flow.cuda_graph:
            from .cuda_graph import MoELayerCudaGraphs

            self.cuda_graphs = MoELayerCudaGraphs(self)  # refuses, with the fix, what it cannot capture
        self._tag_telemetry_sites()

    def forward(self, hidden_states, intermediate_tensors=None, padding_mask=None):
        """MoELayer.forward; with --moe-fp8-flow-cuda-graph, training calls replay the routed-expert region from a
        CUDA graph (megatron/cuda_graph.py says which calls stay eager)."""
        graphs = self.cuda_graphs
        if graphs is None or intermediate_tensors is not None or not graphs.usable(hidden_states):
            return super().forward(hidden_states, intermediate_tensors, padding_mask)
        return graphs.forward(hidden_states, padding_mask)

    def routed_experts_eager(self, hidden_states, probs, routing_map):
        """What MoELayer.forward runs between the router and the shared-expert sum (preprocess -> dispatch ->
        routed_experts_compute -> combine -> postprocess's combine_postprocess), as one function of tensors: the
        region megatron/cuda_graph.py captures."""
        hidden_states, probs = self.token_dispatcher.dispatch_preprocess(hidden_states, routing_map, probs)
        hidden_states, probs = self.dispatch(hidden_states, probs)
        output, _ = self.routed_experts_compute(hidden_states, probs)
        output = self.combine(output)
        return self.token_dispatcher.combine_postprocess(output)

    def set_layer_number(self, layer_number: int) -> None:
        super().set_layer_number(layer_number)
        self._tag_telemetry_sites()

    def _tag_telemetry_sites(self) -> None:
        # FP8 health sites carry the layer ("layer3/tokens"), as megatron's router names its aux losses per layer
        prefix = f"layer{self.layer_number}/" if self.layer_number is not None else ""
        for part in (self.token_dispatcher, self.experts):
            if hasattr(part, "telemetry_prefix"):
                part.telemetry_prefix = prefix
