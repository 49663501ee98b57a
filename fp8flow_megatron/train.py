"""Train a GPT MoE model on megatron-core with FP8-Flow-MoE.

    python -m fp8flow_megatron.train                                  # configs/tiny_cpu.yaml: ~1-2 min on 2 CPU cores
    python -m fp8flow_megatron.train --config configs/deepseek_v2_lite_proxy.yaml --data-path my_text_document
    torchrun --nproc-per-node 8 -m fp8flow_megatron.train --config configs/deepseek_v2_lite.yaml \\
        --expert-model-parallel-size 8 --data-path ...                # see scripts/pretrain_deepseek_v2_lite.sh

Reads top to bottom: config -> validate -> print -> build (process groups, model, optimizer, data) -> loop. A training
step is Megatron-LM's train_step on megatron-core's own schedule (get_forward_backward_func, finalize_model_grads,
grad_scale_func, no_sync with --overlap-grad-reduce), so TE's FP8 weight caches and FP8-Flow's expert weights follow
the optimizer through megatron's set_is_first_microbatch, and aux-loss scaling, gradient sync and expert-bias updates
are megatron's. Each log line: iteration, loss, lr, tokens/s, peak memory, FP8 health (underflow fraction of the FP8
quantizers, fraction of experts that got no token, load imbalance); each logged metrics.jsonl row carries the full
per-layer telemetry under "health" (ops/telemetry.py). metrics.jsonl is written as iterations finish; loss_curve.png
at the end, both in --output-dir. With FP8-Flow on, every iteration (and every evaluation) ends with the non-finite
guard's check (ops/nonfinite.py): an inf or NaN that reached an FP8 quantizer stops the run naming layer, site, pass and
iteration, before the loss check.
"""

from __future__ import annotations

import json
import math
import os
import resource
import sys
import time
from pathlib import Path
from typing import List, Optional

import torch
import torch.distributed as dist

from .checkpointing import load_checkpoint, save_checkpoint
from .ops.nonfinite import guard as nonfinite_guard

REPO_CONFIGS = Path(__file__).resolve().parent.parent / "configs"
DEFAULT_CONFIG = REPO_CONFIGS / "tiny_cpu.yaml"


# ------------------------------------------------------------------------------------------------------ config
def parse_config(argv: Optional[List[str]] = None):
    from .megatron.arguments import build_parser
    from .megatron.config import parse_args_with_yaml

    argv = list(sys.argv[1:] if argv is None else argv)
    if "--config" not in argv and not any(a.startswith("--config=") for a in argv):
        if not DEFAULT_CONFIG.exists():
            raise SystemExit(f"default config {DEFAULT_CONFIG} not found; pass --config FILE.yaml")
        argv = ["--config", str(DEFAULT_CONFIG)] + argv
    args = parse_args_with_yaml(build_parser(), argv)
    args.world_size = int(os.environ.get("WORLD_SIZE", "1"))
    args.rank = int(os.environ.get("RANK", "0"))
    args.use_cuda = torch.cuda.is_available()
    args.distributed_backend = args.distributed_backend or ("nccl" if args.use_cuda else "gloo")
    parallel = args.tensor_model_parallel_size * args.pipeline_model_parallel_size
    args.data_parallel_size = args.world_size // parallel  # 0 when the world is too small: validate() says so
    args.global_batch_size = args.global_batch_size or args.micro_batch_size * max(args.data_parallel_size, 1)
    args.num_microbatches = args.global_batch_size // (args.micro_batch_size * max(args.data_parallel_size, 1))
    args.max_position_embeddings = args.max_position_embeddings or args.seq_length
    args.output_dir = args.output_dir or str(Path("runs") / Path(args.config).stem)
    return args


