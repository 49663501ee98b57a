"""GEMM engines for the expert MLP: who multiplies the FP8 operands, and in what form the weights are kept.

ReferenceGemm (CPU, and CUDA without TE): dequantize -> fp32 matmul, exactly the numerics spec.
TEGroupedGemm (CUDA with TransformerEngine >= 2.12, tested 2.20.2): TE's general_grouped_gemm on blockwise FP8
operands that were quantized outside TE and are wrapped as Float8BlockwiseQTensorStorage -- released TE, no patch:
    fprop  "TN": y  = x @ W^T     x row-wise 1x128 (scales GEMM-ready [K/128, m]), W 128x128 row-wise
    dgrad  "NN": dx = dy @ W      dy row-wise 1x128, W column-wise 128x128 (TE's quantizer makes both usages)
    wgrad  "NT": dW = dy^T x      both column-wise, made by the CUDA scaling-aware transpose in TE's scale layout
Every non-empty expert's row count must be a multiple of 8 for TE's blockwise GEMM (the dispatcher pads to 16).
TritonGroupedGemm (CUDA): one Triton launch per GEMM for all experts (fp8flow_megatron.kernels.grouped_gemm).
TEGroupedTensorGemm ("te_grouped", ops/te_grouped_gemm.py; Hopper, TE 2.20 and a run-time cuBLASLt >= 13.6): our
operands into TE's single-launch grouped-tensor GEMM, counts read on the device (sync-free given a RowGroups).

The rows argument of fprop / dgrad / wgrad (`rows`) is either the host row counts per expert (a list summing to the
operand's rows) or a numerics.groups.RowGroups: the groups described on the device over a worst-case buffer, the
sync-free layout of the EP=1 dispatcher. Only the Triton engine consumes a RowGroups without a host read (the
fp8_varlen_* kernels); the reference engine runs the fp8_varlen_* twins (which read the counts: it is the CPU spec);
the TE engine needs host m_splits by its API, so it reads the counts (a device -> host sync) and runs on the groups'
rows, returning zero tail rows like the others.

quantize_weights(weights, nonfinite_flag) raises the non-finite guard's flag (ops/nonfinite.py) on an inf or NaN
weight, for free in our quantizers. The TE engine quantizes its weights with our one-launch 128x128 stack kernel too
(kernels/weight_quant.py: both usages of all experts of one linear in one launch, the same codes and scales as TE's
Float8BlockQuantizer) and wraps each expert's slice as a 2D-scaled Float8BlockwiseQTensorStorage; TE's own
quantizer, one call per expert, cost ~130 launches per layer and step and cannot report an inf or NaN (an inf block
gets scale 1 and saturates, a NaN is encoded). quantize_weight (one weight, TE's quantizer) stays as the reference the
GPU tests compare the stack against.
"""

from __future__ import annotations

import functools
from typing import List, Sequence

import torch

from ..numerics import Fp8Blockwise
from ..numerics.format import host_to_device
from ..numerics.gemm import fp8_gemm_nt, fp8_grouped_gemm_nt, fp8_varlen_gemm_nt, fp8_varlen_wgrad, transpose_128x128
from ..numerics.groups import RowGroups
from .backend import backend_for

TE_TESTED = "2.20.2"
TE_MIN, TE_MAX_EXCLUSIVE = "2.12", "2.21"


