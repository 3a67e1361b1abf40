"""Skipped updates: which update counts as skipped, and stopping a run whose skips do not end.

An fp16 overflow skips an update (the loss scaler then lowers the scale), and so does a NaN loss. A few
skips are normal; a long run of them means training has diverged, and every further step burns compute.

``update_applied`` is the one rule the recipes use to tell an applied update from a skipped one. The
training loop asks it once per update and hands the answer to the LR schedule (``ScheduledLR.record_update``),
to ``DivergenceMonitor`` and to the logs. ``DivergenceMonitor`` stops the run with an error after
``max_consecutive`` skipped updates in a row. The recipe calls it before the update could be checkpointed,
so the last checkpoint on disk is the last good state.
"""
from __future__ import annotations

import torch


def update_applied(step_ran: bool, optimizer: torch.optim.Optimizer) -> bool:
    """Whether the update that ended an accumulation cycle changed the parameters.

    ``step_ran``: False when the launcher skipped the step for an fp16 overflow: DeepSpeed's engine
    (``not engine.was_step_applied()``) or accelerate's GradScaler (``AcceleratedOptimizer.step_was_skipped``).
    ``optimizer``: the torch optimizer the recipe built. Its own clipper (AdaptOpt's, or the one
    ``build_optimizer`` attached to a baseline) skips a step whose gradient norm is inf/NaN, which the
    launcher does not see: ``grad_clipper.last_finite`` is False after such a step.
    """
    clipper = getattr(optimizer, "grad_clipper", None)
    return step_ran and (clipper is None or clipper.last_finite)


class TooManySkippedUpdates(RuntimeError):
    pass


class DivergenceMonitor:
    """Counts skipped updates; raises TooManySkippedUpdates after ``max_consecutive`` in a row."""

    def __init__(self, max_consecutive: int):
        if max_consecutive < 1:
            raise ValueError(f"max_consecutive must be >= 1 (got {max_consecutive})")
        self.max_consecutive = max_consecutive
        self.skipped = 0  # over the run (this process's part of it, for a resumed run): results.json's skipped_updates
        self.consecutive = 0

    def update(self, applied: bool) -> None:
        """One optimizer update at an accumulation boundary; raises TooManySkippedUpdates."""
        if applied:
            self.consecutive = 0
            return
        self.skipped += 1
        self.consecutive += 1
        if self.consecutive >= self.max_consecutive:
            raise TooManySkippedUpdates(
                f"{self.consecutive} updates in a row were skipped because the gradient was inf/NaN "
                f"({self.skipped} skipped in total): training has diverged. The last checkpoint was kept. "
                "Lower --learning_rate, use bf16 instead of fp16, or check the data for bad examples; raise "
                "--max_consecutive_skipped_steps only if the loss scale needs longer to settle."
            )
