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
    assert "less than the 3,298,534,883,328.0 MB still to be written: --keep_checkpoints 2 keeps 2 checkpoints " \
           "(1,099,511,627,776.0 MB each, estimated from the parameter count; 0 already there)" in warning


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


def _checkpoint(tmp_path, name, shards=0, stage=2, bf16=False, **progress):
    """A checkpoint folder as far as check_resume_world reads it: progress.json and ZeRO shard files that hold only
    the config DeepSpeed saves with them."""
    folder = tmp_path / name
    (folder / "pytorch_model").mkdir(parents=True)
    config = {"zero_optimization": {"stage": stage}, "bf16": {"enabled": bf16}}
    prefix = "bf16_" if bf16 else ""
    for rank in range(shards):
        shard = folder / "pytorch_model" / f"{prefix}zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"
        torch.save({"ds_config": config}, shard)
    (folder / "progress.json").write_text(json.dumps(dict(completed_steps=3, epoch=0, **progress)))
    return folder


def test_a_ddp_checkpoint_resumes_at_another_world_size_after_the_same_examples(tmp_path):
    from adaptopt.checkpointing import ResumeWorldError, check_resume_world, resume_position

    # 2 processes that did 3 batches each consumed the first 6 batches of the seeded order
    assert resume_position(dict(completed_steps=3, batches_in_epoch=3, num_processes=2), 1) == 6
    assert resume_position(dict(completed_steps=3, batches_in_epoch=3, num_processes=2), 3) == 2
    assert resume_position(dict(completed_steps=3, batches_in_epoch=3), 4) == 3  # written before the count was kept
    with pytest.raises(ResumeWorldError, match="written by 2 processes after 6 batches of its epoch, which 4 "
                                               "processes cannot split evenly"):
        resume_position(dict(completed_steps=3, batches_in_epoch=3, num_processes=2), 4)
    ddp = _checkpoint(tmp_path, "ddp", batches_in_epoch=3, num_processes=2)
    check_resume_world(ddp, 1, deepspeed=False)
    with pytest.raises(ResumeWorldError, match="cannot split evenly"):
        check_resume_world(ddp, 4, deepspeed=False)


def test_a_zero_checkpoint_at_another_world_size_resumes_where_its_layout_allows(tmp_path):
    from adaptopt.checkpointing import ResumeWorldError, check_resume_world

    for stage, bf16 in ((1, False), (2, False), (2, True)):  # resharded at load (adaptopt/zero_resume.py)
        zero = _checkpoint(tmp_path, f"zero{stage}{bf16}", shards=2, stage=stage, bf16=bf16, batches_in_epoch=3,
                           num_processes=2)
        check_resume_world(zero, 2, deepspeed=True)
        check_resume_world(zero, 1, deepspeed=True)
        check_resume_world(zero, 3, deepspeed=True)  # 6 batches consumed: 2 each
        with pytest.raises(ResumeWorldError, match="cannot split evenly"):
            check_resume_world(zero, 4, deepspeed=True)
    zero3 = _checkpoint(tmp_path, "zero3", shards=2, stage=3, batches_in_epoch=3, num_processes=2)
    check_resume_world(zero3, 2, deepspeed=True)
    check_resume_world(zero3, 1, deepspeed=True)  # onto fewer processes: resharded
    with pytest.raises(ResumeWorldError, match=r"written by 2 processes under DeepSpeed ZeRO-3, resumed by 3\. .*"
                                               r"Resume with --num_processes 2 .* or fewer, .*"
                                               r"deepspeed\.utils\.zero_to_fp32"):
        check_resume_world(zero3, 3, deepspeed=True)
    zero0_bf16 = _checkpoint(tmp_path, "zero0bf16", shards=2, stage=0, bf16=True, batches_in_epoch=3, num_processes=2)
    with pytest.raises(ResumeWorldError, match=r"under DeepSpeed ZeRO-0 bf16 \(DeepSpeed's BF16_Optimizer\)"):
        check_resume_world(zero0_bf16, 1, deepspeed=True)
    zero = _checkpoint(tmp_path, "zero", shards=2, batches_in_epoch=3, num_processes=2)
    with pytest.raises(ResumeWorldError, match="this run does not use DeepSpeed"):
        check_resume_world(zero, 2, deepspeed=False)
    zero0 = _checkpoint(tmp_path, "zero0", batches_in_epoch=3, num_processes=2)  # no shards: one whole state
    check_resume_world(zero0, 2, deepspeed=True)
    check_resume_world(zero0, 1, deepspeed=True)
    ddp = _checkpoint(tmp_path, "ddp", batches_in_epoch=3, num_processes=2)
    (ddp / "optimizer.bin").write_bytes(b"")
    with pytest.raises(ResumeWorldError, match="written without DeepSpeed, but this run uses DeepSpeed"):
        check_resume_world(ddp, 2, deepspeed=True)