class ReferenceGemm:
    name = "reference"
    # quantize_weights(columnwise=False) for fprop + columnwise_weights() for dgrad: each FP8 copy made where it is
    # used, none held from forward to backward (ops/experts.py, transient_weights;
    # config.disable_parameter_transpose_cache)
    columnwise_in_backward = True

    def quantize_weight(self, w: torch.Tensor, nonfinite_flag=None):
        w_q = backend_for(w.device).quantize_128x128(w.detach(), nonfinite_flag)
        return w_q, transpose_128x128(w_q)

    def quantize_weights(self, weights, nonfinite_flag=None, columnwise: bool = True):
        """Per expert (w_q, w_q^T); (w_q, None) without columnwise."""
        pairs = [self.quantize_weight(w, nonfinite_flag) for w in weights]
        return pairs if columnwise else [(w_q, None) for w_q, _ in pairs]

    def columnwise_weights(self, weights):
        """The dgrad operands alone, per expert (None, w_q^T): the transposed codes quantize_weights(weights) would
        return, made now (nothing of the fprop codes is needed or kept)."""
        return [(None, w_t) for _, w_t in self.quantize_weights(weights)]

    def fprop(self, x_q: Fp8Blockwise, weights, m_splits, out_dtype):
        if isinstance(m_splits, RowGroups):
            return fp8_varlen_gemm_nt(x_q, [w for w, _ in weights], m_splits, out_dtype)
        return fp8_grouped_gemm_nt(x_q, [w for w, _ in weights], m_splits, out_dtype)

    def dgrad(self, g_q: Fp8Blockwise, weights, m_splits, out_dtype):
        if isinstance(m_splits, RowGroups):
            return fp8_varlen_gemm_nt(g_q, [w_t for _, w_t in weights], m_splits, out_dtype)
        return fp8_grouped_gemm_nt(g_q, [w_t for _, w_t in weights], m_splits, out_dtype)

    def wgrad(self, g_q: Fp8Blockwise, x_q: Fp8Blockwise, m_splits, dtype, accumulate_into=None) -> List[torch.Tensor]:
        if isinstance(m_splits, RowGroups):
            out = fp8_varlen_wgrad(g_q, x_q, m_splits, torch.float32 if accumulate_into is None else
                                   accumulate_into[0].dtype, out=accumulate_into, accumulate=accumulate_into is not None)  # fmt: skip
            return list(accumulate_into) if accumulate_into is not None else [w.to(dtype) for w in out.unbind(0)]
        b = backend_for(g_q.device)
        g_t = b.scaling_aware_transpose(g_q, m_splits)
        x_t = b.scaling_aware_transpose(x_q, m_splits)
        if accumulate_into is None:
            return [fp8_gemm_nt(gt, xt, torch.float32).to(dtype) for gt, xt in zip(g_t, x_t)]
        for acc, gt, xt, m in zip(accumulate_into, g_t, x_t, m_splits):
            if m:  # fp32 sum, stored once in the buffer's dtype (the GEMM epilogue's C + A.B)
                acc.copy_(acc.float() + fp8_gemm_nt(gt, xt, torch.float32))
        return list(accumulate_into)


@functools.lru_cache(maxsize=None)
def _te():
    """TE's pieces, imported once; refuses TE versions outside the supported range with the fix."""
    import transformer_engine
    import transformer_engine_torch as tex
    from packaging.version import Version
    from transformer_engine.pytorch.cpp_extensions import general_grouped_gemm
    from transformer_engine.pytorch.tensor.float8_blockwise_tensor import Float8BlockQuantizer
    from transformer_engine.pytorch.tensor.storage.float8_blockwise_tensor_storage import Float8BlockwiseQTensorStorage

    v = Version(transformer_engine.__version__.split("+")[0])
    if not (Version(TE_MIN) <= v < Version(TE_MAX_EXCLUSIVE)):
        raise RuntimeError(
            f"fp8flow_megatron's TE grouped-GEMM recipe supports transformer-engine >={TE_MIN},<{TE_MAX_EXCLUSIVE} "
            f"(tested {TE_TESTED}); found {transformer_engine.__version__}. Install a supported TE, e.g. "
            f"pip install 'transformer-engine[pytorch]=={TE_TESTED}'."
        )
    return tex, general_grouped_gemm, Float8BlockQuantizer, Float8BlockwiseQTensorStorage


@functools.lru_cache(maxsize=None)
def te_available() -> bool:
    # cached: `auto` asks on every expert forward/backward, and a failed import is not cached by _te's lru_cache
    try:
        _te()
        return True
    except ImportError:
        return False


