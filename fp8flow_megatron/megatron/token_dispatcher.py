"""FP8FlowTokenDispatcher: megatron's all-to-all dispatcher with tokens quantized once and moved as FP8.

It subclasses MoEAlltoAllTokenDispatcher to reuse its split bookkeeping (preprocess), its D2H staging, the
shared-expert overlap hooks and megatron's all_to_all, and keeps the six-method contract, so MoELayer, `moe`
recompute and the A2A-overlap scheduler drive it unchanged. What it changes:

  dispatch_preprocess  quantize 1x128 (cast #1) -> permute codes + scales + probs. With EP=1 the permute writes the
                       final padded expert-major layout directly (permute + pad in one pass).
                       Sync-free at EP=1 (`sync_free`, set by FP8FlowMoELayer when the experts run the Triton GEMM
                       engine): no device -> host read at all. The row maps are built on the device into a buffer of
                       tokens * topk + experts * (align - 1) rows (the worst case), the padded counts stay a device
                       tensor, megatron's D2H staging and its sync point are skipped; rows past the last expert's
                       padded end (the tail) are zero padding rows that nothing downstream reads as data (the expert
                       GEMMs return them as zeros, the combine never reads them). Otherwise the counts are read on
                       the host once and the buffer is exactly sized (the TE engine needs host m_splits anyway).
  token_dispatch       all-to-all of FP8 codes (1 byte/element), and one of fp32 scales (4 bytes per 128 elements) +
                       probs packed row by row: two rendezvous of the EP ranks, as stock megatron, not three.
  dispatch_postprocess chunk sort [rank][expert] -> [expert][rank] fused with padding each local expert to a multiple
                       of 16 rows (the blockwise GEMM alignment). The experts get an Fp8FlowTensor, padded
                       tokens_per_expert (host int64; a device int64 tensor on the sync-free path) and padded probs
                       (0 on padding rows).
  combine_*            BF16 forward (unpad + unsort, all-to-all, unpermute-sum); in backward the combine gradient is
                       quantized once (cast #2) and moves as FP8 all the way to the experts.
"""

from __future__ import annotations

from typing import List, Optional

import torch

from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher

from ..numerics.groups import max_padded_rows
from ..numerics.permute import chunk_sort_pad_maps, compact_dst_rows, routing_rows, routing_rows_static
from ..ops import dispatch as ops
from .config import GEMM_ALIGN


def _as_list(splits) -> Optional[List[int]]:
    if splits is None:
        return None
    if torch.is_tensor(splits):
        return [int(s) for s in splits.tolist()]
    return [int(s) for s in splits]


