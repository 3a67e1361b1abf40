"""Stop at an update boundary when the scheduler asks: SLURM's warning signal before a time limit or a
preemption (``#SBATCH --signal=...USR1@<seconds>``), or SIGTERM.

    stop = PreemptionSignal.install()          # first thing in main(): a signal during start-up counts too
    ...
    # after each optimizer update:
    if stop.requested_everywhere(accelerator):  # every rank gets the same answer at the same update
        save_checkpoint(...)                    # atomic (tmp folder + rename)
        raise Preempted(completed_steps)        # main() exits with PREEMPTED_EXIT_CODE

The handler only sets a flag; nothing happens inside the signal handler. Ranks may receive the signal at
different updates (or only some of them may receive it), so the flag is summed over all ranks each update
(one tiny all-reduce) and every rank stops after the same update: a checkpoint needs all of them.

SIGTERM is handled only inside a SLURM job (``SLURM_JOB_ID`` set): SLURM sends it to every process at a
preemption with ``PreemptMode=REQUEUE``/``CANCEL`` (after ``GraceTime``) and at the time limit (``KillWait``
seconds before SIGKILL). Outside SLURM, SIGTERM keeps its default (stop now), which torchrun relies on to
tear down the other workers when one crashes.
"""
from __future__ import annotations

import os
import signal

PREEMPTED_EXIT_CODE = 75  # sysexits EX_TEMPFAIL: "try again later" (the job requeues and resumes)


class Preempted(Exception):
    """Raised after the preemption checkpoint is written; carries the update it stopped after."""

    def __init__(self, completed_steps: int):
        super().__init__(f"stopped for preemption after update {completed_steps}; checkpoint written")
        self.completed_steps = completed_steps


class PreemptionSignal:
    def __init__(self):
        self.received: int | None = None  # the signal number, once one arrived

    @classmethod
    def install(cls, signals: tuple[int, ...] | None = None) -> "PreemptionSignal":
        """Installs the flag-setting handler for ``signals`` (default: SIGUSR1, plus SIGTERM in a SLURM job)."""
        self = cls()
        if signals is None:
            signals = (signal.SIGUSR1, signal.SIGTERM) if os.environ.get("SLURM_JOB_ID") else (signal.SIGUSR1,)
        for sig in signals:
            signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.received is None:
            os.write(2, f"[rank {os.environ.get('RANK', '0')}] got {signal.Signals(signum).name}: will save a "
                        "checkpoint and stop after the current update\n".encode())
        self.received = signum

    @property
    def requested(self) -> bool:
        """This process got a signal (no communication)."""
        return self.received is not None

    def requested_everywhere(self, accelerator) -> bool:
        """True on every rank if any rank got a signal; call it on all ranks at the same point."""
        if accelerator.num_processes == 1:
            return self.requested
        import torch

        flag = torch.tensor([1.0 if self.requested else 0.0], device=accelerator.device)
        return bool(accelerator.reduce(flag, reduction="sum").item() > 0)