def _no_dropout(tiny_bert, tmp_path):
    """The tiny BERT without dropout: each process draws its own masks, which no resume carries over to another
    world size."""
    model = tmp_path / "no-dropout"
    shutil.copytree(tiny_bert, model)
    config = json.loads((model / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, classifier_dropout=0.0)
    (model / "config.json").write_text(json.dumps(config))
    return model


@pytest.mark.slow
def test_a_ddp_run_of_two_processes_resumes_with_one_to_the_uninterrupted_result(glue_dir, tiny_bert, tmp_path):
    """2 DDP processes (batch 16 each) to update 6, checkpointing at 3; the checkpoint resumed by one process with
    2 accumulation steps (the same 32 examples per update, in the same order) ends with the 2 processes' model,
    optimizer state and train loss. Dropout is off: each process draws its own masks, which no resume carries
    over to another world size."""
    from safetensors.torch import load_file

    from conftest import launch

    model = _no_dropout(tiny_bert, tmp_path)

    def run(out, processes, *extra):
        proc = launch("recipes/glue.py", common(glue_dir, model, out, "--max_train_steps", "6", "--keep_checkpoints",
                                                "3", "--save_model", *extra), processes=processes, check=False)
        assert proc.returncode == 0, proc.stderr[-4000:]
        return proc

    run(tmp_path / "two", 2, "--checkpointing_steps", "3")
    checkpoint = tmp_path / "two" / "checkpoints" / "step_00000003"
    assert json.loads((checkpoint / "progress.json").read_text())["num_processes"] == 2
    one = run(tmp_path / "one", 1, "--gradient_accumulation_steps", "2", "--checkpointing_steps", "6",
              "--resume_from_checkpoint", str(checkpoint))
    assert "checkpoint written by 2 processes, resumed by 1: each skips 6 batches of epoch 0" in one.stderr
    a = json.loads((tmp_path / "two" / "results.json").read_text())
    b = json.loads((tmp_path / "one" / "results.json").read_text())
    assert b["num_processes"] == 1 and b["total_batch_size"] == a["total_batch_size"] == 32
    # DDP's all-reduce and accumulation add the same gradients in another order: equal to float rounding
    for key in ("accuracy", "f1", "train_loss"):
        assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), key
    wa, wb = (load_file(out / "model" / "model.safetensors") for out in (tmp_path / "two", tmp_path / "one"))
    assert wa.keys() == wb.keys() and all(torch.allclose(wa[k], wb[k], rtol=1e-4, atol=1e-6) for k in wa)
    # AdaptOpt's per-parameter state (moments, Mechanic's x0), its group scalars and the clipper's and Mechanic's
    # hooked state, as the two runs saved them at update 6
    sa, sb = (torch.load(out / "checkpoints" / "step_00000006" / "optimizer.bin", weights_only=False)
              for out in (tmp_path / "two", tmp_path / "one"))
    assert sa["state"].keys() == sb["state"].keys() and {"exp_avg", "exp_avg_sq", "x0"} <= set(sa["state"][0])
    for i in sa["state"]:
        for key, value in sa["state"][i].items():
            assert torch.allclose(torch.as_tensor(value), torch.as_tensor(sb["state"][i][key]), rtol=1e-4,
                                  atol=1e-7), (i, key)
    for ga, gb in zip(sa["param_groups"], sb["param_groups"]):
        assert ga["index"] == gb["index"] and ga["pending_step"] == gb["pending_step"]
        for key in ("lr_scale", "path_cos", "pending_stats"):
            assert ga[key] == pytest.approx(gb[key], rel=1e-4, abs=1e-8), key
    assert sa["grad_clipper"] == pytest.approx(sb["grad_clipper"], rel=1e-4)
    for key in ("s", "m", "v", "r", "pending"):
        assert sa["lr_tuner"][key] == pytest.approx(sb["lr_tuner"][key], rel=1e-4, abs=1e-10), key


