"""The non-finite guard's once-per-iteration check in Megatron-LM's own training loop (both Megatron-LM routes:
scripts/pretrain_gpt_fp8flow.py and the patched pretrain_gpt.py).

Megatron-LM's `train()` (megatron/training/training.py, core_v0.16) calls the module-level `train_step(...,
iteration=i)` once per iteration, and `evaluate_and_print_results(prefix, forward_step_func, data_iterator, model,
iteration, ...)` for every evaluation, both by their module-global names. Wrapping those two names makes the check run
right after each step -- where train_step has just reduced the loss and the optimizer has read the gradient norm, so the
stream is drained already -- and after each evaluation, on every rank, naming Megatron-LM's logged (1-based) iteration.
An inf or NaN that reached an FP8 quantizer during iteration i therefore stops the run before iteration i + 1 starts
and before a checkpoint of iteration i is written (save_checkpoint runs after train_step returns). Where Megatron-LM's
own NaN checks (--check-for-nan-in-loss-and-grad) stop the step first, the error raised is the guard's, naming the FP8
site, with Megatron-LM's as its cause.
"""

from __future__ import annotations

import functools
import logging
import sys

from ..ops.nonfinite import guard

log = logging.getLogger(__name__)
_MARKER = "_fp8flow_nonfinite_check"
TRAINING_MODULE = "megatron.training.training"


def install_megatron_lm_step_check() -> bool:
    """Wrap Megatron-LM's train_step / evaluate_and_print_results with the non-finite guard's check. Only where
    Megatron-LM's training loop is imported already (the megatron-core wheel has none, and nothing is imported here);
    idempotent, logged. Returns whether it installed now."""
    training = sys.modules.get(TRAINING_MODULE)
    if training is None or getattr(getattr(training, "train_step", None), _MARKER, False):
        return False
    train_step = training.train_step

    @functools.wraps(train_step)
    def checked_train_step(*args, **kwargs):
        iteration = kwargs.get("iteration")
        if iteration is None:  # older signature: the loop keeps the current iteration on args
            from megatron.training import get_args

            iteration = getattr(get_args(), "curr_iteration", 0)
        iteration = int(iteration) + 1  # train_step's iteration is 0-based; Megatron-LM logs iteration + 1
        try:
            out = train_step(*args, **kwargs)
        except Exception as failure:
            # Megatron-LM's own checks (--check-for-nan-in-loss-and-grad, on by default: each micro-batch's loss, the
            # gradients) may stop the step first, on the ranks that saw a NaN. Say which FP8 site it came through, from
            # this rank's flags only: its peers need not be failing, so no collective here.
            try:
                guard.check(iteration, collective=False)
            except FloatingPointError as located:
                raise located from failure
            raise
        guard.check(iteration)
        return out

    setattr(checked_train_step, _MARKER, True)
    training.train_step = checked_train_step

    evaluate = getattr(training, "evaluate_and_print_results", None)
    if evaluate is not None:

        @functools.wraps(evaluate)
        def checked_evaluate(*args, **kwargs):
            out = evaluate(*args, **kwargs)
            iteration = kwargs.get("iteration", args[4] if len(args) > 4 else 0)
            guard.check(int(iteration), phase="evaluation")
            return out

        setattr(checked_evaluate, _MARKER, True)
        training.evaluate_and_print_results = checked_evaluate
    log.info("fp8flow: %s.train_step (and evaluate_and_print_results) end with the FP8 non-finite check", TRAINING_MODULE)
    return True