def validate(args) -> None:
    from .megatron.config import validate_fp8_flow

    validate_fp8_flow(args)
    problems = []
    parallel = args.tensor_model_parallel_size * args.pipeline_model_parallel_size
    if args.world_size % parallel or args.world_size < parallel:
        problems.append(f"WORLD_SIZE {args.world_size} is not a multiple of TP x PP = {parallel} (launch with torchrun)")
    if args.pipeline_model_parallel_size != 1:
        problems.append("this trainer runs --pipeline-model-parallel-size 1 (use Megatron-LM for PP: scripts/pretrain_gpt_fp8flow.py route)")
    if args.global_batch_size % (args.micro_batch_size * args.data_parallel_size):
        problems.append(
            f"--global-batch-size {args.global_batch_size} must be a multiple of --micro-batch-size x DP "
            f"({args.micro_batch_size} x {args.data_parallel_size})"
        )
    if args.num_experts and args.data_parallel_size % args.expert_model_parallel_size:
        problems.append(f"--expert-model-parallel-size {args.expert_model_parallel_size} must divide DP {args.data_parallel_size}")
    if args.mtp_num_layers:
        problems.append("--mtp-num-layers is not supported by fp8flow_megatron.train (drop it, or train through Megatron-LM)")
    if args.lr_warmup_iters >= args.train_iters:
        problems.append(f"--lr-warmup-iters {args.lr_warmup_iters} must be below --train-iters {args.train_iters}")
    if args.data_path and (args.train_data_path or args.valid_data_path or args.test_data_path):
        problems.append("--data-path cannot be combined with --train-data-path / --valid-data-path / --test-data-path "
                        "(as in Megatron-LM): give one --data-path split by --split, or a path per split")
    if args.save_interval and not args.save:
        problems.append("--save-interval needs --save DIR")
    if args.overlap_param_gather and not args.use_distributed_optimizer:
        problems.append("--overlap-param-gather needs --use-distributed-optimizer (as in Megatron-LM)")
    if args.gradient_accumulation_fusion and not _grad_accum_fusion_available(args):
        problems.append(
            "--gradient-accumulation-fusion needs TransformerEngine for the transformer layers and apex's "
            "fused_weight_gradient_mlp_cuda for megatron's output layer (ColumnParallelLinear); one is missing here. "
            "Fix: --no-gradient-accumulation-fusion (the default when they are missing)"
        )
    if problems:
        raise SystemExit("invalid configuration:\n  - " + "\n  - ".join(problems))


def _grad_accum_fusion_available(args) -> bool:
    """megatron's gradient_accumulation_fusion: TE's linears fuse it themselves; megatron's own ColumnParallelLinear
    (the output layer) needs apex's fused_weight_gradient_mlp_cuda and refuses to build without it."""
    if not (args.use_cuda and args.transformer_impl != "local" and _te_importable()):
        return False
    try:
        import fused_weight_gradient_mlp_cuda  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_defaults(args) -> None:
    """Flags whose default depends on the machine, resolved before the configuration is printed."""
    if args.gradient_accumulation_fusion is None:  # Megatron-LM's default is on; here on wherever it can build
        args.gradient_accumulation_fusion = _grad_accum_fusion_available(args)


def print_config(args) -> None:
    if args.rank != 0:
        return
    print("fp8flow_megatron.train: resolved configuration", flush=True)
    for key in sorted(vars(args)):
        print(f"  {key:40s} {getattr(args, key)}")
    mode = "real FP8 through TE" if args.use_cuda else "emulated exactly on CPU (fp8flow_megatron.numerics)"
    graphs = ", MoE layers replayed from CUDA graphs" if getattr(args, "moe_fp8_flow_cuda_graph", False) else ""
    print(f"  FP8-Flow: {'on' if args.moe_fp8_flow else 'off'}, {mode}{graphs}", flush=True)


# ------------------------------------------------------------------------------------------------------- build
def init_distributed(args) -> None:
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from .megatron.cpu_shims import install_cpu_shims
    from .megatron.stock_fixes import install_grouped_extra_state_fix

    install_cpu_shims()
    install_grouped_extra_state_fix()  # the stock TE-blockwise baseline saves checkpoints too
    if args.use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        if "MASTER_ADDR" not in os.environ:  # a plain single-process run
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
        dist.init_process_group(args.distributed_backend, rank=args.rank, world_size=args.world_size)
    parallel_state.initialize_model_parallel(
        args.tensor_model_parallel_size,
        args.pipeline_model_parallel_size,
        expert_model_parallel_size=args.expert_model_parallel_size,
        expert_tensor_parallel_size=args.expert_tensor_parallel_size,
    )
    torch.manual_seed(args.seed)
    model_parallel_cuda_manual_seed(args.seed)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _te_importable() -> bool:
    try:
        import transformer_engine.pytorch  # noqa: F401

        return True
    except Exception:
        return False


