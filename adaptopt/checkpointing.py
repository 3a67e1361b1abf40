"""Checkpoints that survive a crash: written to a temporary folder, then renamed into place.

Layout under ``<output_dir>/checkpoints``::

    step_00000120/            one complete checkpoint (accelerate.save_state + progress.json)
    step_00000180.tmp/        a write in progress (or a crashed one): never resumed from

A rename within one filesystem is atomic, so a checkpoint folder without ``.tmp`` is complete, and a
crash mid-write leaves the previous checkpoint untouched. A write that fails (a full disk, an I/O error, a
permission change) removes its ``.tmp`` folder and raises :class:`CheckpointWriteError`, whose message names
the cause, the folder, the free and the needed space, and the checkpoint a resume will use. ``progress.json`` records where training
was (optimizer updates done, epoch, batches consumed in that epoch, and the number of processes that
wrote it) so a resumed run continues at the same data position.

Another number of processes: a checkpoint of N processes resumes with M, after the same examples consumed
(:func:`resume_position`). Under DDP (or one process) and DeepSpeed ZeRO-0 fp32/fp16 the model and optimizer
state are whole in the checkpoint. DeepSpeed ZeRO-1/2/3 writes each rank's shard of the optimizer state, which
DeepSpeed loads only at the world size that wrote it: adaptopt/zero_resume.py joins the shards and gives each new
rank its partition. What cannot be carried over (ZeRO-3 onto more processes, ZeRO-0 bf16) stops before the model
loads (:func:`check_resume_world`), saying what to do.
"""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
import sys
from pathlib import Path

PROGRESS_FILE = "progress.json"
WRITE_FAILED_EXIT_CODE = 74  # sysexits.h EX_IOERR: a requeue would fail the same way until space is freed
_NAME = re.compile(r"^step_(\d+)$")
_OS_ERROR = re.compile(r"\(os error (\d+)\)")


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written; its partial write is removed and the earlier checkpoints are intact."""


def save_checkpoint(accelerator, output_dir: str | Path, progress: dict, keep_last: int | None = None) -> Path:
    """Saves model, optimizer, scheduler, RNG and sampler states plus ``progress``; all ranks must call it.

    Raises CheckpointWriteError on every rank when any rank's write failed."""
    root = checkpoint_root(output_dir)
    final = root / f"step_{progress['completed_steps']:08d}"
    tmp = final.with_name(final.name + ".tmp")
    failure = None
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        failure = _attempt(lambda: tmp.mkdir(parents=True))
    if not _failed_anywhere(accelerator, failure):
        failure = _attempt(lambda: accelerator.save_state(str(tmp), safe_serialization=True))
    # Under DeepSpeed every rank writes its own shard files: none may still be writing at the rename. The vote is
    # also this barrier, and it stops every rank when one of them could not write.
    if not _failed_anywhere(accelerator, failure) and accelerator.is_main_process:
        failure = _attempt(lambda: (tmp / PROGRESS_FILE).write_text(json.dumps(progress, indent=2)))
    if _failed_anywhere(accelerator, failure):
        message = [None]
        if accelerator.is_main_process:
            message[0] = write_failure_message(failure, root, tmp, progress["completed_steps"], keep_last)
            shutil.rmtree(tmp, ignore_errors=True)  # a partial write would keep a full disk full
        elif failure is not None:  # the main process's message cannot name this one's cause
            print(f"rank {accelerator.process_index}: {type(failure).__name__}: {failure}", file=sys.stderr)
        if accelerator.num_processes > 1:  # every rank stops with the same line, which the launcher shows once
            from accelerate.utils import broadcast_object_list

            broadcast_object_list(message)
        raise CheckpointWriteError(message[0])
    if accelerator.is_main_process:
        if final.exists():  # re-saving the same step (e.g. a signal right after a scheduled save)
            shutil.rmtree(final)
        tmp.rename(final)
        if keep_last:
            for old in list_checkpoints(output_dir)[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def _attempt(write) -> BaseException | None:
    """Runs ``write``; returns the exception it raised (a full disk shows as OSError from Python and safetensors'
    SafetensorError, and as a RuntimeError from torch.save's zip writer: ``unexpected pos``), else None."""
    try:
        write()
    except Exception as err:  # noqa: BLE001 (any failure of a write is reported below, in plain words)
        # The traceback's frames hold the writers (torch.save's zip writer keeps its file open): dropped, so that
        # the removed partial write's space is free at once, not when the process ends.
        cause = err
        while cause is not None:
            cause.__traceback__ = None
            cause = cause.__cause__ or cause.__context__
        return err
    return None


def _failed_anywhere(accelerator, failure: BaseException | None) -> bool:
    """Whether any rank's write failed (a collective: every rank calls it at the same point)."""
    if accelerator.num_processes == 1:
        return failure is not None
    import torch

    flag = torch.tensor([0.0 if failure is None else 1.0], device=accelerator.device)
    return bool(accelerator.reduce(flag, reduction="sum").item() > 0)


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _mb(n: float) -> str:
    return f"{n / 2**20:,.1f} MB"


_NO_SPACE = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC), errno.EFBIG}
_NOT_ALLOWED = {errno.EACCES, errno.EPERM, errno.EROFS}