class TEGroupedGemm:
    name = "te"

    def __init__(self) -> None:
        tex, self._gemm, Float8BlockQuantizer, self._storage = _te()
        self._e4m3 = tex.DType.kFloat8E4M3
        self._q1d = Float8BlockQuantizer(
            fp8_dtype=self._e4m3, rowwise=True, columnwise=False, amax_epsilon=0.0, force_pow_2_scales=True, block_scaling_dim=1
        )
        self._q2d = Float8BlockQuantizer(
            fp8_dtype=self._e4m3, rowwise=True, columnwise=True, amax_epsilon=0.0, force_pow_2_scales=True, block_scaling_dim=2
        )
        # Per-expert operand storages are made ~500 times per layer fwd+bwd. TE's constructor is cheap but not free
        # (DType.cast, a quantizer copy); a template made once by the real constructor is cloned instead, so the
        # attributes are exactly what this TE version sets (checked against the constructor in the GPU tests).
        empty = torch.empty(0, dtype=torch.uint8)
        self._templates = {
            is_2d: self._storage(
                rowwise_data=empty, rowwise_scale_inv=empty, columnwise_data=empty, columnwise_scale_inv=empty,
                fp8_dtype=self._e4m3, quantizer=None, is_2D_scaled=is_2d,
            ).__dict__
            for is_2d in (False, True)
        }

    def make_storage(self, rowwise_data=None, rowwise_scale_inv=None, columnwise_data=None, columnwise_scale_inv=None,
                     is_2d_scaled: bool = False):  # fmt: skip
        """A Float8BlockwiseQTensorStorage over existing uint8 codes and fp32 scales (no copy, no quantizer: the GEMM
        reads codes and scales only); 1x128-scaled, or 128x128 with is_2d_scaled."""
        storage = object.__new__(self._storage)
        storage.__dict__.update(self._templates[is_2d_scaled])
        storage._rowwise_data, storage._rowwise_scale_inv = rowwise_data, rowwise_scale_inv
        storage._columnwise_data, storage._columnwise_scale_inv = columnwise_data, columnwise_scale_inv
        return storage

    # -- operands
    def quantize_weight(self, w: torch.Tensor):
        return self._q2d(w.detach())

    def quantize_weights(self, weights, nonfinite_flag=None):
        """All experts' [N, K] weights of one linear -> one 128x128 Float8BlockwiseQTensorStorage per expert with both
        usages: row-wise data [N, K] + scale_inv [ceil(N/128), roundup4(ceil(K/128))] (fprop) and column-wise data
        [K, N] + scale_inv [ceil(K/128), roundup4(ceil(N/128))] (dgrad), TE's layouts (scale rows padded to a
        multiple of 4 for cuBLAS, the padding zero and never read). One launch quantizes every expert (plus one small
        pad per usage where ceil(K/128) or ceil(N/128) is not a multiple of 4). The kernel reads dense row-major
        weights, as megatron's expert parameters are; any other layout is copied to one first."""
        if not weights:
            return []
        dense = [w if w.is_contiguous() else w.contiguous() for w in weights]
        stack, stack_t = backend_for(dense[0].device).quantize_weight_stack(dense, nonfinite_flag)
        scale = self._pad_scale_rows(stack.scale_inv)
        scale_t = self._pad_scale_rows(stack_t.scale_inv)
        data, data_t = stack.data.view(torch.uint8), stack_t.data.view(torch.uint8)
        return [
            self.make_storage(data[e], scale[e], data_t[e], scale_t[e], is_2d_scaled=True) for e in range(len(dense))
        ]

    @staticmethod
    def _pad_scale_rows(scale_inv: torch.Tensor) -> torch.Tensor:
        """[E, rows, cols] fp32 -> [E, rows, roundup(cols, 4)], zero-padded (TE's 128x128 scale layout)."""
        pad = -scale_inv.shape[-1] % 4
        return torch.nn.functional.pad(scale_inv, (0, pad)) if pad else scale_inv

    @staticmethod
    def _gemm_ready_scales(scale_inv: torch.Tensor, m_splits: Sequence[int]) -> List[torch.Tensor]:
        """Compact row-wise scales [M, nb] -> per expert [nb, m_e] (TE's GEMM-ready layout; m_e is a multiple of 16,
        so TE's pad-to-4 adds nothing), all experts in one gather over one buffer."""
        m_total, nb = scale_inv.shape
        device = scale_inv.device
        # pinned + non_blocking: a plain torch.tensor(..., device=cuda) would synchronize the stream on every GEMM
        m = host_to_device(torch.tensor(list(m_splits), dtype=torch.int64), device)
        sizes = m * nb
        total = m_total * nb
        expert = torch.repeat_interleave(torch.arange(len(m_splits), device=device), sizes, output_size=total)
        offs = torch.cumsum(sizes, 0) - sizes
        starts = torch.cumsum(m, 0) - m
        local = torch.arange(total, device=device) - offs[expert]
        rows = starts[expert] + local % m[expert].clamp(min=1)
        cols = local // m[expert].clamp(min=1)
        flat = scale_inv.reshape(-1)[rows * nb + cols]
        return [chunk.view(nb, e) for chunk, e in zip(flat.split([e * nb for e in m_splits]), m_splits)]

    def _rowwise(self, q: Fp8Blockwise, m_splits: Sequence[int]):
        """Per-expert row-wise storages: views of the codes, scales in TE's GEMM-ready layout."""
        data = q.data.view(torch.uint8).split(list(m_splits))
        scales = self._gemm_ready_scales(q.scale_inv, m_splits)
        return [self.make_storage(rowwise_data=rows, rowwise_scale_inv=scale) for rows, scale in zip(data, scales)]

    def _columnwise(self, q: Fp8Blockwise, m_splits: Sequence[int]):
        """Per-expert column-wise storages from one scaling-aware transpose launch (scales GEMM-ready)."""
        from ..kernels.transpose import scaling_aware_transpose_buffers

        codes, scale_inv, splits, blocks, row_len = scaling_aware_transpose_buffers(q, m_splits, "gemm_ready")
        k = q.data.shape[1]
        code_chunks = codes.split([m * k for m in splits])
        scale_chunks = scale_inv.split([b * row_len for b in blocks])
        return [
            self.make_storage(columnwise_data=c.view(k, m), columnwise_scale_inv=sc.view(b, row_len))
            for c, sc, m, b in zip(code_chunks, scale_chunks, splits, blocks)
        ]

    # -- GEMMs
    @staticmethod
    def _host_rows(q: Fp8Blockwise, rows):
        """(operand over the groups' rows, host m_splits, tail rows): TE's API takes host m_splits, so a RowGroups is
        read on the host here (a device -> host sync: the TE engine is not sync-free)."""
        if not isinstance(rows, RowGroups):
            return q, list(rows), 0
        splits = rows.host_splits("TEGroupedGemm")
        end = sum(splits)
        if end != q.data.shape[0]:
            q = Fp8Blockwise(q.data[:end], q.scale_inv[:end], q.block)
        return q, splits, rows.num_rows - end

    @staticmethod
    def _with_tail(y: torch.Tensor, tail: int) -> torch.Tensor:
        return torch.cat([y, y.new_zeros(tail, y.shape[1])]) if tail else y

    def _grouped(self, a_list, b_list, m_splits, n_out, out_dtype, layout, grad):
        m_total = sum(m_splits)
        out = torch.empty(m_total, n_out, dtype=out_dtype, device=b_list[0]._rowwise_data.device if b_list else "cuda")
        if m_total:
            self._gemm(
                a_list, b_list, [out], [None] * len(a_list), out_dtype, layout=layout, m_splits=list(m_splits),
                grad=grad, use_split_accumulator=True, single_output=True,
            )
        return out

    def fprop(self, x_q: Fp8Blockwise, weights, m_splits, out_dtype):
        n_out = weights[0].shape[0]
        x_q, m_splits, tail = self._host_rows(x_q, m_splits)
        y = self._grouped(list(weights), self._rowwise(x_q, m_splits), m_splits, n_out, out_dtype, "TN", False)
        return self._with_tail(y, tail)

    def dgrad(self, g_q: Fp8Blockwise, weights, m_splits, out_dtype):
        n_out = weights[0].shape[1]
        g_q, m_splits, tail = self._host_rows(g_q, m_splits)
        y = self._grouped(list(weights), self._rowwise(g_q, m_splits), m_splits, n_out, out_dtype, "NN", True)
        return self._with_tail(y, tail)

    def wgrad(self, g_q: Fp8Blockwise, x_q: Fp8Blockwise, m_splits, dtype, accumulate_into=None) -> List[torch.Tensor]:
        """Per-expert [N, K] weight gradients; with accumulate_into (e.g. the weights' fp32 main_grad), added to
        those buffers in the GEMM epilogue (TE's accumulate=True), and empty experts leave theirs untouched."""
        if isinstance(m_splits, RowGroups):
            x_q, _, _ = self._host_rows(x_q, m_splits)
            g_q, m_splits, _ = self._host_rows(g_q, m_splits)
        n, k = g_q.data.shape[1], x_q.data.shape[1]
        if accumulate_into is None:
            out = torch.empty(len(m_splits), n, k, dtype=dtype, device=g_q.data.device)
            outs = list(out.unbind(0))
            for i, m in enumerate(m_splits):
                if m == 0:  # an empty expert's weight gradient is zero (only those are written, not the whole buffer)
                    outs[i].zero_()
        else:
            outs = list(accumulate_into)
        live = [i for i, m in enumerate(m_splits) if m > 0]
        if live:
            g_t = self._columnwise(g_q, m_splits)
            x_t = self._columnwise(x_q, m_splits)
            self._gemm(
                [x_t[i] for i in live], [g_t[i] for i in live], [outs[i] for i in live], [None] * len(live),
                outs[live[0]].dtype, layout="NT", m_splits=[m_splits[i] for i in live], grad=True,
                use_split_accumulator=True, accumulate=accumulate_into is not None,
            )
        return outs