def build_model(args, tokenizer):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.models.gpt import GPTModel

    from .megatron.arguments import transformer_config_from_args
    from .megatron.config import FP8FlowConfig, apply_to_transformer_config
    from .megatron.spec import get_fp8flow_decoder_block_spec

    use_te = args.transformer_impl != "local" and args.use_cuda and _te_importable()
    if not use_te and not args.moe_fp8_flow and args.moe_grouped_gemm:
        # megatron's non-TE grouped experts need the grouped_gemm package; SequentialMLP computes the same function
        print("note: --moe-grouped-gemm without TransformerEngine: stock experts run as SequentialMLP", flush=True)
        args.moe_grouped_gemm = False
    config = transformer_config_from_args(args, use_te)
    apply_to_transformer_config(config, FP8FlowConfig.from_source(args))
    spec = get_fp8flow_decoder_block_spec(config, use_transformer_engine=use_te, normalization=args.normalization)
    vocab = _padded_vocab(tokenizer.vocab_size, args.make_vocab_size_divisible_by * args.tensor_model_parallel_size)
    model = GPTModel(
        config,
        spec,
        vocab_size=vocab,
        max_sequence_length=args.max_position_embeddings,
        share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
        position_embedding_type=args.position_embedding_type,
        rotary_percent=args.rotary_percent,
        rotary_base=args.rotary_base,
        rope_scaling=False,
    )
    if args.use_cuda:
        model.cuda()
    if args.bf16:  # as Megatron-LM's get_model: every parameter bf16 (norms too), fp32 logits for the loss
        from megatron.core.transformer.module import Float16Module

        model = Float16Module(config, model)
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=args.overlap_grad_reduce,
        overlap_param_gather=args.overlap_param_gather, use_distributed_optimizer=args.use_distributed_optimizer,
    )
    return DistributedDataParallel(config, ddp_config, model), config


def _padded_vocab(vocab_size: int, multiple: int) -> int:
    return int(math.ceil(vocab_size / multiple) * multiple)


def build_optimizer(args, model):
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    from .megatron.cpu_shims import cuda_to_cpu

    opt_config = OptimizerConfig(
        optimizer="adam", lr=args.lr, min_lr=args.min_lr, weight_decay=args.weight_decay, adam_beta1=args.adam_beta1,
        adam_beta2=args.adam_beta2, adam_eps=args.adam_eps, clip_grad=args.clip_grad, bf16=args.bf16,
        params_dtype=torch.bfloat16 if args.bf16 else torch.float32, use_distributed_optimizer=args.use_distributed_optimizer,
    )
    with cuda_to_cpu():
        optimizer = get_megatron_optimizer(opt_config, [model])
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0 if args.lr_warmup_iters else args.lr, max_lr=args.lr, min_lr=args.min_lr,
        lr_warmup_steps=args.lr_warmup_iters, lr_decay_steps=args.train_iters, lr_decay_style=args.lr_decay_style,
        start_wd=args.weight_decay, end_wd=args.weight_decay, wd_incr_steps=args.train_iters, wd_incr_style="constant",
    )
    return optimizer, scheduler


def build_data(args):
    from megatron.core import parallel_state

    from .data import build_datasets, build_tokenizer, train_valid_test_num_samples

    tokenizer = build_tokenizer(args.tokenizer_type, vocab_size=args.vocab_size)
    num_samples = train_valid_test_num_samples(
        train_iters=args.train_iters, global_batch_size=args.global_batch_size, eval_interval=args.eval_interval,
        eval_iters=args.eval_iters,
    )
    datasets = build_datasets(
        seq_length=args.seq_length, num_samples=num_samples, data_path=args.data_path, split=args.split,
        train_data_path=args.train_data_path, valid_data_path=args.valid_data_path,
        test_data_path=args.test_data_path,
        tokenizer=tokenizer, seed=args.seed, data_cache_path=args.data_cache_path,
        create_attention_mask=False,  # get_batch builds one causal mask per batch, not one [s, s] mask per sample
    )
    args.dp_rank = parallel_state.get_data_parallel_rank()
    return tokenizer, datasets


