"""adaptopt/checkpointing.py: a checkpoint write that fails (a full disk, a file-size limit) stops with a message a
user can act on, removes its partial write and leaves the previous checkpoint intact; the free-space warning."""
import json
import os
import resource
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from accelerate import Accelerator
from torch import nn

from conftest import REPO, _free_port
from test_glue_recipe import common

from adaptopt.checkpointing import (CheckpointWriteError, checkpoint_estimate, folder_bytes, list_checkpoints,
                                    save_checkpoint, space_warning)


def _run(seed=0):
    """A prepared model and optimizer with state (one AdamW step): a checkpoint of about 1.9 MB."""
    torch.manual_seed(seed)
    accelerator = Accelerator(cpu=True)
    model = nn.Linear(400, 400)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model, optimizer = accelerator.prepare(model, optimizer)
    model(torch.randn(2, 400)).square().mean().backward()
    optimizer.step()
    return accelerator, model, optimizer


def _progress(step):
    return dict(completed_steps=step, epoch=0, batches_in_epoch=step)


def _assert_previous_intact(out, accelerator, model, saved_weight):
    kept = list_checkpoints(out)
    assert [p.name for p in kept] == ["step_00000001"]
    assert not list((out / "checkpoints").glob("*.tmp"))  # the partial write is gone
    with torch.no_grad():
        model.weight.zero_()
    accelerator.load_state(str(kept[0]))
    assert torch.equal(model.weight, saved_weight)


def _mount_tmpfs(mount, size: str):
    mount.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)], capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.decode().strip()}")


@pytest.fixture
def small_disk(tmp_path):
    """A 3 MB tmpfs: one checkpoint of _run() fits, a second does not (needs root, as CI has)."""
    _mount_tmpfs(tmp_path / "disk", "3m")
    yield tmp_path / "disk"
    subprocess.run(["umount", "--lazy", str(tmp_path / "disk")], check=True)


def test_a_full_disk_stops_with_the_cause_removes_the_partial_write_and_keeps_the_previous(small_disk):
    accelerator, model, optimizer = _run()
    out = small_disk / "run"
    first = save_checkpoint(accelerator, out, _progress(1), keep_last=2)
    saved_weight = model.weight.detach().clone()
    with pytest.raises(CheckpointWriteError) as failed:
        save_checkpoint(accelerator, out, _progress(2), keep_last=2)
    message = str(failed.value)
    size = folder_bytes(first) / 2**20
    assert message.startswith(f"the checkpoint of update 2 could not be written: no space left on the device of "
                              f"{out / 'checkpoints'} (")
    assert f"a checkpoint of this run takes {size:,.1f} MB" in message and "MB free before this write" in message
    assert "--resume_from_checkpoint latest resumes from step_00000001" in message
    _assert_previous_intact(out, accelerator, model, saved_weight)
    # the space the partial write held is free again (a retry fails only for want of space, not for its leftovers)
    assert shutil.disk_usage(small_disk).free >= 3 * 2**20 - folder_bytes(first) - 2**16


def test_an_io_error_mid_write_is_reported_the_same_way(tmp_path):
    """A file-size limit (ulimit -f, EFBIG) fails the write part way on any filesystem, as root or not."""
    accelerator, model, optimizer = _run()
    out = tmp_path / "run"
    save_checkpoint(accelerator, out, _progress(1))
    saved_weight = model.weight.detach().clone()
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of a kill
    resource.setrlimit(resource.RLIMIT_FSIZE, (300_000, hard))
    try:
        with pytest.raises(CheckpointWriteError, match=r"update 2 could not be written: a file grew past the limit "
                                                       r"on file size \(ulimit -f\)"):
            save_checkpoint(accelerator, out, _progress(2))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)
    _assert_previous_intact(out, accelerator, model, saved_weight)


def test_the_space_warning_counts_the_kept_checkpoints_and_the_one_being_written(tmp_path):
    _, model, _ = _run()
    estimate = checkpoint_estimate(model)
    assert estimate == 160_400 * 4 * 4  # fp32 weights + 3 fp32 state tensors per trainable element
    assert space_warning(tmp_path, 1000, 2, measured=True) is None
    warning = space_warning(tmp_path, 2**60, 2, measured=False)
    assert "less than the 3,298,534,883,328.0 MB that --keep_checkpoints 2 needs" in warning
    assert "(estimated from the parameter count) plus the one being written" in warning


def test_a_small_disk_is_warned_about_before_training(small_disk):
    _, model, _ = _run()
    out = small_disk / "run"
    # 2.4 MB estimated; 3 x 2.4 MB needed on a 3 MB disk
    warning = space_warning(out, checkpoint_estimate(model), 2, measured=False)
    assert warning is not None and warning.startswith(f"{small_disk} has 3.0 MB free, less than the 7.3 MB")


@pytest.mark.slow
def test_the_recipe_on_a_full_disk_exits_74_with_one_message_and_its_previous_checkpoint(glue_dir, tiny_bert,
                                                                                         tmp_path):
    """recipes/glue.py, 2 processes through launch/run.py, its output folder on a 40 MB tmpfs: the first checkpoint
    (about 16 MB) fits, the second does not. The launcher exits with the recipe's 74, says why once, and the
    earlier checkpoint is complete and resumable once there is room."""
    disk = tmp_path / "disk"
    _mount_tmpfs(disk, "40m")
    try:
        out = disk / "run"
        cmd = [sys.executable, str(REPO / "launch" / "run.py"), "--config_file",
               str(REPO / "launch" / "ddp_single_node.yaml"), "--main_process_port", str(_free_port()),
               str(REPO / "recipes" / "glue.py"), *common(glue_dir, tiny_bert, out, "--max_train_steps", "4",
                                                          "--checkpointing_steps", "2")]
        env = dict(os.environ, OMP_NUM_THREADS="1")
        filler = disk / "filler"
        filler.write_bytes(b"\0" * 12 * 2**20)  # so that the first checkpoint fits and the second does not
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
        assert proc.returncode == 74, proc.stderr[-4000:]
        errors = [x for x in proc.stderr.splitlines() if x.startswith("error: ")]
        assert len(errors) == 1 and "the checkpoint of update 4 could not be written: no space left on the device " \
            f"of {out / 'checkpoints'}" in errors[0], proc.stderr[-4000:]
        assert "--resume_from_checkpoint latest resumes from step_00000002" in errors[0]
        assert "Traceback" not in proc.stderr
        assert "MB free, less than the" in proc.stderr  # warned before training
        assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_00000002"]
        filler.unlink()  # room made: the run resumes from its complete checkpoint and finishes
        resumed = subprocess.run([*cmd, "--resume_from_checkpoint", "latest", "--keep_checkpoints", "1"],
                                 capture_output=True, text=True, timeout=600, env=env)
        assert resumed.returncode == 0, resumed.stderr[-4000:]
        assert json.loads((out / "results.json").read_text())["resumed_from"].endswith("step_00000002")
    finally:
        subprocess.run(["umount", "--lazy", str(disk)], check=True)
