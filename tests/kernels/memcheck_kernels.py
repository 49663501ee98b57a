"""Runs one kernel family on small edge-case inputs (partial tiles, unaligned views, empty splits, 0 tokens), for
compute-sanitizer. Not a pytest module. Usage, from the repository root:

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --error-exitcode 1 \
        python tests/kernels/memcheck_kernels.py {transpose,quantize,permute,unpermute,swiglu_fwd,swiglu_bwd}
"""

import sys

import torch

from fp8flow_megatron import kernels
from fp8flow_megatron.numerics import Fp8Blockwise, quantize_1x128
from fp8flow_megatron.numerics.permute import routing_rows


def _fp8(m, k):
    q = quantize_1x128(torch.randn(m, k) * torch.exp2(torch.randint(-30, 31, (m, 1)).float()))
    return Fp8Blockwise(q.data.cuda(), q.scale_inv.cuda())


def transpose():
    for layout in ("compact", "gemm_ready"):
        q = _fp8(301, 129)
        kernels.scaling_aware_transpose_cuda(Fp8Blockwise(q.data[1:], q.scale_inv[1:]), [13, 0, 150, 137],
                                             scale_layout=layout)  # fmt: skip
        kernels.scaling_aware_transpose_cuda(_fp8(777, 2048), [0, 129, 0, 648], scale_layout=layout)
        kernels.scaling_aware_transpose_cuda(_fp8(0, 256), [0, 0], scale_layout=layout)


def quantize():
    for m, k in [(0, 128), (1, 1), (129, 300), (500, 2048)]:
        kernels.quantize_1x128_triton(torch.randn(m, k, device="cuda").bfloat16())
    kernels.quantize_1x128_triton(torch.randn(300, 1024, device="cuda")[:, 100:740])


def _routing(tokens, experts, topk):
    top = torch.randn(tokens, experts).topk(topk, dim=1).indices
    routing_map = torch.zeros(tokens, experts, dtype=torch.bool).scatter_(1, top, True)
    routing_map[:, 1] = False
    return routing_map, torch.rand(tokens, experts) * routing_map


def permute():
    for tokens, hidden in [(0, 256), (37, 300), (500, 2048)]:
        routing_map, probs = _routing(tokens, 7, 2)
        src_rows, prob_src, _, _ = routing_rows(routing_map, align=16)
        kernels.permute_pad_rows_triton(_fp8(tokens, hidden), src_rows.cuda(), probs.cuda(), prob_src.cuda())
        kernels.permute_pad_rows_triton(torch.randn(tokens, hidden, device="cuda").bfloat16(), src_rows.cuda())


def unpermute():
    for tokens, hidden in [(0, 256), (37, 300), (500, 2500)]:
        routing_map, probs = _routing(tokens, 7, 2)
        _, _, dst_rows, padded = routing_rows(routing_map, align=16)
        y = torch.randn(sum(padded), hidden, device="cuda").bfloat16()
        kernels.unpermute_unpad_rows_triton(y, dst_rows.cuda(), probs.cuda())
        kernels.unpermute_unpad_rows_triton(y, dst_rows.cuda(), None, torch.float32)


def swiglu_fwd():
    for n, f in [(0, 128), (1, 200), (129, 1408)]:
        kernels.weighted_swiglu_quant_triton(torch.randn(n, 2 * f, device="cuda").bfloat16(), torch.rand(n, device="cuda"))


def swiglu_bwd():
    for n, f in [(0, 128), (1, 200), (129, 1408), (33, 200)]:
        kernels.weighted_swiglu_quant_backward_triton(
            torch.randn(n, f, device="cuda").bfloat16(), torch.randn(n, 2 * f, device="cuda").bfloat16(),
            torch.rand(n, device="cuda"),
        )  # fmt: skip


if __name__ == "__main__":
    name = sys.argv[1]
    {f.__name__: f for f in (transpose, quantize, permute, unpermute, swiglu_fwd, swiglu_bwd)}[name]()
    torch.cuda.synchronize()
    print(f"memcheck workload {name}: done")
