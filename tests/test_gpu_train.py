"""GPU: the trainer on megatron's schedule re-quantizes every FP8 weight at every step -- TE's (attention, shared
experts: megatron's TE linears cache FP8 weights while is_first_microbatch is False) and FP8-Flow's experts (both GEMM
engines) -- in bf16 with the distributed optimizer.

Probes patched into a spawned trainer process: after every forward of a TE Linear / LayerNormLinear, its cached FP8
weight (`_fp8_workspaces["weight"]`, 128x128 blockwise) must hold the codes of the current weight; after every FP8-Flow
expert forward, the layer's cached FP8 weights must be the quantization of its current weights. Codes are compared
with fp8flow_megatron.numerics, which is bit-identical to TE's 128x128 quantizer (tests/kernels/test_quantize.py).
"""

import os

import pytest
import torch

from fp8flow_megatron.train import DEFAULT_CONFIG

from .megatron.mcore_env import spawn

pytestmark = pytest.mark.gpu

STEPS = 3
ARGS = ["--config", str(DEFAULT_CONFIG), "--transformer-impl", "transformer_engine", "--distributed-backend", "nccl",
        "--bf16", "--use-distributed-optimizer", "--moe-shared-expert-intermediate-size", "128", "--num-layers", "2",
        "--seq-length", "128", "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", str(STEPS),
        "--log-interval", "1", "--lr-warmup-iters", "1", "--lr", "3e-3", "--eval-interval", "1000", "--eval-iters", "1"]


def _codes_match(codes_u8, scale_inv, ref) -> bool:
    n_blocks, k_blocks = ref.scale_inv.shape
    return torch.equal(codes_u8, ref.data.view(torch.uint8)) and torch.equal(scale_inv[:n_blocks, :k_blocks], ref.scale_inv)


def _worker(rank, world_size, port, engine, tmp):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    import transformer_engine.pytorch as te

    from fp8flow_megatron import train
    from fp8flow_megatron.megatron.experts import FP8FlowGroupedMLP
    from fp8flow_megatron.numerics import quantize_128x128
    from fp8flow_megatron.ops.fp8_tensor import Fp8FlowTensor

    report = {"te_forwards": 0, "te_stale": 0, "te_first_flags": [], "expert_forwards": 0, "expert_stale": 0}

    def probe_te(cls):
        forward = cls.forward

        def probed(self, inp, *args, **kwargs):
            out = forward(self, inp, *args, **kwargs)
            workspace = getattr(self, "_fp8_workspaces", {}).get("weight")
            if workspace is not None and getattr(workspace, "_rowwise_data", None) is not None and self.training:
                report["te_forwards"] += 1
                if len(report["te_first_flags"]) < 200:
                    report["te_first_flags"].append(kwargs.get("is_first_microbatch"))
                ref = quantize_128x128(self.weight.detach())
                if not _codes_match(workspace._rowwise_data, workspace._rowwise_scale_inv, ref):
                    report["te_stale"] += 1
            return out

        cls.forward = probed

    probe_te(te.Linear)
    probe_te(te.LayerNormLinear)
    expert_forward = FP8FlowGroupedMLP.forward

    def probed_experts(self, x, tokens_per_expert, probs):
        out = expert_forward(self, x, tokens_per_expert, probs)
        if isinstance(x, Fp8FlowTensor):
            report["expert_forwards"] += 1
            for name, linear in (("fc1", self.linear_fc1), ("fc2", self.linear_fc2)):
                cached = self._weight_cache.cached(name)
                for e, w in enumerate(self._weights(linear)):
                    ref = quantize_128x128(w.detach())
                    if self.gemm_engine == "triton":
                        ok = _codes_match(cached[0].data[e].view(torch.uint8), cached[0].scale_inv[e], ref)
                    else:  # TE's Float8BlockwiseQTensor per expert (scales padded to 4 columns)
                        ok = _codes_match(cached[e]._rowwise_data, cached[e]._rowwise_scale_inv, ref)
                    report["expert_stale"] += 0 if ok else 1
        return out

    FP8FlowGroupedMLP.forward = probed_experts
    history = train.main(ARGS + ["--moe-fp8-flow-gemm", engine, "--output-dir", f"{tmp}/run", "--data-cache-path", f"{tmp}/cache"])
    report["losses"] = [row["loss"] for row in history]
    return report


@pytest.mark.parametrize("engine", ["triton", "te"])
def test_trainer_requantizes_te_and_fp8flow_weights_every_step(tmp_path, engine):
    report = spawn(_worker, 1, engine, str(tmp_path))[0]
    assert report["expert_stale"] == 0, report
    # (2 micro-batches x STEPS + the final evaluation's 1) x 2 MoE layers
    assert report["expert_forwards"] == (2 * STEPS + 1) * 2, report
    assert report["te_forwards"] > 0, "no TE linear cached an FP8 weight: is the TE recipe on?"
    assert report["te_stale"] == 0, f"TE linears computed with stale FP8 weights: {report}"
    # megatron's protocol as the TE linears saw it: each step's first micro-batch True, the second False
    flags = report["te_first_flags"]
    assert True in flags and False in flags, flags
    assert report["losses"][-1] < report["losses"][0]


