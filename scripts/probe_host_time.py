"""Where the host time of one MoE layer fwd+bwd goes (EP=1, one GPU): host-issue time vs wall time, every
synchronizing CUDA call with its Python stack (torch.cuda.set_sync_debug_mode), and cProfile's top functions.

    source .gpu-bundle/setup.sh && python scripts/probe_host_time.py fp8flow,bf16,te_blockwise

A layer whose host-issue time is close to its wall time is host-bound. Layers come from bench_moe_layer.build_layer.
"""
import cProfile, ctypes, glob, io, os, pstats, statistics, sys, time, traceback, warnings
from pathlib import Path
import torch, torch.distributed as dist
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import bench_moe_layer as B

def cublas_version():
    for pat in ["/usr/local/lib/python3*/dist-packages/nvidia/cu13/lib/libcublasLt.so*", "/usr/local/lib/python3*/*-packages/nvidia/*/lib/libcublasLt.so*", "/usr/local/cuda/lib64/libcublasLt.so*"]:
        for f in glob.glob(pat):
            try:
                lib = ctypes.CDLL(f)
                print("cublasLt", f, lib.cublasLtGetVersion())
            except OSError as e:
                print("cannot load", f, e)

cublas_version()  # TE's single-launch grouped GEMM needs cuBLAS >= 13.4 (printed as 130400)
import transformer_engine.pytorch  # noqa: E402,F401  (loads TE's libraries before megatron imports them)

os.environ.setdefault("MASTER_ADDR", "127.0.0.1"); os.environ.setdefault("MASTER_PORT", "29518")
dist.init_process_group("nccl", rank=0, world_size=1)
from megatron.core import parallel_state
from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
parallel_state.initialize_model_parallel(1, 1, expert_model_parallel_size=1)
model_parallel_cuda_manual_seed(0); torch.manual_seed(0)
class A: pass
args = A()
args.ep = 1  # bench_moe_layer.build_layer reads the expert-parallel size
x = torch.randn(4096, 4, 2048, device="cuda", dtype=torch.bfloat16)
g = torch.randn(4096, 4, 2048, device="cuda", dtype=torch.bfloat16) * 1e-2
for variant in sys.argv[1].split(","):
    layer, fp8 = B.build_layer(variant, args)
    for _ in range(4):
        B.fwd_bwd(layer, fp8, x, g)
    torch.cuda.synchronize()
    walls, hosts = [], []
    for _ in range(10):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record(); t0 = time.perf_counter()
        B.fwd_bwd(layer, fp8, x, g)
        hosts.append((time.perf_counter() - t0) * 1e3)
        e.record(); torch.cuda.synchronize(); walls.append(s.elapsed_time(e))
    # host time when the GPU is kept busy beforehand (a long sleep kernel would hide syncs; measure pure host cost)
    print(f"== {variant}: wall {statistics.median(walls):.2f} ms, host-return {statistics.median(hosts):.2f} ms")
    # syncs
    seen = {}
    def show(message, category, filename, lineno, file=None, line=None):
        st = "".join(traceback.format_stack(limit=9)[:-2])
        seen[st] = seen.get(st, 0) + 1
    old = warnings.showwarning; warnings.showwarning = show
    warnings.simplefilter("always")
    torch.cuda.set_sync_debug_mode("warn")
    B.fwd_bwd(layer, fp8, x, g)
    torch.cuda.set_sync_debug_mode(0)
    warnings.showwarning = old
    torch.cuda.synchronize()
    print(f"-- {variant}: {sum(seen.values())} synchronizing calls")
    for st, n in seen.items():
        print(f"  x{n}\n" + st[-1500:])
    pr = cProfile.Profile(); pr.enable()
    for _ in range(3):
        B.fwd_bwd(layer, fp8, x, g)
    torch.cuda.synchronize()
    pr.disable()
    sio = io.StringIO(); pstats.Stats(pr, stream=sio).sort_stats("tottime").print_stats(22); print(sio.getvalue()[-6000:])
    sio = io.StringIO(); pstats.Stats(pr, stream=sio).sort_stats("cumtime").print_stats(30); print(sio.getvalue()[-7000:])
    del layer; torch.cuda.empty_cache()
