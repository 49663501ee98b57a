"""TEGroupedTensorGemm ("te_grouped"): our pre-quantized operands into TE's single-launch grouped GEMM.

TransformerEngine 2.20's ``general_grouped_gemm_for_grouped_tensor`` (what GroupedLinear(use_grouped_tensor=True)
runs) multiplies all experts in one cuBLASLt grouped-GEMM launch, with the per-expert row counts read from device
memory (``first_dims``, CUDA int64). Given a RowGroups nothing here reads the counts on the host: sync-free, like the
Triton engine, and with no per-expert storages (one GroupedTensorStorage per operand).

Operands, each one GroupedTensorStorage over buffers we already have (no copy of the codes):
  weights  128x128 (2D-scaled), uniform [N, K] per expert: row-wise data [E*N*K] + scale_inv
           [E, ceil(N/128), pad4(ceil(K/128))] (fprop), column-wise data [E, K, N] + scale_inv
           [E, ceil(K/128), pad4(ceil(N/128))] (dgrad) -- the one-launch stack kernel's output, scale rows padded.
  x / dy   1x128 (1D-scaled), varying first dim: codes [num_rows * K], group e at element K * offsets[e];
           row-wise scales per group [ceil(K/128), pad4(m_e)] laid end to end (TE's prefix sum of padded sizes; with
           m_e a multiple of 16 group e starts at ceil(K/128) * offsets[e]), rebuilt from our compact [M, K/128]
           scales by one device scatter; column-wise (wgrad) from the grouped scaling-aware transpose in its
           "gemm_ready" layout, group e's [ceil(m_e/128), pad4(K)] scales at pad4(K) * tiles[e] -- TE's layout.
  out      bf16/fp32 [num_rows, N] with first_dims (fprop/dgrad), or the [E, N, K] weight gradients (wgrad).
Layouts: fprop "TN" (W row-wise x x row-wise), dgrad "NN" (W column-wise, dy row-wise), wgrad "NT" (x and dy
column-wise); TE forces FP8 block scaling to TN on Hopper and picks the column-wise storages itself.

Requirements (te_grouped_support says which one fails): TE in the tested range with the grouped-tensor API, Hopper
(TE's FP8 block-scaling grouped GEMM is SM90 only), and a run-time cuBLASLt >= 13.6 (TE's own gate in
grouped_linear.is_module_grouped_tensor_path_supported: 13.6 fixes the grouped algorithm choice for block-scaled FP8
on Hopper). TE's C++ also gates on the cuBLAS headers it was built with (Hopper grouped GEMM compiled in only for
CUBLAS_VERSION >= 13.4): a TE wheel built against older headers fails at the first GEMM with "requires Blackwell",
which te_grouped_support cannot see from Python. Every expert's rows must be a multiple of 16 (FP8 leading dimensions of 16 bytes for the column-wise
[K, m_e] operands; the dispatcher pads to 16): a RowGroups must carry align % 16 == 0, host counts are checked.
"""

from __future__ import annotations

import functools
from typing import List, NamedTuple, Optional, Sequence, Tuple, Union

import torch

from ..numerics import Fp8Blockwise
from ..numerics.format import ceil_div
from ..numerics.gemm import Fp8BlockwiseStack
from ..numerics.groups import RowGroups
from .backend import backend_for

# Rows per expert: TE pads grouped FP8 block-scaled operands to get_align_size_for_quantization(recipe) = 16 (and its
# GroupedLinear tests run such splits with an empty group); the column-wise [K, m_e] operands need 16-byte leading dims.
ROW_ALIGN = 16
CUBLASLT_MIN = 130600  # TE's gate for FP8 block scaling in the grouped-tensor GEMM on Hopper (cuBLASLt 13.6)
HOPPER = 9
DISCRETE_MAX = 64  # TE's kMaxGroups: the most tensors a list operand (here the wgrad outputs) may hold


def _version_str(v: int) -> str:
    return f"{v // 10000}.{v // 100 % 100}"


