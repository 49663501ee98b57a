"""The trainer's checkpoints: megatron-core dist checkpointing (torch_dist) of the model, the (distributed) optimizer
and the LR scheduler, laid out as Megatron-LM lays them out (iter_NNNNNNN/ + latest_checkpointed_iteration.txt), so a
stopped run resumes exactly with --load."""

from __future__ import annotations

from pathlib import Path

import torch.distributed as dist


def sharded_state_dict_metadata(args) -> dict:
    """What Megatron-LM passes to sharded_state_dict (training/checkpointing.py, _build_sharded_state_dict_metadata, for
    the torch_dist format): the distributed optimizer saves its state 'dp_reshardable' (megatron-core 0.16's
    dist-checkpointing refuses the older flattened-range layout)."""
    from megatron.core import parallel_state

    metadata = {"singleton_local_shards": False, "chained_optim_avoid_prefix": True}
    if args.use_distributed_optimizer:
        metadata["distrib_optim_sharding_type"] = "dp_reshardable"
    metadata["dp_cp_group"] = parallel_state.get_data_parallel_group(with_context_parallel=True)
    return metadata


def save_checkpoint(args, step, model, optimizer, scheduler) -> None:
    from megatron.core import dist_checkpointing

    from .megatron.cpu_shims import cuda_to_cpu

    path = Path(args.save) / f"iter_{step:07d}"
    if args.rank == 0:
        path.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    metadata = sharded_state_dict_metadata(args)
    model_sd = model.module.sharded_state_dict(metadata=metadata)
    with cuda_to_cpu():
        state = {
            "model": model_sd, "optimizer": optimizer.sharded_state_dict(model_sd, metadata=metadata),
            "scheduler": scheduler.state_dict(), "iteration": step,
        }
        content = {k: v for k, v in metadata.items() if k != "dp_cp_group"}
        dist_checkpointing.save(state, str(path), content_metadata=content)
    if args.rank == 0:
        (Path(args.save) / "latest_checkpointed_iteration.txt").write_text(str(step))
    dist.barrier()


def load_checkpoint(args, model, optimizer, scheduler) -> int:
    from megatron.core import dist_checkpointing

    from .megatron.cpu_shims import cuda_to_cpu, init_torch_adam_state_for_load, restore_torch_adam_step_after_load

    tracker = Path(args.load) / "latest_checkpointed_iteration.txt"
    if not tracker.exists():
        raise SystemExit(f"--load {args.load}: no latest_checkpointed_iteration.txt there")
    step = int(tracker.read_text())
    metadata = sharded_state_dict_metadata(args)
    model_sd = model.module.sharded_state_dict(metadata=metadata)
    init_torch_adam_state_for_load(optimizer)
    with cuda_to_cpu():
        template = {"model": model_sd, "optimizer": optimizer.sharded_state_dict(model_sd, is_loading=True, metadata=metadata)}
        state = dist_checkpointing.load(template, str(Path(args.load) / f"iter_{step:07d}"))
        model.module.load_state_dict(state["model"])  # FP8-Flow experts requantize on their next forward
        optimizer.load_state_dict(state["optimizer"])
    restore_torch_adam_step_after_load(optimizer)
    scheduler.load_state_dict(state["scheduler"])
    return step