class TritonGroupedGemm:
    """All experts in one Triton launch per GEMM (fp8flow_megatron.kernels.grouped_gemm): no per-expert host work.
    Weights are kept as one Fp8BlockwiseStack per linear (and its exact 128x128 block transpose for dgrad).
    Given a RowGroups, the varlen kernels read the groups from device memory: nothing is read on the host, no sync
    (the sync-free MoE layer); given host m_splits, the same kernels get them in one small pinned copy."""

    name = "triton"
    quantizes_in_place = True  # quantize_weights(out=...): the persistent weight buffers a CUDA graph reads
    columnwise_in_backward = True  # see ReferenceGemm

    def quantize_weights(self, weights, nonfinite_flag=None, out=None, columnwise: bool = True):
        """(stack, stack_t) of all experts' weights, (stack, None) without columnwise; out: an earlier result of the
        same form to write into."""
        return backend_for(weights[0].device).quantize_weight_stack(weights, nonfinite_flag, out=out,
                                                                    columnwise=columnwise)  # fmt: skip

    def columnwise_weights(self, weights):
        """The dgrad operand alone, (None, stack_t): the transposed codes of quantize_weights(weights), in one launch
        that writes only those (the FP8 copy exists only while the caller holds it)."""
        return None, backend_for(weights[0].device).quantize_weight_stack(weights, rowwise=False)[1]

    @staticmethod
    def _gemm(a_q, w, rows, out_dtype):
        from ..kernels import fp8_grouped_gemm_nt_triton, fp8_varlen_gemm_nt_triton

        if isinstance(rows, RowGroups):
            return fp8_varlen_gemm_nt_triton(a_q, w, rows, out_dtype)
        return fp8_grouped_gemm_nt_triton(a_q, w, rows, out_dtype)

    def fprop(self, x_q: Fp8Blockwise, weights, m_splits, out_dtype):
        return self._gemm(x_q, weights[0], m_splits, out_dtype)

    def dgrad(self, g_q: Fp8Blockwise, weights, m_splits, out_dtype):
        return self._gemm(g_q, weights[1], m_splits, out_dtype)

    def wgrad(self, g_q: Fp8Blockwise, x_q: Fp8Blockwise, m_splits, dtype, accumulate_into=None) -> List[torch.Tensor]:
        from ..kernels import fp8_grouped_wgrad_triton, fp8_varlen_wgrad_triton

        wgrad = fp8_varlen_wgrad_triton if isinstance(m_splits, RowGroups) else fp8_grouped_wgrad_triton
        if accumulate_into is not None:  # straight into the main_grad buffers, one launch (no [E, N, K] temporary)
            return list(wgrad(g_q, x_q, m_splits, dtype, out=list(accumulate_into), accumulate=True))
        return list(wgrad(g_q, x_q, m_splits, dtype).unbind(0))