def test_bf16_distributed_optimizer_resume_is_exact_on_gpu(tmp_path):
    """Save at iteration 3 of 6 through megatron dist checkpointing (TE's FusedAdam state, 'dp_reshardable') and resume:
    the resumed iterations' losses equal the uninterrupted run's. The saving run repeats the uninterrupted one first
    (same command up to the save), which separates a nondeterministic GPU run from a wrong resume."""
    from .test_train import _losses, _run

    base = ARGS[2:] + ["--train-iters", "6", "--moe-fp8-flow-gemm", "triton"]  # ARGS[:2] is the default --config
    _run(base + ["--output-dir", str(tmp_path / "full")], tmp_path)
    _run(base + ["--save", str(tmp_path / "ckpt"), "--save-interval", "3", "--output-dir", str(tmp_path / "first")], tmp_path)
    (tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").write_text("3")
    _run(base + ["--load", str(tmp_path / "ckpt"), "--output-dir", str(tmp_path / "resumed")], tmp_path)
    full, first, resumed = (_losses(tmp_path / d) for d in ("full", "first", "resumed"))
    assert first == full, f"two identical GPU runs differ (nondeterminism, not resume): {first} vs {full}"
    assert sorted(resumed) == [4, 5, 6]
    for it in resumed:
        assert resumed[it] == full[it], (it, resumed[it], full[it])


def _graph_worker(rank, world_size, port, extra, tmp):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    from fp8flow_megatron import train
    from fp8flow_megatron.megatron.cuda_graph import MoELayerCudaGraphs

    report = {"captures": 0, "replays": 0}
    capture, routed = MoELayerCudaGraphs._capture, MoELayerCudaGraphs.routed

    def counted_capture(self, *args):
        report["captures"] += 1
        return capture(self, *args)

    def counted_routed(self, *args):
        before = self.num_replays
        out = routed(self, *args)
        report["replays"] += self.num_replays - before
        return out

    MoELayerCudaGraphs._capture, MoELayerCudaGraphs.routed = counted_capture, counted_routed
    history = train.main(ARGS + extra + ["--output-dir", f"{tmp}/run", "--data-cache-path", f"{tmp}/cache"])
    report["losses"] = {row["iteration"]: row["loss"] for row in history}
    report["val_losses"] = {row["iteration"]: row["val_loss"] for row in history if "val_loss" in row}
    return report


@pytest.mark.xfail(reason="known (H200, 2026-12-02): the backward capture fails inside the trainer with "
                   "cudaErrorStreamCaptureImplicit (both capture_error_modes); the flag is refused without "
                   "FP8FLOW_EXPERIMENTAL_CUDA_GRAPH=1 until it is fixed (issue 16)", strict=False)
@pytest.mark.parametrize("fusion", [[], ["--no-gradient-accumulation-fusion"]], ids=["default_fusion", "no_fusion"])
def test_cuda_graphed_trainer_losses_equal_eager(tmp_path, fusion, monkeypatch):
    monkeypatch.setenv("FP8FLOW_EXPERIMENTAL_CUDA_GRAPH", "1")  # inherited by the spawned rank
    """--moe-fp8-flow-cuda-graph in the trainer (bf16, distributed optimizer, megatron's schedule, 2 micro-batches
    per step, 2 MoE layers): the same losses bit for bit as the eager run, every iteration, with an evaluation in
    between. Logging only at the last iteration (telemetry iterations run eager), so steps 1-5 replay graphs."""
    iters = 6
    extra = ["--train-iters", str(iters), "--log-interval", "100", "--moe-fp8-flow-gemm", "triton",
             "--eval-interval", "3", "--eval-iters", "1", *fusion]
    eager = spawn(_worker_plain, 1, extra, str(tmp_path / "eager"))[0]
    graphed = spawn(_graph_worker, 1, extra + ["--moe-fp8-flow-cuda-graph"], str(tmp_path / "graphed"))[0]
    assert graphed["captures"] == 2, graphed  # one per MoE layer, at its second training call
    # 2 layers x (6 steps x 2 micro-batches - the eager first call - the logged last step's 2)
    assert graphed["replays"] == 2 * (iters * 2 - 1 - 2), graphed
    assert sorted(graphed["losses"]) == list(range(1, iters + 1))
    assert graphed["losses"] == eager["losses"], (graphed["losses"], eager["losses"])
    assert graphed["val_losses"] == eager["val_losses"] and graphed["val_losses"], graphed


def _worker_plain(rank, world_size, port, extra, tmp):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    from fp8flow_megatron import train

    history = train.main(ARGS + extra + ["--output-dir", f"{tmp}/run", "--data-cache-path", f"{tmp}/cache"])
    return {"losses": {row["iteration"]: row["loss"] for row in history},
            "val_losses": {row["iteration"]: row["val_loss"] for row in history if "val_loss" in row}}
