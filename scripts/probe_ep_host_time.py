"""Per-rank host-issue time vs wall time of one MoE layer fwd+bwd at EP=N (ranks aligned by a barrier before each
iteration), and rank 0's cProfile top functions written to $OUT (default /tmp).

    source .gpu-bundle/setup.sh && torchrun --nproc-per-node 4 scripts/probe_ep_host_time.py bf16,te_blockwise,fp8flow
"""
import cProfile, io, os, pstats, statistics, sys, time
from pathlib import Path
import torch, torch.distributed as dist
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import bench_moe_layer as B

class A: pass
args = A(); args.ep = int(os.environ["WORLD_SIZE"]); args.tokens = 16384
rank = B.init_distributed(args)
from megatron.core import parallel_state
from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
parallel_state.initialize_model_parallel(1, 1, expert_model_parallel_size=args.ep)
model_parallel_cuda_manual_seed(0); torch.manual_seed(0)
x, g = B.rank_inputs(args, rank)
x, g = x.bfloat16(), g.bfloat16()
out = Path(os.environ.get("OUT", "/tmp"))
for variant in sys.argv[1].split(","):
    layer, fp8 = B.build_layer(variant, args)
    for _ in range(4):
        B.fwd_bwd(layer, fp8, x, g)
    torch.cuda.synchronize(); dist.barrier()
    walls, hosts = [], []
    for _ in range(12):
        dist.barrier(); torch.cuda.synchronize()
        t0 = time.perf_counter()
        B.fwd_bwd(layer, fp8, x, g)
        hosts.append((time.perf_counter() - t0) * 1e3)
        torch.cuda.synchronize()
        walls.append((time.perf_counter() - t0) * 1e3)
    stats = torch.tensor([statistics.median(hosts), statistics.median(walls)], device="cuda")
    allstats = [torch.zeros_like(stats) for _ in range(args.ep)]
    dist.all_gather(allstats, stats)
    if rank == 0:
        print(f"== {variant} EP={args.ep}: per-rank host-return / wall ms: " + ", ".join(f"{h:.1f}/{w:.1f}" for h, w in (s.tolist() for s in allstats)), flush=True)
    pr = cProfile.Profile(); pr.enable()
    for _ in range(3):
        B.fwd_bwd(layer, fp8, x, g)
    torch.cuda.synchronize()
    pr.disable()
    if rank == 0:
        sio = io.StringIO(); pstats.Stats(pr, stream=sio).sort_stats("tottime").print_stats(25)
        (out / f"cprofile_{variant}_ep{args.ep}.txt").write_text(sio.getvalue())
    del layer; torch.cuda.empty_cache()
dist.destroy_process_group()