GEMM_ENGINES = ("auto", "triton", "te", "te_grouped")
# "auto" picks by the number of local experts, from the layer benchmarks in BENCHMARKS.md (DeepSeek-V2-Lite MoE layer,
# 16k tokens per GPU): with 64 local experts (EP=1, H100) the Triton engine was 1.7x faster than TE's, whose one
# cuBLASLt call per expert makes the layer host-bound; with 32, 16 and 8 (EP=2, 4, 8 on H200) TE's was 1.12x, 1.12x
# and 1.15x faster -- fewer calls, and cuBLAS's FP8 kernels beat ours on the GPU at 3k-12k rows per expert.
AUTO_TE_MAX_LOCAL_EXPERTS = 32
# "auto" takes te_grouped wherever te_grouped_support() says it can run (Hopper, run-time cuBLASLt >= 13.6), from
# the H200 measurement of 2026-12-02 (BENCHMARKS.md): on our operands it ran fprop/dgrad at 1,058-1,091 TFLOP/s vs
# 591-652 for our Triton kernels, wgrad 578-628 vs 398-434 (transposes included in both), and the V2-Lite layer at
# 21.84 ms vs 22.47 ms (Triton) in one process. Elsewhere (the stock 13.1 image) auto keeps its choice above.
AUTO_PREFERS_TE_GROUPED = True


