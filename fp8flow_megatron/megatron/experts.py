"""FP8FlowGroupedMLP: TEGroupedMLP's parameters and checkpoint layout, FP8-Flow compute.

Parameters are `linear_fc1.weight{i}` [2F, H] and `linear_fc2.weight{i}` [H, F] per local expert, built from the same
submodules as TEGroupedMLP (TE's grouped linears on GPU; EmulatedGroupedLinear -- same names, same sharded state dict,
no TE -- on CPU), and sharded_state_dict is TEGroupedMLP's, so checkpoints move between stock and FP8-Flow runs in both
directions. Given the FP8 payload from FP8FlowTokenDispatcher, forward runs fp8flow_megatron.ops.experts; given a
plain tensor (flag off), it is TEGroupedMLP.forward.
"""

from __future__ import annotations

import logging
from typing import Optional

import torch

from megatron.core.transformer.moe.experts import TEGroupedMLP
from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint
from megatron.core.dist_checkpointing.utils import replace_prefix_for_sharding

from ..ops.experts import WeightQuantCache, fp8_flow_experts
from ..ops.gemm_engine import resolve_gemm_engine
from .config import FP8FlowConfig
from ..ops.fp8_tensor import Fp8FlowTensor

log = logging.getLogger(__name__)


class FP8FlowGroupedMLP(TEGroupedMLP):
    def __init__(self, num_local_experts, config, submodules, pg_collection=None):
        if pg_collection is None:
            from megatron.core.transformer.moe.moe_utils import get_default_pg_collection

            pg_collection = get_default_pg_collection()
        super().__init__(num_local_experts, config, submodules, pg_collection=pg_collection)
        self.expert_recompute = bool(getattr(config, "moe_expert_recompute", False))
        requested = FP8FlowConfig.from_source(config).gemm
        self.gemm_engine = resolve_gemm_engine(requested, num_local_experts)
        if requested != self.gemm_engine:
            log.info("fp8flow: --moe-fp8-flow-gemm %s -> %s for %d local experts", requested, self.gemm_engine, num_local_experts)
        self._weight_cache = WeightQuantCache()

    def _weights(self, linear):
        return [getattr(linear, f"weight{i}") for i in range(self.num_local_experts)]

    def forward(self, permuted_local_hidden_states, tokens_per_expert, permuted_probs):
        if not isinstance(permuted_local_hidden_states, Fp8FlowTensor):
            return super().forward(permuted_local_hidden_states, tokens_per_expert, permuted_probs)
        m_splits = [int(n) for n in tokens_per_expert.tolist()]
        output = fp8_flow_experts(
            permuted_local_hidden_states,
            permuted_probs,
            m_splits,
            self._weights(self.linear_fc1),
            self._weights(self.linear_fc2),
            recompute=self.expert_recompute,
            cache=self._weight_cache,
            gemm_engine=self.gemm_engine,
        )
        return output, None


class EmulatedGroupedLinear(torch.nn.Module):
    """CPU stand-in for TE's GroupedLinear with megatron's TE wrapper interface: parameters weight{i} [out, in],
    forward(x, m_splits) -> (y, None) in high precision (used by the flag-off path), and the same sharded state dict
    as TEColumnParallelGroupedLinear / TERowParallelGroupedLinear (expert axis for EP, per-GEMM _extra_state)."""

    tp_axis = 0  # column parallel

    def __init__(
        self,
        num_gemms: int,
        input_size: int,
        output_size: int,
        *,
        config,
        init_method,
        bias: bool,
        skip_bias_add: bool,
        is_expert: bool,
        tp_comm_buffer_name: Optional[str] = None,
        pg_collection=None,
    ):
        super().__init__()
        if bias:
            raise ValueError("EmulatedGroupedLinear has no bias (FP8-Flow experts need --disable-bias-linear)")
        self.num_gemms = num_gemms
        self.config = config
        self.use_bias = False
        self._pg_collection = pg_collection
        dtype = config.params_dtype
        for i in range(num_gemms):
            w = torch.empty(output_size, input_size, dtype=dtype)
            if config.perform_initialization:
                init_method(w)
            self.register_parameter(f"weight{i}", torch.nn.Parameter(w))
            setattr(getattr(self, f"weight{i}"), "allreduce", False)  # expert params: not reduced over DP x EP

    def get_extra_state(self):
        return None

    def set_extra_state(self, state):
        return None

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # The sharded checkpoint stores one _extra_state per GEMM (_extra_state, _extra_state1, ...), as TE's grouped
        # linear does; they carry no state here.
        for i in range(1, self.num_gemms):
            state_dict.pop(f"{prefix}_extra_state{i}", None)
        state_dict.setdefault(f"{prefix}_extra_state", None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x, m_splits):
        outs = [
            chunk @ getattr(self, f"weight{i}").t() for i, chunk in enumerate(torch.split(x, list(m_splits)))
        ]
        return torch.cat(outs, dim=0) if outs else x.new_zeros(0, self.weight0.shape[0]), None

    def backward_dw(self):
        return None

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        from megatron.core.utils import get_pg_rank, get_pg_size

        singleton_local_shards = (metadata or {}).get("singleton_local_shards", False)
        pg = self._pg_collection
        num_global = get_pg_size(pg.ep) * self.num_gemms
        offset = get_pg_rank(pg.ep) * self.num_gemms
        ep_axis = len(sharded_offsets)
        out = {}
        for i in range(self.num_gemms):
            global_idx = offset + i
            state = {f"{i}.weight": getattr(self, f"weight{i}"), f"{i}._extra_state": None}
            if singleton_local_shards:
                expert_prefix, offsets = f"{global_idx}.{prefix}", sharded_offsets
            else:
                expert_prefix, offsets = prefix, (*sharded_offsets, (ep_axis, global_idx, num_global))
            sub = make_sharded_tensors_for_checkpoint(
                state, "", {f"{i}.weight": self.tp_axis}, offsets, tp_group=pg.expt_tp, dp_cp_group=metadata["dp_cp_group"]
            )
            replace_prefix_for_sharding(sub, f"{i}.", expert_prefix)
            out[f"{prefix}weight{i}"] = sub[f"{i}.weight"]
            out[f"{prefix}_extra_state{'' if i == 0 else i}"] = sub[f"{i}._extra_state"]
        edp_rank = get_pg_rank(pg.expt_dp)
        for sh in out.values():
            sh.replica_id = (*sh.replica_id[:2], edp_rank)
        return out


class EmulatedRowGroupedLinear(EmulatedGroupedLinear):
    tp_axis = 1  # row parallel
