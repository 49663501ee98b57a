"""The trainer follows megatron's per-step protocol: FP8-Flow's FP8 expert weights are the quantization of the live
weights at every forward of every step, in every optimizer setting (fp32, bf16, bf16 + distributed optimizer), they
are quantized exactly once per step (and once per evaluation), and finalize_model_grads runs (the aux-loss-free expert
bias moves).

Each case runs fp8flow_megatron.train.main in a spawned process (torch.distributed and megatron's parallel state are
process-global) with two probes patched in: every FP8-Flow expert forward records the 128x128 quantization of its live
weights, and the reference GEMM engine checks that the FP8 weights its fprop receives are bit-identical to them.
"""

import os

import pytest
import torch

from fp8flow_megatron.train import DEFAULT_CONFIG

from .megatron.mcore_env import spawn

STEPS, EVALS, LAYERS = 4, 2, 2
ARGS = ["--config", str(DEFAULT_CONFIG), "--num-layers", str(LAYERS), "--seq-length", "64", "--max-position-embeddings",
        "64", "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", str(STEPS), "--log-interval", "2",
        "--lr-warmup-iters", "1", "--eval-interval", str(STEPS // EVALS), "--eval-iters", "1", "--lr", "3e-3"]


def _probe_worker(rank, world_size, port, argv, tmp):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size))
    from fp8flow_megatron import train
    from fp8flow_megatron.megatron.experts import FP8FlowGroupedMLP
    from fp8flow_megatron.numerics import dequantize, quantize_128x128
    from fp8flow_megatron.ops.fp8_tensor import Fp8FlowTensor
    from fp8flow_megatron.ops.gemm_engine import ReferenceGemm

    expected, report = [], {"fprops": 0, "mismatched": [], "quantizations": 0, "stale_gap": 0.0, "ungathered": 0, "used": []}
    built = {}
    forward, fprop, quantize = FP8FlowGroupedMLP.forward, ReferenceGemm.fprop, ReferenceGemm.quantize_weights

    def probed_forward(self, x, tokens_per_expert, probs):
        if isinstance(x, Fp8FlowTensor):  # fc1 then fc2: whose live weights the next two fprops must use
            expected.extend([self._weights(self.linear_fc1), self._weights(self.linear_fc2)])
        return forward(self, x, tokens_per_expert, probs)

    def probed_fprop(self, x_q, weights, m_splits, out_dtype):
        # quantized here, not at forward entry: with --overlap-param-gather the weights arrive inside the forward
        live = expected.pop(0)
        want = [quantize_128x128(w.detach()) for w in live]
        # and by then their all-gather must have been waited for (megatron's DDP drops the handle once it has)
        buckets = getattr(built.get("model"), "param_to_bucket_group", {})
        report["ungathered"] += sum(1 for w in live if w in buckets and buckets[w].param_gather_handle is not None)
        report["fprops"] += 1
        # the same on every data-parallel rank: a rank whose expert shards were never all-gathered computes with stale
        # weights while its local comparison above still agrees with itself
        report["used"].append(sum(float(w_q.data.float().sum()) + float(w_q.scale_inv.sum()) for w_q, _ in weights))
        for i, ((w_q, _), ref) in enumerate(zip(weights, want)):
            if not (torch.equal(w_q.data.view(torch.uint8), ref.data.view(torch.uint8)) and torch.equal(w_q.scale_inv, ref.scale_inv)):
                gap = float((dequantize(w_q) - dequantize(ref)).norm() / dequantize(ref).norm())
                report["mismatched"].append((report["fprops"], i))
                report["stale_gap"] = max(report["stale_gap"], gap)
        return fprop(self, x_q, weights, m_splits, out_dtype)

    def counted_quantize(self, weights, **kwargs):
        report["quantizations"] += 1
        return quantize(self, weights, **kwargs)

    FP8FlowGroupedMLP.forward, ReferenceGemm.fprop = probed_forward, probed_fprop
    ReferenceGemm.quantize_weights = counted_quantize
    build_model = train.build_model

    def keep_model(args, tokenizer):
        built["model"], config = build_model(args, tokenizer)
        return built["model"], config

    train.build_model = keep_model
    history = train.main(argv + ["--output-dir", f"{tmp}/run", "--data-cache-path", f"{tmp}/cache"])
    report["losses"] = [row["loss"] for row in history]
    report["expert_bias"] = [
        m.expert_bias.detach().float().clone() for m in built["model"].modules() if getattr(m, "expert_bias", None) is not None
    ]
    return report


