"""FP8FlowMoELayer: megatron's MoELayer with the FP8-Flow dispatcher swapped in when config.moe_fp8_flow is set.

MoELayer picks its dispatcher from a hard-coded if/elif, so the subclass builds the stock layer and then replaces
`token_dispatcher` (sync-free at EP=1 when the experts run the Triton GEMM engine). With the flag off it is exactly
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
        self._tag_telemetry_sites()

    def set_layer_number(self, layer_number: int) -> None:
        super().set_layer_number(layer_number)
        self._tag_telemetry_sites()

    def _tag_telemetry_sites(self) -> None:
        # FP8 health sites carry the layer ("layer3/tokens"), as megatron's router names its aux losses per layer
        prefix = f"layer{self.layer_number}/" if self.layer_number is not None else ""
        for part in (self.token_dispatcher, self.experts):
            if hasattr(part, "telemetry_prefix"):
                part.telemetry_prefix = prefix
