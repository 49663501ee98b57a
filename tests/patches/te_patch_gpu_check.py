"""Run with the patched TE first on PYTHONPATH: patched te.pytorch.GroupedLinear vs fp8flow_megatron's recipe
(ops.gemm_engine.TEGroupedGemm) and vs stock GroupedLinear on the dequantized values, on the same FP8 operands.
Prints one JSON line: max abs differences per quantity (0.0 = bit-identical)."""

import json
import sys

import torch


def main() -> None:
    import transformer_engine
    import transformer_engine.pytorch as te
    import transformer_engine_torch as tex
    from transformer_engine.common.recipe import Float8BlockScaling
    from transformer_engine.pytorch.tensor.float8_blockwise_tensor import Float8BlockQuantizer

    from fp8flow_megatron.numerics import Fp8Blockwise
    from fp8flow_megatron.ops import gemm_engine

    patched_from = transformer_engine.__file__
    m_splits = [128, 64, 0, 192, 48]
    k, n = 256, 384
    m = sum(m_splits)
    torch.manual_seed(1234)
    q1d = Float8BlockQuantizer(
        tex.DType.kFloat8E4M3, rowwise=True, columnwise=False, amax_epsilon=0.0, force_pow_2_scales=True,
        block_scaling_dim=1,
    )
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    x[5, :] *= 1e-6  # wide dynamic range inside column blocks: the transpose must round into the subnormals
    g = torch.randn(m, n, device="cuda", dtype=torch.bfloat16) * 1e-3
    g[7, :] *= 1e-5
    x_te, g_te = q1d(x), q1d(g)

    def as_plugin(t) -> Fp8Blockwise:  # the same codes and scales in the plugin's container (compact scales)
        rows = t._rowwise_data.shape[0]
        return Fp8Blockwise(t._rowwise_data.view(torch.float8_e4m3fn), t._rowwise_scale_inv[:, :rows].t().contiguous())

    x_q, g_q = as_plugin(x_te), as_plugin(g_te)

    torch.manual_seed(7)
    layer = te.GroupedLinear(len(m_splits), k, n, bias=False, params_dtype=torch.bfloat16, device="cuda")
    torch.manual_seed(7)
    stock = te.GroupedLinear(len(m_splits), k, n, bias=False, params_dtype=torch.bfloat16, device="cuda")
    weights = [getattr(layer, f"weight{i}") for i in range(len(m_splits))]

    recipe = Float8BlockScaling()
    x_te.requires_grad_(True)
    with te.autocast(enabled=True, recipe=recipe):
        y = layer(x_te, m_splits)
    y.backward(g_te)
    dx, dw = x_te.grad, [w.grad for w in weights]

    x_deq = x_te.dequantize(dtype=torch.bfloat16).detach().requires_grad_(True)
    with te.autocast(enabled=True, recipe=recipe):
        y_stock = stock(x_deq, m_splits)
    y_stock.backward(g_te.dequantize(dtype=torch.bfloat16))

    eng = gemm_engine.TEGroupedGemm()
    transpose_impl = "fp8flow_megatron.kernels.scaling_aware_transpose_cuda"
    try:
        from fp8flow_megatron.kernels._extension import cuda_extension

        cuda_extension()
    except Exception as exc:  # report it; the twin is bit-identical by its own tests
        transpose_impl = f"numerics twin (CUDA extension unavailable: {str(exc).splitlines()[0][:120]})"
        from fp8flow_megatron.kernels.transpose import ColumnwiseGemmReady
        from fp8flow_megatron.numerics import scaling_aware_transpose

        def _columnwise(q, splits):
            out = []
            for t in scaling_aware_transpose(q, splits):
                kk, mb = t.scale_inv.shape
                s = torch.zeros(mb, -(-kk // 4) * 4, dtype=torch.float32, device=t.data.device)
                s[:, :kk] = t.scale_inv.t()
                c = ColumnwiseGemmReady(t.data, s)
                out.append(eng._storage(rowwise_data=None, rowwise_scale_inv=None, columnwise_data=c.data.view(torch.uint8),
                                        columnwise_scale_inv=c.scale_inv, fp8_dtype=eng._e4m3, quantizer=None, is_2D_scaled=False))
            return out

        eng._columnwise = _columnwise
    with torch.no_grad():
        w_q = [eng.quantize_weight(w) for w in weights]
        y_ref = eng.fprop(x_q, w_q, m_splits, torch.bfloat16)
        dx_ref = eng.dgrad(g_q, w_q, m_splits, torch.bfloat16)
        dw_ref = eng.wgrad(g_q, x_q, m_splits, torch.bfloat16)

    def diff(a, b) -> float:
        return (a.float() - b.float()).abs().max().item() if a.numel() else 0.0

    live = [i for i, e in enumerate(m_splits) if e]
    empty = [i for i, e in enumerate(m_splits) if not e]
    result = {
        "te_from": patched_from,
        "transpose_impl": transpose_impl,
        "m_splits": m_splits,
        "vs_plugin": {
            "out": diff(y, y_ref),
            "dgrad": diff(dx, dx_ref),
            "wgrad": max(diff(dw[i], dw_ref[i]) for i in live),
        },
        "vs_stock_on_dequantized": {
            "out": diff(y, y_stock),
            "dgrad": diff(dx, x_deq.grad),
            "wgrad": max(diff(dw[i], getattr(stock, f"weight{i}").grad) for i in live),
        },
        "empty_expert_wgrad_absmax": max((dw[i].float().abs().max().item() for i in empty), default=0.0),
        "out_absmax": y_ref.float().abs().max().item(),
        "wgrad_absmax": max(dw_ref[i].float().abs().max().item() for i in live),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    sys.exit(main())