def get_batch(dataset, args, step: int, micro: int, device):
    """Deterministic sample indices from (step, micro-batch, DP rank): resuming at step N reads what an uninterrupted
    run would have read."""
    start = step * args.global_batch_size + (micro * args.data_parallel_size + args.dp_rank) * args.micro_batch_size
    samples = [dataset[(start + i) % len(dataset)] for i in range(args.micro_batch_size)]
    batch = {k: torch.stack([torch.as_tensor(s[k]) for s in samples]).to(device) for k in ("tokens", "labels", "loss_mask", "position_ids")}
    s = args.seq_length
    batch["attention_mask"] = torch.triu(torch.ones(1, 1, s, s, dtype=torch.bool, device=device), diagonal=1)
    return batch


def micro_batches(dataset, args, step: int, count: int, device):
    """The data iterator megatron's schedule pulls `count` micro-batches from: those of iteration `step`."""
    return (get_batch(dataset, args, step, micro, device) for micro in range(count))


def loss_func(loss_mask, per_token_loss):
    """Megatron-LM's pretrain_gpt loss: the summed masked cross-entropy and its token count (the schedule divides by
    both the tokens and the micro-batches); the report carries (sum, tokens) for a token-weighted mean."""
    mask = loss_mask.view(-1).float()
    loss = torch.sum(per_token_loss.view(-1).float() * mask)
    num_tokens = mask.sum().to(torch.int)
    return loss, num_tokens, {"lm loss": torch.cat([loss.detach().view(1), num_tokens.detach().view(1).float()])}


def forward_step(data_iterator, model):
    """megatron's forward_step_func: (per-token loss, the function that reduces it)."""
    from functools import partial

    batch = next(data_iterator)
    per_token = model(batch["tokens"], batch["position_ids"], batch["attention_mask"], labels=batch["labels"])
    return per_token, partial(loss_func, batch["loss_mask"])


def setup_schedule(args, model, optimizer):
    """Wire megatron's schedule hooks as Megatron-LM's training.setup does, and return the schedule."""
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.pipeline_parallel import get_forward_backward_func

    config = model.config
    config.grad_scale_func = optimizer.scale_loss
    if args.overlap_grad_reduce:
        config.no_sync_func = model.no_sync
        config.grad_sync_func = model.start_grad_sync
    config.finalize_model_grads_func = finalize_model_grads
    return get_forward_backward_func()


def _reduce_lm_loss(args, losses_reduced, device) -> float:
    """Token-weighted mean of the micro-batches' losses over the data-parallel ranks (Megatron-LM's report)."""
    from megatron.core import parallel_state

    total = torch.zeros(2, device=device)
    for report in losses_reduced:
        total += report["lm loss"].view(-1)
    dist.all_reduce(total, group=parallel_state.get_data_parallel_group(with_context_parallel=True))
    return float(total[0] / total[1].clamp_min(1))


# --------------------------------------------------------------------------------------------------------- loop
def peak_memory_gb(args) -> float:
    if args.use_cuda:
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def train_step(args, schedule, model, optimizer, scheduler, dataset, step, device):
    """One iteration, as Megatron-LM's train_step: zero the grad buffers, forward/backward every micro-batch on
    megatron's schedule (which marks the first micro-batch, scales the aux loss and finalizes the gradients), step."""
    from .megatron.cpu_shims import cuda_to_cpu

    model.zero_grad_buffer()
    optimizer.zero_grad()
    losses_reduced = schedule(
        forward_step_func=forward_step, data_iterator=micro_batches(dataset, args, step, args.num_microbatches, device),
        model=[model], num_microbatches=args.num_microbatches, seq_length=args.seq_length,
        micro_batch_size=args.micro_batch_size, forward_only=False,
    )
    with cuda_to_cpu():
        update_successful, grad_norm, _ = optimizer.step()
    if isinstance(grad_norm, torch.Tensor):
        # megatron-core 0.19's optimizers may hand back the norm as a 0-d CUDA tensor (0.16 gives a float); the row is
        # logged and written as JSON, so it becomes a float here (one sync per step, which the loss check pays anyway)
        grad_norm = float(grad_norm)
    if update_successful:
        scheduler.step(increment=1)
    loss = _reduce_lm_loss(args, losses_reduced, device)
    if args.moe_fp8_flow:
        # first: it names the FP8 site where an inf/NaN entered, which the loss check below cannot; the loss was just
        # read on the host, so the flags' read adds no stall
        nonfinite_guard.check(step + 1)
    if not math.isfinite(loss):
        raise FloatingPointError(
            f"iteration {step + 1}: training loss is {loss}. Lower --lr or check the data; --no-moe-fp8-flow shows "
            f"whether the model diverges without FP8-Flow."
        )
    return loss, grad_norm