def _te_grouped_ok() -> bool:
    from .te_grouped_gemm import te_grouped_support

    return te_grouped_support()[0]


def resolve_gemm_engine(name: str, num_local_experts: int) -> str:
    """The concrete engine ("triton", "te" or "te_grouped") for a --moe-fp8-flow-gemm value and a layer's local
    expert count."""
    if name not in GEMM_ENGINES:
        raise ValueError(f"unknown FP8-Flow GEMM engine {name!r}; choose one of {GEMM_ENGINES}")
    if name != "auto":
        return name
    if AUTO_PREFERS_TE_GROUPED and _te_grouped_ok():
        return "te_grouped"
    return "te" if num_local_experts <= AUTO_TE_MAX_LOCAL_EXPERTS and te_available() else "triton"


@functools.lru_cache(maxsize=None)
def _te_engine():
    return TEGroupedGemm()


@functools.lru_cache(maxsize=None)
def _te_grouped_engine():
    from .te_grouped_gemm import TEGroupedTensorGemm

    return TEGroupedTensorGemm()


def gemm_engine_for(device: torch.device, name: str = "te", num_local_experts: int = 0):
    """On CUDA: TE's grouped GEMM ("te"; without TE, or a TE outside the supported range, it raises with the fix), the
    single-launch Triton kernels ("triton"), TE's single-launch grouped-tensor GEMM ("te_grouped"; where
    te_grouped_support() is false it raises with the reason), or "auto" (resolve_gemm_engine). On CPU: the
    reference (the numerics spec)."""
    name = resolve_gemm_engine(name, num_local_experts)
    if torch.device(device).type != "cuda":
        return ReferenceGemm()
    if name == "triton":
        return TritonGroupedGemm()
    if name == "te_grouped":
        return _te_grouped_engine()  # raises with te_grouped_support()'s reason
    if not te_available():
        raise RuntimeError(
            "fp8flow: the 'te' FP8 grouped-GEMM engine needs TransformerEngine, which does not import here (the "
            "fallback would be the dequantize -> fp32 reference, orders of magnitude slower). Fix: pip install "
            "'transformer-engine[pytorch]>=2.12', or --moe-fp8-flow-gemm triton."
        )
    return _te_engine()