@pytest.mark.slow
@pytest.mark.parametrize("ds_config", ["zero2.json", "zero3.json", "zero0.json"])
def test_a_deepspeed_run_of_two_processes_resumes_with_one_to_the_uninterrupted_result(ds_config, glue_dir, tiny_bert,
                                                                                      tmp_path):
    """As the DDP case above, under DeepSpeed: ZeRO-2's and ZeRO-3's optimizer shards of 2 processes are joined and
    resharded for one (adaptopt/zero_resume.py); ZeRO-0's optimizer state is whole. The resumed run ends with the 2
    processes' model, optimizer state and train loss, and its own checkpoint at update 6 holds the same state."""
    from safetensors.torch import load_file

    from conftest import launch

    from adaptopt.zero_resume import consolidate

    model = _no_dropout(tiny_bert, tmp_path)

    def run(out, processes, *extra):
        proc = launch("recipes/glue.py", common(glue_dir, model, out, "--max_train_steps", "6", "--keep_checkpoints",
                                                "3", "--save_model", *extra), processes=processes, ds_config=ds_config,
                      check=False)
        assert proc.returncode == 0, proc.stderr[-4000:]
        return proc

    run(tmp_path / "two", 2, "--checkpointing_steps", "3")
    checkpoint = tmp_path / "two" / "checkpoints" / "step_00000003"
    one = run(tmp_path / "one", 1, "--gradient_accumulation_steps", "2", "--checkpointing_steps", "6",
              "--resume_from_checkpoint", str(checkpoint))
    assert "checkpoint written by 2 processes, resumed by 1: each skips 6 batches of epoch 0" in one.stderr
    assert ("ZeRO optimizer state of 2 processes, resharded for 1" in one.stderr) == (ds_config != "zero0.json")
    a = json.loads((tmp_path / "two" / "results.json").read_text())
    b = json.loads((tmp_path / "one" / "results.json").read_text())
    assert b["num_processes"] == 1 and b["completed_steps"] == 6 and b["resumed_from"] == str(checkpoint)
    for key in ("accuracy", "f1", "train_loss"):
        assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), key
    wa, wb = (load_file(out / "model" / "model.safetensors") for out in (tmp_path / "two", tmp_path / "one"))
    assert wa.keys() == wb.keys() and all(torch.allclose(wa[k], wb[k], rtol=1e-4, atol=1e-6) for k in wa)

    def close(x, y):  # the gradient all-reduce and the accumulation add in another order: equal to float rounding
        return torch.allclose(torch.as_tensor(x, dtype=torch.float64), torch.as_tensor(y, dtype=torch.float64),
                               rtol=1e-4, atol=1e-7)

    saved = [out / "checkpoints" / "step_00000006" / "pytorch_model" for out in (tmp_path / "two", tmp_path / "one")]
    if ds_config != "zero0.json":  # per parameter name: the fp32 weights and every state tensor, x0 included
        sa, sb = (consolidate(folder) for folder in saved)
        assert (sa.written_by, sb.written_by) == (2, 1)
        for i in range(len(sa.fp32)):
            assert set(sa.tensors[i]) == set(sb.tensors[i]) == {"exp_avg", "exp_avg_sq", "x0"}
            for named_a, named_b in [(sa.fp32[i], sb.fp32[i]), *((sa.tensors[i][k], sb.tensors[i][k])
                                                                  for k in sa.tensors[i])]:
                assert named_a.keys() == named_b.keys() and all(close(named_a[n], named_b[n]) for n in named_a)
            assert all(close(sa.scalars[i][k], sb.scalars[i][k]) for k in ("step", "beta1_prod"))
        client_a, client_b = sa.client, sb.client
    else:  # ZeRO-0: the client optimizer's state_dict, whole, beside the model
        client_a, client_b = (torch.load(folder / "mp_rank_00_model_states.pt", weights_only=False)["optimizer"]
                              for folder in saved)
        assert client_a["state"].keys() == client_b["state"].keys() and "x0" in client_a["state"][0]
        assert all(close(v, client_b["state"][i][k])
                   for i in client_a["state"] for k, v in client_a["state"][i].items())
    for ga, gb in zip(client_a["param_groups"], client_b["param_groups"]):
        assert ga["index"] == gb["index"] and ga["pending_step"] == gb["pending_step"]
        assert all(close(ga[key], gb[key]) for key in ("lr_scale", "path_cos", "pending_stats"))
    assert client_a["grad_clipper"] == client_b["grad_clipper"]
    assert all(close(client_a["lr_tuner"][key], client_b["lr_tuner"][key]) for key in ("s", "m", "v", "r", "pending"))