def support_reason(*, cuda: bool, capability: Optional[Tuple[int, int]], te_error: Optional[str],
                   api_missing: Optional[str], cublaslt: Optional[int]) -> str:  # fmt: skip
    """Why the te_grouped engine cannot run, from the facts te_grouped_support gathers ("" when it can)."""
    fix = "use --moe-fp8-flow-gemm triton"
    if not cuda:
        return f"no CUDA device; {fix}"
    if te_error:
        return f"{te_error}; or {fix}"
    if api_missing:
        return f"this TransformerEngine lacks the grouped-tensor GEMM API ({api_missing}); install TE 2.20.2 or {fix}"
    if capability is None or capability[0] != HOPPER:
        return f"TE's FP8 block-scaling grouped GEMM runs on Hopper (SM90) only, this GPU is SM{capability}; {fix}"
    if cublaslt is None or cublaslt < CUBLASLT_MIN:
        have = "unknown" if cublaslt is None else _version_str(cublaslt)
        return (f"run-time cuBLASLt {have} < {_version_str(CUBLASLT_MIN)} (TE's gate for block-scaled FP8 grouped "
                f"GEMM on Hopper); LD_PRELOAD a libcublasLt/libcublas >= 13.6 or {fix}")  # fmt: skip
    return ""


def _te_error() -> Optional[str]:
    from .gemm_engine import _te

    try:
        _te()
    except (ImportError, OSError) as err:  # OSError: a missing shared library of TE's extension
        return f"TransformerEngine does not import ({err}); pip install 'transformer-engine[pytorch]==2.20.2'"
    except RuntimeError as err:  # outside the supported range: _te's message carries the fix
        return str(err)
    return None


def _api_missing() -> Optional[str]:
    import transformer_engine_torch as tex
    from transformer_engine.pytorch import cpp_extensions

    if not hasattr(cpp_extensions, "general_grouped_gemm_for_grouped_tensor"):
        return "transformer_engine.pytorch.cpp_extensions.general_grouped_gemm_for_grouped_tensor"
    try:
        from transformer_engine.pytorch.tensor.storage.grouped_tensor_storage import GroupedTensorStorage  # noqa: F401
    except ImportError:
        return "transformer_engine.pytorch.tensor.storage.grouped_tensor_storage.GroupedTensorStorage"
    for name in ("te_general_grouped_gemm_for_grouped_tensor", "get_cublasLt_version"):
        if not hasattr(tex, name):
            return f"transformer_engine_torch.{name}"
    return None


@functools.lru_cache(maxsize=None)
def te_grouped_support() -> Tuple[bool, str]:
    """(ok, reason): whether TEGroupedTensorGemm can run on the current CUDA device, and if not, why and the fix.
    The cuBLASLt version is the run-time one (TE's tex.get_cublasLt_version, as TE's own gate), so an LD_PRELOADed
    cuBLAS counts. Cached: the answer does not change within a process."""
    cuda = torch.cuda.is_available()
    capability = torch.cuda.get_device_capability() if cuda else None
    te_error = _te_error() if cuda else None
    api_missing = _api_missing() if cuda and not te_error else None
    cublaslt = None
    if cuda and not te_error and not api_missing:
        import transformer_engine_torch as tex

        cublaslt = int(tex.get_cublasLt_version())
    reason = support_reason(cuda=cuda, capability=capability, te_error=te_error, api_missing=api_missing,
                            cublaslt=cublaslt)  # fmt: skip
    return not reason, reason


def require_te_grouped() -> None:
    ok, reason = te_grouped_support()
    if not ok:
        raise RuntimeError(f"fp8flow: --moe-fp8-flow-gemm te_grouped cannot run here: {reason}.")


class GroupedWeights(NamedTuple):
    """One linear's weights of all experts: the stacks (as the Triton engine keeps them: weights[0] for fprop,
    weights[1] its exact block transpose for dgrad) and the GroupedTensorStorage TE's GEMM reads (both usages)."""

    stack: Fp8BlockwiseStack
    stack_t: Fp8BlockwiseStack
    grouped: object