def evaluate(args, schedule, model, dataset, device, step) -> float:
    """Validation loss on --eval-iters micro-batches, forward only on megatron's schedule (its first micro-batch marks
    a new step, so FP8 weights are the current ones)."""
    if args.overlap_param_gather:  # as Megatron-LM: gather all parameters now instead of in forward pre-hooks
        model.disable_forward_pre_hook()
    model.eval()
    with torch.no_grad():
        # eval round `step` reads --eval-iters consecutive micro-batches of its own, as before
        batches = (get_batch(dataset, args, step * args.eval_iters + i, 0, device) for i in range(args.eval_iters))
        losses_reduced = schedule(
            forward_step_func=forward_step, data_iterator=batches, model=[model], num_microbatches=args.eval_iters, seq_length=args.seq_length,
            micro_batch_size=args.micro_batch_size, forward_only=True,
        )
    model.train()
    if args.overlap_param_gather:
        model.enable_forward_pre_hook()
    return _reduce_lm_loss(args, losses_reduced, device)


def _open_metrics(args, start_step: int):
    """(history, file): metrics.jsonl in --output-dir (rank 0), one JSON row per iteration, written as the iterations
    finish. A run resumed at start_step keeps the rows of iterations <= start_step already there (the run it continues)
    and replaces any later ones."""
    if args.rank != 0:
        return [], None
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "metrics.jsonl"
    kept = []
    if start_step and path.exists():
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        kept = [r for r in rows if r["iteration"] <= start_step]
    f = open(path, "w")
    for row in kept:
        f.write(json.dumps(row) + "\n")
    f.flush()
    return kept, f