def _errno_of(err: BaseException | None) -> int | None:
    while err is not None:
        if isinstance(err, OSError) and err.errno:
            return err.errno
        found = _OS_ERROR.search(str(err))  # safetensors (Rust): "I/O error: No space left on device (os error 28)"
        if found:
            return int(found.group(1))
        err = err.__cause__ or err.__context__
    return None


def write_failure_message(err: BaseException | None, root: Path, tmp: Path, step: int, keep_last: int | None) -> str:
    """What a user needs after a failed checkpoint write: the cause in plain words, the folder, the free and the
    needed space, and the checkpoint that ``--resume_from_checkpoint latest`` will use."""
    previous = list_checkpoints(root.parent)
    free = shutil.disk_usage(root if root.is_dir() else root.parent).free
    code = _errno_of(err)
    # torch.save's zip writer reports a full disk without an errno; a nearly empty filesystem tells
    if code in _NO_SPACE or (code is None and free < 2**20):
        if code == errno.EFBIG:
            cause = f"a file grew past the limit on file size (ulimit -f) in {root}"
        elif code == getattr(errno, "EDQUOT", None):
            cause = f"the disk quota is exhausted in {root}"
        else:
            cause = f"no space left on the device of {root}"
        written = folder_bytes(tmp) if tmp.is_dir() else 0
        size = folder_bytes(previous[-1]) if previous else None
        need = (f"a checkpoint of this run takes {_mb(size)}" if size else
                f"this checkpoint had written {_mb(written)} when it failed")
        keep = keep_last or len(previous) + 1
        cause += (f" ({_mb(free + written)} free before this write; {need}, and --keep_checkpoints {keep} needs "
                  f"room for {keep} of them plus the one being written)")
        fix = "free space there, or lower --keep_checkpoints, or give --output_dir on a larger disk"
    elif code in _NOT_ALLOWED:
        cause = f"{os.strerror(code).lower()} in {root}"
        fix = "make the folder writable again (or give another --output_dir)"
    elif err is None:  # only another process's write failed; its own exception is in its output
        cause = f"another process's write failed in {root}"
        fix = "check the disk (dmesg, df) and the folder"
    else:
        cause = f"{type(err).__name__}: {err}".strip() + f" in {root}"
        fix = "check the disk (dmesg, df) and the folder"
    resume = (f"--resume_from_checkpoint latest resumes from {previous[-1].name}" if previous else
              "no earlier checkpoint exists: a resume starts from the beginning")
    return (f"the checkpoint of update {step} could not be written: {cause}. The partial write was removed; "
            f"{resume}. To go on: {fix}, then resume.")


def checkpoint_estimate(model) -> int:
    """Bytes of a checkpoint before one was written: the parameters in their dtype, plus three fp32 state tensors
    per trainable element (AdaptOpt's default keeps exp_avg, exp_avg_sq and Mechanic's x0; Adam two)."""
    from .memory import numel

    params = list(model.parameters())
    return (sum(numel(p) * p.element_size() for p in params)
            + 3 * 4 * sum(numel(p) for p in params if p.requires_grad))


def space_warning(output_dir: str | Path, checkpoint_bytes: int, keep_last: int | None, *, measured: bool) -> str | None:
    """A warning when the free space of output_dir's disk cannot hold ``keep_last`` checkpoints of
    ``checkpoint_bytes`` plus the one being written (less the checkpoints already there), else None.
    ``measured``: the size is that of a checkpoint this run wrote, not an estimate."""
    root = checkpoint_root(output_dir)
    existing = list_checkpoints(output_dir)
    keep = keep_last or len(existing) + 1
    # at the next write: the kept checkpoints (those already there count as written) and the one being written
    needed = checkpoint_bytes * max(1, keep + 1 - len(existing))
    where = next(p for p in (root, Path(output_dir), *Path(output_dir).absolute().parents) if p.exists())
    free = shutil.disk_usage(where).free
    if free >= needed:
        return None
    size = f"{_mb(checkpoint_bytes)} each, {'measured' if measured else 'estimated from the parameter count'}"
    return (f"{where} has {_mb(free)} free, less than the {_mb(needed)} still to be written: --keep_checkpoints "
            f"{keep} keeps {keep} checkpoints ({size}; {len(existing)} already there) and writes the next one before "
            f"it removes the oldest. A checkpoint write will fail when the disk is full. Free space, lower "
            f"--keep_checkpoints, or give --output_dir on a larger disk.")


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _NAME.match(p.name) and (p / PROGRESS_FILE).is_file()]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def resolve_resume(resume_from: str, output_dir: str | Path) -> Path | None:
    """``"latest"``: the newest complete checkpoint in output_dir (None if there is none yet, so a
    requeued job that never saved starts fresh); otherwise a checkpoint folder, which must be complete."""
    if resume_from == "latest":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(resume_from)
    if not path.is_dir():
        raise FileNotFoundError(f"--resume_from_checkpoint {resume_from}: no such checkpoint folder")
    if not (path / PROGRESS_FILE).is_file():
        raise FileNotFoundError(
            f"--resume_from_checkpoint {resume_from}: not a complete checkpoint (no {PROGRESS_FILE}; "
            "a folder ending in .tmp is an interrupted write)"
        )
    return path


