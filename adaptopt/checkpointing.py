"""Checkpoints that survive a crash: written to a temporary folder, then renamed into place.

Layout under ``<output_dir>/checkpoints``::

    step_00000120/            one complete checkpoint (accelerate.save_state + progress.json)
    step_00000180.tmp/        a write in progress (or a crashed one): never resumed from

A rename within one filesystem is atomic, so a checkpoint folder without ``.tmp`` is complete, and a
crash mid-write leaves the previous checkpoint untouched. ``progress.json`` records where training
was (optimizer updates done, epoch, batches consumed in that epoch) so a resumed run continues at the
same data position.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

PROGRESS_FILE = "progress.json"
_NAME = re.compile(r"^step_(\d+)$")


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def save_checkpoint(accelerator, output_dir: str | Path, progress: dict, keep_last: int | None = None) -> Path:
    """Saves model, optimizer, scheduler, RNG and sampler states plus ``progress``; all ranks must call it."""
    root = checkpoint_root(output_dir)
    final = root / f"step_{progress['completed_steps']:08d}"
    tmp = final.with_name(final.name + ".tmp")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    # Under DeepSpeed every rank writes its own shard files: none may still be writing at the rename.
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / PROGRESS_FILE).write_text(json.dumps(progress, indent=2))
        if final.exists():  # re-saving the same step (e.g. a signal right after a scheduled save)
            shutil.rmtree(final)
        tmp.rename(final)
        if keep_last:
            for old in list_checkpoints(output_dir)[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


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
