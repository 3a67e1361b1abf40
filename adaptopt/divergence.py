"""Counting updates skipped for an inf/NaN gradient, and stopping when they do not end.

An fp16 overflow skips an update (the loss scaler then lowers the scale), and so does a NaN loss. A few
skips are normal; a long run of them means training has diverged, and every further step burns compute.
``DivergenceMonitor`` stops the run with an error after ``max_consecutive`` skipped updates in a row. The
recipe calls it before the update could be checkpointed, so the last checkpoint on disk is the last
good state.
"""
from __future__ import annotations


class TooManySkippedUpdates(RuntimeError):
    pass


class DivergenceMonitor:
    def __init__(self, max_consecutive: int):
        if max_consecutive < 1:
            raise ValueError(f"max_consecutive must be >= 1 (got {max_consecutive})")
        self.max_consecutive = max_consecutive
        self.skipped = 0  # over the run (this process's part of it, for a resumed run)
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