def write_loss_curve(args, history) -> Optional[Path]:
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: skipping loss_curve.png (metrics.jsonl has the numbers)")
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["iteration"] for r in history], [r["loss"] for r in history], label="train loss")
    evals = [r for r in history if "val_loss" in r]
    if evals:
        ax.plot([r["iteration"] for r in evals], [r["val_loss"] for r in evals], "o-", label="validation loss")
    ax.set_xlabel("iteration")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(f"{Path(args.config).stem}: FP8-Flow {'on' if args.moe_fp8_flow else 'off'}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "loss_curve.png", dpi=120)
    plt.close(fig)
    return out / "loss_curve.png"


def main(argv: Optional[List[str]] = None) -> List[dict]:
    args = parse_config(argv)
    resolve_defaults(args)
    validate(args)
    print_config(args)

    init_distributed(args)
    device = torch.device("cuda") if args.use_cuda else torch.device("cpu")
    tokenizer, datasets = build_data(args)
    model, _ = build_model(args, tokenizer)
    optimizer, scheduler = build_optimizer(args, model)
    step = load_checkpoint(args, model, optimizer, scheduler) if args.load else 0
    schedule = setup_schedule(args, model, optimizer)
    writer = _tensorboard(args)

    from megatron.core import parallel_state

    from .megatron.telemetry import attach_routing_telemetry
    from .ops.telemetry import monitor

    attach_routing_telemetry(model)
    dp_group = parallel_state.get_data_parallel_group(with_context_parallel=True)

    history, metrics_file = _open_metrics(args, step)
    tokens_per_step = args.global_batch_size * args.seq_length
    interval_start, interval_steps = time.time(), 0
    train_start = time.time()
    while step < args.train_iters:
        logging_now = (step + 1) % args.log_interval == 0 or step + 1 == args.train_iters
        monitor.enabled = logging_now
        loss, grad_norm = train_step(args, schedule, model, optimizer, scheduler, datasets.train, step, device)
        monitor.enabled = False
        step += 1
        interval_steps += 1
        row = {"iteration": step, "loss": loss}
        if logging_now:
            elapsed = time.time() - interval_start
            health = monitor.summary(dp_group)  # every rank: routing counts are summed over data-parallel ranks
            monitor.reset()
            row.update(
                lr=scheduler.optimizer.param_groups[0]["lr"], tokens_per_s=tokens_per_step * interval_steps / elapsed,
                peak_mem_gb=peak_memory_gb(args), grad_norm=grad_norm, fp8_underflow=health["underflow_frac"],
                dead_experts=health["dead_expert_frac"], load_imbalance=health.get("load_imbalance"),
                health=health,
            )
            if args.rank == 0:
                print(
                    f"iter {step:6d}/{args.train_iters} | loss {loss:.4f} | lr {row['lr']:.3e} | "
                    f"tokens/s {row['tokens_per_s']:9.1f} | peak mem {row['peak_mem_gb']:.2f} GB | "
                    f"fp8 underflow {row['fp8_underflow']:.2e} | dead experts {row['dead_experts']:.2f}"
                    + (f" | load imbalance {row['load_imbalance']:.2f}" if row["load_imbalance"] is not None else ""),
                    flush=True,
                )
            if writer:
                for k, v in row.items():
                    if k not in ("iteration", "health") and v is not None:
                        writer.add_scalar(k, v, step)
                for k, v in health.items():
                    writer.add_scalar(f"health/{k}", v, step)
            interval_start, interval_steps = time.time(), 0
        if datasets.valid is not None and (step % args.eval_interval == 0 or step == args.train_iters):
            row["val_loss"] = evaluate(args, schedule, model, datasets.valid, device, step // args.eval_interval)
            if args.moe_fp8_flow:  # the evaluation's forward passes quantized too (tokens, weights, swiglu_out)
                nonfinite_guard.check(step, phase="evaluation")
            if args.rank == 0:
                print(f"iter {step:6d} | validation loss {row['val_loss']:.4f}", flush=True)
        history.append(row)
        if metrics_file:  # streamed, so a run that is stopped early still leaves its rows
            metrics_file.write(json.dumps(row) + "\n")
            metrics_file.flush()
        if args.save and args.save_interval and step % args.save_interval == 0:
            save_checkpoint(args, step, model, optimizer, scheduler)
        if _time_is_up(args, train_start):
            if args.rank == 0:
                print(f"iter {step:6d} | --exit-duration-in-mins {args.exit_duration_in_mins} reached: stopping"
                      + (" (checkpoint saved; --load resumes)" if args.save else ""), flush=True)
            break
    if args.save and (not args.save_interval or step % args.save_interval):
        save_checkpoint(args, step, model, optimizer, scheduler)
    if metrics_file:
        metrics_file.close()
    if args.rank == 0:
        png = write_loss_curve(args, history)
        if history:
            print(f"done: loss {history[0]['loss']:.4f} -> {history[-1]['loss']:.4f}" + (f"; loss curve: {png}" if png else ""))
    return history


def _time_is_up(args, train_start: float) -> bool:
    """Megatron-LM's --exit-duration-in-mins: the same decision on every rank (rank 0's clock, broadcast)."""
    if not args.exit_duration_in_mins:
        return False
    done = torch.tensor([float(time.time() - train_start > 60 * args.exit_duration_in_mins)])
    if args.use_cuda:
        done = done.cuda()
    dist.broadcast(done, src=0)
    return bool(done.item())


def _tensorboard(args):
    if not args.tensorboard_dir or args.rank != 0:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        raise SystemExit(f"--tensorboard-dir needs the tensorboard package (pip install tensorboard): {exc}")
    return SummaryWriter(args.tensorboard_dir)


def cli() -> None:  # console script: fp8flow-train
    from .megatron.config import FP8FlowConfigError

    try:
        main()
    except FP8FlowConfigError as exc:
        raise SystemExit(f"error: {exc}")
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    cli()
