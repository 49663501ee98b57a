"""FP8FlowGroupedMLP: TEGroupedMLP's parameters and checkpoint layout, FP8-Flow compute.

Parameters are `linear_fc1.weight{i}` [2F, H] and `linear_fc2.weight{i}` [H, F] per local expert, built from the same
submodules as TEGroupedMLP (TE's grouped linears on GPU; EmulatedGroupedLinear -- same names, same sharded state dict,
no TE -- on CPU), and sharded_state_dict is TEGroupedMLP's, so checkpoints move between stock and FP8-Flow runs in both
directions. Given the FP8 payload from FP8FlowTokenDispatcher, forward runs fp8flow_megatron.ops.experts; given a
plain tensor (flag off), it is TEGroupedMLP.forward.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Optional

import torch

from megatron.core.transformer.moe.experts import TEGroupedMLP
from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint
from megatron.core.dist_checkpointing.utils import replace_prefix_for_sharding

from ..numerics.groups import RowGroups
from ..ops.experts import WeightQuantCache, fp8_flow_experts
from ..ops.gemm_engine import gemm_engine_for, resolve_gemm_engine
from .config import FP8FlowConfig
from ..ops.fp8_tensor import Fp8FlowTensor

log = logging.getLogger(__name__)


class FP8FlowGroupedMLP(TEGroupedMLP):
    """TEGroupedMLP's parameters and checkpoint layout with the FP8-Flow expert compute.

    When the expert weights are quantized: the first forward of every optimizer step, on megatron's own per-step
    signal -- `is_first_microbatch`, which its schedules set through `set_is_first_microbatch()` on the first
    micro-batch of each training step and of each evaluation, exactly as megatron's TE linears use it for TE's FP8
    weight cache -- and after a checkpoint load. The other micro-batches, their backward passes and any recompute reuse
    those codes. `config.disable_parameter_transpose_cache` (--disable-parameter-transpose-cache; TE's
    is_first_microbatch=None) holds no FP8 weight copy at all: every GEMM's codes are made right before it from the
    weights and freed after (ops/experts.py, transient_weights; Triton engine; 2*E*N*K bytes per linear less, 3.3 GB
    in the DeepSeek-V2-Lite proxy's three MoE layers, for one weight quantization per linear per forward and per
    backward; the TE engines keep both usages cached).
    A loop that calls the model without megatron's schedule must call `model.set_is_first_microbatch()` after each
    optimizer step, as it must for TE's FP8 layers.
    """

    def __init__(self, num_local_experts, config, submodules, pg_collection=None, **kwargs):
        # kwargs: what newer megatron-core passes its experts builder (0.19: name=)
        if pg_collection is None:
            from megatron.core.transformer.moe.moe_utils import get_default_pg_collection

            pg_collection = get_default_pg_collection()
        super().__init__(num_local_experts, config, submodules, pg_collection=pg_collection, **kwargs)
        self.expert_recompute = bool(getattr(config, "moe_expert_recompute", False))
        flow_cfg = FP8FlowConfig.from_source(config)
        self.align = flow_cfg.align  # the dispatcher pads every expert's rows to a multiple of this
        requested = flow_cfg.gemm
        self.gemm_engine = resolve_gemm_engine(requested, num_local_experts)
        if requested != self.gemm_engine:
            log.info("fp8flow: --moe-fp8-flow-gemm %s -> %s for %d local experts", requested, self.gemm_engine, num_local_experts)
        # persistent with --moe-fp8-flow-cuda-graph: every refresh (eager or before a graph replay) writes into the
        # buffers the captured graphs read
        self._weight_cache = WeightQuantCache(persistent=flow_cfg.cuda_graph and self.gemm_engine == "triton")
        self._weights_quantized_outside = False  # set while a CUDA graph is captured (megatron/cuda_graph.py)
        self.is_first_microbatch = True  # set again by megatron's schedule at every step (see the class docstring)
        # no FP8 weight copy held: quantized where each GEMM uses it (which also means on every call)
        self._transient_weights = bool(getattr(config, "disable_parameter_transpose_cache", False))
        if self._transient_weights and self.gemm_engine in ("te", "te_grouped"):
            # not an error (the results are the same), but the flag's memory saving does not happen: say so
            log.warning(
                "fp8flow: --disable-parameter-transpose-cache: the %r GEMM engine keeps both FP8 forms of the expert "
                "weights cached for the step (only the Triton engine makes them per GEMM), so the experts save no "
                "memory with it. For the saving, --moe-fp8-flow-gemm triton.", self.gemm_engine,
            )  # fmt: skip
        self._logged_weight_bytes = False
        # megatron's gradient_accumulation_fusion, as its TE linears read it (fuse_wgrad_accumulation)
        self.fuse_wgrad_accumulation = bool(getattr(config, "gradient_accumulation_fusion", False))
        # unfused: each linear's bf16 weight gradients go into DDP's main_grad inside backward (ops/experts.py); not
        # under --moe-fp8-flow-cuda-graph, whose replays hand their captured gradients to DDP's hook
        self.wgrad_into_main_grad = not flow_cfg.cuda_graph
        self.telemetry_prefix = ""  # "layer{N}/", set by FP8FlowMoELayer: FP8 health sites per layer
        self.register_load_state_dict_post_hook(_requantize_after_load)
        follow_megatron_step_signal()

    def _weights(self, linear):
        return [getattr(linear, f"weight{i}") for i in range(self.num_local_experts)]

    def forward(self, permuted_local_hidden_states, tokens_per_expert, permuted_probs, **kwargs):
        # kwargs: what newer megatron-core may hand the experts (0.19: NCCL-EP's output_buffer / grad_input_buffer,
        # only with its flex dispatcher, never with FP8-Flow's); the stock path takes them as TEGroupedMLP does
        if not isinstance(permuted_local_hidden_states, Fp8FlowTensor):
            return super().forward(permuted_local_hidden_states, tokens_per_expert, permuted_probs, **kwargs)
        refresh = self._take_refresh()
        output = fp8_flow_experts(
            permuted_local_hidden_states,
            permuted_probs,
            self._rows(tokens_per_expert, permuted_local_hidden_states),
            self._weights(self.linear_fc1),
            self._weights(self.linear_fc2),
            recompute=self.expert_recompute,
            cache=self._weight_cache,
            gemm_engine=self.gemm_engine,
            refresh_weights=refresh,
            fuse_wgrad_accumulation=self.fuse_wgrad_accumulation,
            telemetry_site_prefix=self.telemetry_prefix,
            transient_weights=self._transient_weights,
            wgrad_into_main_grad=self.wgrad_into_main_grad,
        )
        if not self._logged_weight_bytes:  # what the FP8 weight copies cost, once per layer (issue 16's accounting)
            self._logged_weight_bytes = True
            log.info(
                "fp8flow: %sFP8 expert weight copies held %.3f GB (%d experts, %s engine, %s)", self.telemetry_prefix,
                self._weight_cache.nbytes() / 1e9, self.num_local_experts, self.gemm_engine,
                "W and W^T, per step" if self._weight_cache.nbytes() else "none: made per GEMM",
            )  # fmt: skip
        return output, None


    def _take_refresh(self) -> bool:
        """Whether this forward quantizes the weights (megatron's step signal, consumed); False while a CUDA graph
        is captured: the graph reads the persistent codes that prepare_weights() refreshes eagerly before each
        replay, so no quantization is recorded into it."""
        if self._weights_quantized_outside:
            return False
        refresh = self.is_first_microbatch or self._transient_weights
        self.is_first_microbatch = False
        if refresh:
            _wait_for_param_gather(self.linear_fc1, self.linear_fc2)
        return refresh

    def prepare_weights(self, device: torch.device) -> None:
        """Eagerly, before a CUDA-graph replay of the forward: what forward would do to the weights on this call --
        on megatron's step signal, quantize them into the persistent buffers (WeightQuantCache(persistent=True)), the
        same kernel and guard site as inside forward, so the replay computes exactly what eager would."""
        refresh = self._take_refresh()
        engine = gemm_engine_for(device, self.gemm_engine, self.num_local_experts)
        for name, linear in (("fc1", self.linear_fc1), ("fc2", self.linear_fc2)):
            self._weight_cache.get_group(name, self._weights(linear), engine, refresh,
                                         guard_site=f"{self.telemetry_prefix}{name}_weight",
                                         columnwise=not self._transient_weights)

    @contextlib.contextmanager
    def weights_quantized_outside(self):
        """While active, forward reads the cached weight codes and never quantizes (CUDA-graph warm-up and
        capture)."""
        was, self._weights_quantized_outside = self._weights_quantized_outside, True
        try:
            yield
        finally:
            self._weights_quantized_outside = was

    def _rows(self, tokens_per_expert: torch.Tensor, x: Fp8FlowTensor):
        """The experts' row groups for the GEMM engine.

        triton: a RowGroups on x's device. From the sync-free EP=1 dispatcher, tokens_per_expert is a device tensor
        (padded counts over a worst-case buffer of x's rows) and the offsets are computed on the device: nothing is
        read on the host. From host counts (EP > 1, or the TE-sized layout), one small pinned copy.
        te_grouped: the same RowGroups (TE's grouped-tensor GEMM reads the counts on the device).
        te: host m_splits, as TE's API needs them (a device -> host read if the counts are on the device).
        """
        if self.gemm_engine in ("triton", "te_grouped"):
            if tokens_per_expert.is_cuda:
                return RowGroups.from_counts(tokens_per_expert, x.shape[0], self.align)
            return RowGroups.from_splits(tokens_per_expert.tolist(), x.device, x.shape[0])  # host counts: no sync
        return [int(n) for n in tokens_per_expert.tolist()]


def _requantize_after_load(module, incompatible_keys) -> None:
    module.is_first_microbatch = True


def _wait_for_param_gather(*linears) -> None:
    """With the distributed optimizer's --overlap-param-gather, megatron's DDP waits for a module's pending parameter
    all-gather in that module's forward pre-hook. FP8-Flow reads linear_fc1/fc2's weights without calling their
    forward, so it runs their pre-hooks itself before quantizing the weights (a no-op without the overlap)."""
    for linear in linears:
        for hook in tuple(linear._forward_pre_hooks.values()):
            hook(linear, ())


def follow_megatron_step_signal() -> None:
    """Make megatron's per-step signal reach FP8-Flow experts whatever config.fp8 says.

    `MegatronModule.set_is_first_microbatch()` (megatron-core 0.16: transformer/module.py), which the schedules call on
    each step's first micro-batch, marks modules only when config.fp8/fp4 is set -- only then do TE modules cache FP8
    weights. FP8-Flow experts cache FP8 weights whenever --moe-fp8-flow is on, also where config.fp8 stays None (CPU,
    no TE), so the call additionally marks every FP8FlowGroupedMLP below the module it is called on. Narrow (the
    original runs unchanged first), idempotent, installed on first use, logged.
    """
    from megatron.core.transformer.module import MegatronModule

    original = MegatronModule.set_is_first_microbatch
    if getattr(original, "_fp8flow", False):
        return

    def set_is_first_microbatch(self):
        original(self)
        experts = self.__dict__.get("_fp8flow_experts")
        if experts is None:  # found once per module, as megatron caches modules_with_is_first_microbatch
            experts = self.__dict__["_fp8flow_experts"] = [m for m in self.modules() if isinstance(m, FP8FlowGroupedMLP)]
        for m in experts:
            m.is_first_microbatch = True

    set_is_first_microbatch._fp8flow = True
    set_is_first_microbatch.__doc__ = original.__doc__
    MegatronModule.set_is_first_microbatch = set_is_first_microbatch
    log.info("fp8flow: MegatronModule.set_is_first_microbatch also marks FP8-Flow experts (weights requantized per step)")


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
        name: Optional[str] = None,  # megatron-core 0.19 names its grouped linears
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