def _pad_last(scale_inv: torch.Tensor) -> torch.Tensor:
    """[E, rows, cols] -> [E, rows, roundup(cols, 4)], zero-padded (TE's 128x128 scale layout), contiguous."""
    pad = -scale_inv.shape[-1] % 4
    return torch.nn.functional.pad(scale_inv, (0, pad)) if pad else scale_inv.contiguous()


def grouped_rowwise_scales(scale_inv: torch.Tensor, groups: RowGroups) -> torch.Tensor:
    """Compact row-wise 1x128 scales [num_rows, nb] -> TE's grouped GEMM-ready layout, flat fp32 [num_rows * nb]:
    group e's [nb, m_e] block (its scales transposed) at nb * offsets[e]; tail rows keep their compact places. One
    scatter on the device, nothing read on the host. Needs every m_e to be a multiple of 4 (TE pads each group's
    scale rows to 4; with m_e % 4 == 0 the padding is empty)."""
    num_rows, nb = scale_inv.shape
    device = scale_inv.device
    e = groups.num_groups
    if e == 0:  # every row is tail
        return scale_inv.reshape(-1).clone()
    rows = torch.arange(num_rows, device=device)
    group = torch.searchsorted(groups.offsets[1:], rows, right=True)  # E for the tail rows
    tail = group >= e
    g = group.clamp(max=e - 1)
    start, count = groups.offsets[g], groups.counts[g]
    j = torch.arange(nb, device=device)
    grouped = start[:, None] * nb + j[None, :] * count[:, None] + (rows - start)[:, None]
    dest = torch.where(tail[:, None], rows[:, None] * nb + j[None, :], grouped)
    out = torch.empty(num_rows * nb, dtype=torch.float32, device=device)
    return out.scatter_(0, dest.reshape(-1), scale_inv.reshape(-1))