class FP8FlowTokenDispatcher(MoEAlltoAllTokenDispatcher):
    def __init__(self, num_local_experts, local_expert_indices, config, pg_collection=None, align: int = GEMM_ALIGN):
        super().__init__(num_local_experts, local_expert_indices, config=config, pg_collection=pg_collection)
        if self.tp_size != 1:
            raise ValueError("FP8FlowTokenDispatcher supports expert tensor parallel size 1 only")
        if self.drop_and_pad:
            raise ValueError("FP8FlowTokenDispatcher is dropless; remove --moe-pad-expert-input-to-capacity")
        self.align = align
        self.telemetry_prefix = ""  # "layer{N}/": FP8FlowMoELayer sets it so FP8 health is reported per layer
        # EP=1 without any device -> host read (device row maps over a worst-case buffer, device counts): set by
        # FP8FlowMoELayer when its experts run the Triton engine, which takes the counts on the device.
        self.sync_free = False

    @property
    def _direct(self) -> bool:
        """EP=1: permute straight into the padded expert layout; no all-to-all, no chunk sort."""
        return self.ep_size == 1

    @property
    def _sync_free(self) -> bool:
        return self.sync_free and self._direct

    def dispatch_preprocess(self, hidden_states: torch.Tensor, routing_map: torch.Tensor, probs: torch.Tensor):
        self.hidden_shape = hidden_states.shape
        self.probs = probs
        self.routing_map = routing_map
        assert probs.dim() == 2 and routing_map.dim() == 2 and routing_map.dtype == torch.bool
        hidden_states = hidden_states.view(-1, self.hidden_shape[-1])
        self.tokens_per_expert = self.preprocess(routing_map)
        if self.shared_experts is not None:
            self.shared_experts.pre_forward_comm(hidden_states.view(self.hidden_shape))
        if self._sync_free:
            # Nothing goes to the host: megatron's D2H staging and its sync point are skipped (at EP=1 only
            # tokens_per_expert would be staged, and it is not needed there). At most topk experts per token (megatron's
            # routers), so tokens * topk + experts * (align - 1) rows hold every padded layout.
            num_rows = max_padded_rows(routing_map.shape[0] * self.config.moe_router_topk, routing_map.shape[1], self.align)
            src_rows, prob_src, dst_rows, padded = routing_rows_static(routing_map, self.align, num_rows)
        else:
            # Padding sizes and row maps need the counts on the host now (stock syncs before permutation 2 at the
            # latest).
            self.cuda_sync_point = self.cuda_dtoh_point
            self.tokens_per_expert = self._maybe_dtoh_and_synchronize(self.cuda_dtoh_point, self.tokens_per_expert)
            src_rows, prob_src, dst_rows, padded = routing_rows(routing_map, self.align if self._direct else 1)
        # [T, E] -> [T, topk]: both unpermutes (the combine, the permute's backward) loop over a token's slots
        dst_rows = compact_dst_rows(dst_rows, self.config.moe_router_topk)
        self._src1, self._dst1 = src_rows, dst_rows
        self._padded_counts = padded
        self.hidden_shape_before_permute = hidden_states.shape
        tokens_fp8 = ops.quantize_tokens(hidden_states, site=self.telemetry_prefix + "tokens")  # cast #1
        permuted = ops.permute_rows(tokens_fp8, src_rows, dst_rows)
        permuted_probs = ops.permute_probs(probs, prob_src)
        return permuted, permuted_probs

    def token_dispatch(self, permuted_tokens, permuted_probs):
        if self._direct:
            return permuted_tokens, permuted_probs
        out_splits, in_splits = _as_list(self.output_splits), _as_list(self.input_splits)
        # codes, then scales + probs packed: two collectives, as stock megatron's tokens and probs
        return ops.all_to_all_tokens_probs(permuted_tokens, permuted_probs, self.ep_group, out_splits, in_splits)

    def dispatch_postprocess(self, global_tokens, global_probs):
        if self.shared_experts is not None:
            self.shared_experts.linear_fc1_forward_and_act(global_tokens)
        if self._direct:
            counts = self._padded_counts  # a device int64 tensor on the sync-free path, else host ints
            self._src2 = self._dst2 = None
        else:
            if self.num_local_experts > 1:
                per_rank_expert = torch.as_tensor(self.num_global_tokens_per_local_expert).reshape(-1, self.num_local_experts)
            else:
                per_rank_expert = torch.as_tensor(self.output_splits).reshape(-1, 1)
            # The split sizes are on the host already: only the R*L chunk offsets are computed there, the per-row maps
            # are expanded on the device with no stream sync (building ~100k-row maps on the host measured ~4.7 ms
            # per step at EP=8, on the critical path between the token all-to-all and the experts).
            src2, dst2, counts = chunk_sort_pad_maps(per_rank_expert, self.align, global_tokens.device)
            self._src2, self._dst2 = src2, dst2
            global_tokens = ops.permute_rows(global_tokens, src2, dst2)
            global_probs = ops.permute_probs(global_probs, src2)
        self.tokens_per_expert = None
        if not torch.is_tensor(counts):
            counts = torch.tensor(counts, dtype=torch.int64)
        return global_tokens, counts, global_probs

    def combine_preprocess(self, hidden_states):
        if self._direct:
            return hidden_states
        # unpad + unsort chunks: a gather back to [rank][expert] order that never reads padding rows
        return ops.unpermute_rows(hidden_states, self._dst2, self._src2, quantize_grad=False)

    def token_combine(self, hidden_states, async_finish: bool = True, allocate_on_comm_stream: bool = True):
        if self._direct:
            return hidden_states
        return ops.all_to_all(hidden_states, self.ep_group, _as_list(self.input_splits), _as_list(self.output_splits))

    def combine_postprocess(self, permuted_tokens):
        if self.shared_experts is not None:
            self.shared_experts.linear_fc2_forward(permuted_tokens)
            self.shared_experts.post_forward_comm()
        # unpermute (+ unpad at EP=1): sum each token's expert rows; its backward quantizes the gradient (cast #2)
        output = ops.unpermute_rows(permuted_tokens, self._dst1, self._src1, quantize_grad=True,
                                    site=self.telemetry_prefix + "combine_grad")
        output = output.view(self.hidden_shape)
        if self.shared_experts is not None:
            output = output + self.shared_experts.get_output()
        return output