def load_progress(checkpoint: Path) -> dict:
    return json.loads((checkpoint / PROGRESS_FILE).read_text())


class ResumeWorldError(ValueError):
    """A checkpoint that cannot be resumed at this number of processes; the message says what to do."""


def _zero_shards(checkpoint: Path) -> int:
    """Ranks whose ZeRO optimizer shard the checkpoint holds (0: not a DeepSpeed ZeRO checkpoint)."""
    return len(list(checkpoint.glob("pytorch_model*/*zero_pp_rank_*_optim_states.pt")))


def check_resume_world(checkpoint: Path, processes: int, deepspeed: bool) -> None:
    """Raises ResumeWorldError before any model is loaded when ``checkpoint`` cannot be resumed by ``processes``
    processes (``deepspeed``: this run uses DeepSpeed)."""
    progress = load_progress(checkpoint)
    shards = _zero_shards(checkpoint)
    written_by = progress.get("num_processes") or shards or None
    if shards and not deepspeed:
        raise ResumeWorldError(
            f"--resume_from_checkpoint {checkpoint}: a DeepSpeed ZeRO checkpoint ({shards} optimizer shards), but "
            "this run does not use DeepSpeed. Resume it with the DeepSpeed launch config that wrote it.")
    if deepspeed and not shards and (checkpoint / "optimizer.bin").is_file():
        raise ResumeWorldError(
            f"--resume_from_checkpoint {checkpoint}: written without DeepSpeed, but this run uses DeepSpeed. Resume "
            "it with the launch config that wrote it (DDP or one process).")
    if deepspeed and shards and written_by and written_by != processes:
        # ZeRO-1/2/3 shards are resharded at load (adaptopt/zero_resume.py), ZeRO-3 only onto fewer processes: each
        # rank loads its own model-state file, which a rank beyond the writers lacks
        from .zero_resume import zero_layout

        stage, bf16 = zero_layout(checkpoint / "pytorch_model")
        if stage == 0 or (stage == 3 and processes > written_by):
            layout = "ZeRO-3" if stage == 3 else "ZeRO-0 bf16 (DeepSpeed's BF16_Optimizer)"
            raise ResumeWorldError(
                f"--resume_from_checkpoint {checkpoint}: written by {written_by} processes under DeepSpeed {layout}, "
                f"resumed by {processes}. ZeRO-1/2 checkpoints resume at any number of processes, ZeRO-3 ones with "
                f"fewer, ZeRO-0 fp32/fp16 ones (one whole optimizer state) at any. Resume with --num_processes "
                f"{written_by} (the same total across machines){' or fewer' if stage == 3 else ''}, or start a new "
                f"run from its weights (the optimizer state starts afresh): python -m deepspeed.utils.zero_to_fp32 "
                f"{checkpoint} <folder> --tag pytorch_model, then --model_name_or_path with that folder and the "
                "model's config.")
    if written_by:
        resume_position(progress, processes)  # raises when the data position does not convert


def resume_position(progress: dict, processes: int) -> int:
    """Batches of the checkpoint's epoch each of ``processes`` processes skips so that the run continues after the
    examples the writing processes had consumed: every process takes every N-th batch of the one seeded order,
    so N processes that each did b batches consumed its first b x N batches."""
    written_by = progress.get("num_processes") or processes
    consumed = progress["batches_in_epoch"] * written_by
    if consumed % processes:
        raise ResumeWorldError(
            f"the checkpoint of update {progress['completed_steps']} was written by {written_by} processes after "
            f"{consumed} batches of its epoch, which {processes} processes cannot split evenly. Resume with a "
            f"number of processes that divides {consumed} (e.g. {written_by}), or from a checkpoint at the end of "
            "an epoch (--checkpointing_steps epoch).")
    return consumed // processes