class TEGroupedTensorGemm:
    """See the module docstring. Same interface as TEGroupedGemm / TritonGroupedGemm (ops/gemm_engine.py)."""

    name = "te_grouped"

    def __init__(self) -> None:
        require_te_grouped()
        import transformer_engine_torch as tex
        from transformer_engine.pytorch.cpp_extensions import general_grouped_gemm_for_grouped_tensor
        from transformer_engine.pytorch.tensor.float8_blockwise_tensor import Float8BlockQuantizer
        from transformer_engine.pytorch.tensor.storage.grouped_tensor_storage import GroupedTensorStorage

        self._gemm, self._storage = general_grouped_gemm_for_grouped_tensor, GroupedTensorStorage
        e4m3 = tex.DType.kFloat8E4M3
        # The quantizers only tell TE the scaling mode (1D / 2D) and the FP8 dtype: the GEMM reads codes and scales.
        self._q1d = Float8BlockQuantizer(fp8_dtype=e4m3, rowwise=True, columnwise=True, amax_epsilon=0.0,
                                         force_pow_2_scales=True, block_scaling_dim=1)  # fmt: skip
        self._q2d = Float8BlockQuantizer(fp8_dtype=e4m3, rowwise=True, columnwise=True, amax_epsilon=0.0,
                                         force_pow_2_scales=True, block_scaling_dim=2)  # fmt: skip

    # -- operands
    def quantize_weights(self, weights: Sequence[torch.Tensor], nonfinite_flag=None) -> GroupedWeights:
        """All experts' [N, K] weights of one linear, one launch (kernels/weight_quant.py, both usages) -> the
        stacks and one 2D-scaled GroupedTensorStorage over them (made once per quantization)."""
        dense = [w if w.is_contiguous() else w.contiguous() for w in weights]
        stack, stack_t = backend_for(dense[0].device).quantize_weight_stack(dense, nonfinite_flag)
        e, n, k = stack.data.shape
        grouped = self._storage(
            shape=(e * n, k), dtype=torch.bfloat16, num_tensors=e, shapes=[(n, k)] * e, quantizer=self._q2d,
            data=stack.data.view(torch.uint8).reshape(-1), scale_inv=_pad_last(stack.scale_inv).reshape(-1),
            columnwise_data=stack_t.data.view(torch.uint8).reshape(-1),
            columnwise_scale_inv=_pad_last(stack_t.scale_inv).reshape(-1),
        )  # fmt: skip
        return GroupedWeights(stack, stack_t, grouped)

    def _groups(self, q: Fp8Blockwise, rows: Union[RowGroups, Sequence[int]]) -> RowGroups:
        """A RowGroups over q's rows; host counts become one (pinned, non-blocking) copy. Checks alignment on the host
        without reading device memory."""
        if isinstance(rows, RowGroups):
            if rows.align % ROW_ALIGN:
                raise ValueError(
                    f"te_grouped: RowGroups.align={rows.align}; TE's FP8 grouped GEMM needs every expert's rows to be a "
                    f"multiple of {ROW_ALIGN}. Pad the experts' rows to {ROW_ALIGN} (the FP8-Flow dispatcher does) or "
                    f"use --moe-fp8-flow-gemm triton."
                )
            groups = rows
        else:
            splits = [int(s) for s in rows]
            if any(s % ROW_ALIGN for s in splits):
                raise ValueError(f"te_grouped: expert row counts {splits} are not all multiples of {ROW_ALIGN}, "
                                 f"which TE's FP8 grouped GEMM needs. Pad each expert's rows to {ROW_ALIGN}.")  # fmt: skip
            groups = RowGroups.from_splits(splits, q.device, q.data.shape[0], align=ROW_ALIGN)
        if groups.num_rows != q.data.shape[0]:
            raise ValueError(f"te_grouped: the groups cover {groups.num_rows} rows, the operand has {q.data.shape[0]}")
        if q.data.shape[1] % ROW_ALIGN:
            raise ValueError(f"te_grouped: K={q.data.shape[1]} must be a multiple of {ROW_ALIGN} (FP8 leading dim)")
        return groups

    def _varlen(self, groups: RowGroups, width: int, dtype=torch.bfloat16, **buffers):
        """A varying-first-dim GroupedTensorStorage over [num_rows, width] buffers: group e has counts[e] rows at
        element width * offsets[e] (dtype is TE's nominal high-precision dtype; TE reads the data's own)."""
        return self._storage(
            shape=(groups.num_rows, width), dtype=dtype, num_tensors=groups.num_groups,
            first_dims=groups.counts, tensor_offsets=groups.offsets * width, **buffers,
        )  # fmt: skip

    def _rowwise(self, q: Fp8Blockwise, groups: RowGroups):
        return self._varlen(groups, q.data.shape[1], quantizer=self._q1d, data=q.data.view(torch.uint8).reshape(-1),
                            scale_inv=grouped_rowwise_scales(q.scale_inv, groups))  # fmt: skip

    def _columnwise(self, q: Fp8Blockwise, groups: RowGroups):
        from ..kernels.transpose import scaling_aware_transpose_buffers_grouped

        codes, scale_inv, _ = scaling_aware_transpose_buffers_grouped(q, groups, "gemm_ready")
        return self._varlen(groups, q.data.shape[1], quantizer=self._q1d, columnwise_data=codes,
                            columnwise_scale_inv=scale_inv)  # fmt: skip

    # -- GEMMs
    def _rows_gemm(self, a_q: Fp8Blockwise, w: GroupedWeights, rows, n_out: int, out_dtype, layout: str):
        from ..kernels import zero_tail_rows_triton

        groups = self._groups(a_q, rows)
        out = torch.empty(groups.num_rows, n_out, dtype=out_dtype, device=a_q.device)
        if groups.num_rows and groups.num_groups:
            d = self._varlen(groups, n_out, out_dtype, quantizer=None, data=out.view(-1))
            self._gemm(w.grouped, self._rowwise(a_q, groups), d, layout=layout, use_split_accumulator=True)
        return zero_tail_rows_triton(out, groups.offsets)  # rows past the groups: zero, as the varlen contract says

    def fprop(self, x_q: Fp8Blockwise, weights: GroupedWeights, rows, out_dtype) -> torch.Tensor:
        return self._rows_gemm(x_q, weights, rows, weights.stack.data.shape[1], out_dtype, "TN")

    def dgrad(self, g_q: Fp8Blockwise, weights: GroupedWeights, rows, out_dtype) -> torch.Tensor:
        return self._rows_gemm(g_q, weights, rows, weights.stack.data.shape[2], out_dtype, "NN")

    def wgrad(self, g_q: Fp8Blockwise, x_q: Fp8Blockwise, rows, dtype, accumulate_into=None) -> List[torch.Tensor]:
        """Per-expert [N, K] weight gradients dW_e = dy_e^T x_e, one launch; with accumulate_into (e.g. the weights'
        fp32 main_grad), added to those buffers in the GEMM epilogue (beta = 1). An empty expert contributes a
        K=0 product: zero, or its accumulator unchanged."""
        groups = self._groups(g_q, rows)
        self._groups(x_q, groups)
        e, n, k = groups.num_groups, g_q.data.shape[1], x_q.data.shape[1]
        if accumulate_into is None:
            target = torch.empty(e, n, k, dtype=dtype, device=g_q.device)
            if e:
                self._wgrad_gemm(x_q, g_q, groups, self._uniform(target), accumulate=False)
            return list(target.unbind(0))
        outs = list(accumulate_into)
        if not e:
            return outs
        buffer = _one_buffer(outs, n, k)
        if buffer is not None:  # the accumulators are one [E, N, K] buffer: one grouped output over it
            self._wgrad_gemm(x_q, g_q, groups, self._uniform(buffer), accumulate=True)
        elif e <= DISCRETE_MAX:  # separate buffers (e.g. megatron's grad buffer in reverse order): TE's list output
            self._wgrad_gemm(x_q, g_q, groups, outs, accumulate=True)
        else:  # more than TE's list limit: one [E, N, K] product, then one fused add
            target = torch.empty(e, n, k, dtype=outs[0].dtype, device=g_q.device)
            self._wgrad_gemm(x_q, g_q, groups, self._uniform(target), accumulate=False)
            torch._foreach_add_(outs, list(target.unbind(0)))
        return outs

    def _uniform(self, target: torch.Tensor):
        e, n, k = target.shape
        return self._storage(shape=(e * n, k), dtype=target.dtype, num_tensors=e, shapes=[(n, k)] * e,
                             quantizer=None, data=target.view(-1))  # fmt: skip

    def _wgrad_gemm(self, x_q, g_q, groups, out, accumulate: bool) -> None:
        self._gemm(self._columnwise(x_q, groups), self._columnwise(g_q, groups), out, layout="NT",
                   use_split_accumulator=True, accumulate=accumulate)  # fmt: skip


def _one_buffer(outs: List[torch.Tensor], n: int, k: int) -> Optional[torch.Tensor]:
    """The [E, N, K] tensor the E accumulators are consecutive slices of (megatron's grad buffer often lays
    experts' main_grads out back to back), or None. Host metadata only."""
    first = outs[0]
    if any(o.shape != (n, k) or not o.is_contiguous() or o.dtype != first.dtype for o in outs):
        return None
    step = n * k * first.element_size()
    if any(o.data_ptr() != first.data_ptr() + i * step for i, o in enumerate(outs)):
        return None
    base = first.untyped_storage()
    if any(o.untyped_storage().data_ptr() != base.data_ptr() for o in outs):
        return None
    return torch.as_strided(first, (len(outs), n, k), (n * k, k, 1))


__all__ = ["GroupedWeights", "TEGroupedTensorGemm", "grouped_rowwise_scales", "support_reason", "te_grouped_support"]