def _run(tmp_path, extra, world_size=1):
    reports = spawn(_probe_worker, world_size, ARGS + list(extra), str(tmp_path))
    for rank in range(1, world_size):
        assert reports[rank]["used"] == reports[0]["used"], f"rank {rank}'s experts used other FP8 weights than rank 0's"
    return reports[0]


OPTIMIZERS = {
    "fp32": ([], 1),
    "bf16": (["--bf16"], 1),
    "bf16_distributed": (["--bf16", "--use-distributed-optimizer"], 1),
    # two data-parallel ranks: the parameter all-gather is real and overlapped with the next forward, which must wait
    # for it before quantizing (FP8-Flow runs linear_fc1/fc2's DDP pre-hooks itself)
    "bf16_distributed_overlap_dp2": (["--bf16", "--use-distributed-optimizer", "--overlap-grad-reduce",
                                      "--overlap-param-gather"], 2),
}


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
def test_fp8_expert_weights_follow_every_optimizer_step(tmp_path, optimizer):
    extra, world_size = OPTIMIZERS[optimizer]
    report = _run(tmp_path, extra, world_size)
    micro_batches = 2 // world_size  # global batch 4 = micro-batch 2 x DP x micro-batches
    # micro-batches x STEPS steps + EVALS evaluations of 1 micro-batch, each an fc1 and an fc2 fprop per layer
    assert report["fprops"] == (micro_batches * STEPS + EVALS) * LAYERS * 2
    assert not report["mismatched"], (
        f"{optimizer}: {len(report['mismatched'])} expert fprops used stale FP8 weights (relative L2 gap to the live "
        f"weights' quantization up to {report['stale_gap']:.3g})"
    )
    assert report["ungathered"] == 0, f"{optimizer}: FP8 weights quantized before their parameter all-gather finished"
    # exactly once per step and per evaluation, for each linear of each layer: micro-batches reuse the codes
    assert report["quantizations"] == (STEPS + EVALS) * LAYERS * 2
    assert report["losses"][-1] < report["losses"][0]


@pytest.mark.slow
def test_expert_bias_updates_through_finalize_model_grads(tmp_path):
    """Aux-loss-free balancing (DeepSeek-V3's --moe-router-enable-expert-bias): megatron updates the bias in
    finalize_model_grads from the step's token counts; a loop that skips it leaves the bias at zero."""
    report = _run(tmp_path, ["--bf16", "--use-distributed-optimizer", "--moe-router-enable-expert-bias",
                             "--moe-router-score-function", "sigmoid", "--moe-router-load-balancing-type", "none",
                             "--moe-aux-loss-coeff", "0", "--moe-router-bias-update-rate", "1e-2"])
    biases = report["expert_bias"]
    assert len(biases) == LAYERS
    for bias in biases:
        assert float(bias.abs().sum()) > 0, "the expert bias never moved: finalize_model_grads did not run"
        steps = bias / 1e-2  # each update adds +-rate (or 0) per expert (megatron keeps the bias fp32 in the router;
        # between steps Float16Module's bf16 copy can round it, hence the tolerance)
        assert torch.allclose(steps, steps.round(), atol=2e-2) and float(steps.abs().max()) <= STEPS + 0.1


class _TensorNormOptimizer:
    """megatron-core 0.19's optimizers can return the grad norm as a 0-d (CUDA) tensor; 0.16's return a float."""

    def zero_grad(self):
        pass

    def step(self):
        return True, torch.tensor(1.5), None


class _Scheduler:
    steps = 0

    def step(self, increment):
        self.steps += increment


class _Model:
    def zero_grad_buffer(self):
        pass


def test_train_step_returns_a_float_grad_norm_when_the_optimizer_gives_a_tensor(megatron_ep1):
    import json
    from types import SimpleNamespace

    from fp8flow_megatron import train

    def schedule(**_):
        return [{"lm loss": torch.tensor([6.0, 2.0])}, {"lm loss": torch.tensor([2.0, 2.0])}]

    args = SimpleNamespace(num_microbatches=2, seq_length=8, micro_batch_size=1, moe_fp8_flow=False)
    scheduler = _Scheduler()
    loss, grad_norm = train.train_step(args, schedule, _Model(), _TensorNormOptimizer(), scheduler, None, 0,
                                       torch.device("cpu"))
    assert (loss, grad_norm, scheduler.steps) == (2.0, 1.5, 1)
    assert type(grad_norm) is float
    json.dumps({"loss": loss, "grad_norm": grad_norm})  # the metrics row is written as JSON
