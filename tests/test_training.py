"""adaptopt/training.py in this process: RecipeRun.fit on a toy regression model that speaks the recipes'
batch format. Update counting, logging, evaluation, the skipped-update bookkeeping and exact resume, in
seconds (the recipe tests hold the same loop to a real model through accelerate launch)."""
import argparse
import json
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from adaptopt import cli
from adaptopt.divergence import TooManySkippedUpdates
from adaptopt.training import LossTotals, RecipeRun, TrainClock

ROWS, BATCH = 24, 4  # 6 batches per epoch


class Toy(nn.Module):
    """Linear regression on 4 features; a NaN label gives a NaN loss (an update that must be skipped)."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 1)

    def forward(self, input_ids, labels):
        return SimpleNamespace(loss=nn.functional.mse_loss(self.linear(input_ids).squeeze(-1), labels))


def rows(nan_at=()):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(ROWS, 4, generator=g)
    y = x @ torch.tensor([1.0, -2.0, 0.5, 3.0])
    y[list(nan_at)] = float("nan")
    return [{"input_ids": x[i], "labels": y[i]} for i in range(ROWS)]


def parse(tmp_path, *argv):
    parser = argparse.ArgumentParser()
    cli.add_optimization_args(parser)
    cli.add_run_args(parser)
    args = parser.parse_args(["--output_dir", str(tmp_path), "--optimizer", "adamw", "--learning_rate", "0.05",
                              "--per_device_train_batch_size", str(BATCH), "--optimizer_impl", "eager", *argv])
    cli.check_shared_args(parser, args)
    return args


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Each RecipeRun makes its own Accelerator, as each recipe process does."""
    yield
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def fit(args, nan_at=(), checkpoint=None):
    run = RecipeRun(args, project="toy")
    model = run.apply_lora(Toy(), "SEQ_CLS")  # no --lora: the model as it is
    train = DataLoader(rows(nan_at), batch_size=BATCH, shuffle=True, generator=torch.Generator().manual_seed(1))
    model, evals = run.prepare(model, train, {"dev": DataLoader(rows(), batch_size=8)})
    run.resume(checkpoint)

    def evaluate():
        return {"mse": float(sum(model(**b).loss for b in evals["dev"]) / len(evals["dev"]))}

    results = run.fit(evaluate, primary_metric="mse")
    return run, results, run.summary(results)


def log_lines(out):
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


def test_fit_counts_updates_logs_and_evaluates(tmp_path):
    run, results, summary = fit(parse(tmp_path, "--num_train_epochs", "2", "--gradient_accumulation_steps", "2",
                                      "--logging_steps", "2"))
    # 6 batches per epoch in pairs: 3 updates per epoch
    assert run.completed_steps == summary["completed_steps"] == run.lr_schedule.applied_steps == 6
    assert summary["skipped_updates"] == 0 and summary["train_samples"] == ROWS and summary["train_time_s"] > 0
    lines = log_lines(tmp_path)
    assert [line["step"] for line in lines if "train/loss" in line] == [2, 4, 6]
    assert [line["step"] for line in lines if "eval/mse" in line] == [3, 6]  # at the end of each epoch
    assert results == {"mse": lines[-1]["eval/mse"]} and math.isfinite(summary["train_loss"])
    assert lines[-1]["eval/mse"] < lines[lines.index(next(line for line in lines if "eval/mse" in line))]["eval/mse"]


def test_a_resumed_fit_continues_exactly(tmp_path):
    """Checkpoint mid-epoch after update 4 (epoch 2, batch 2 of 6 with accumulation 2), resume in a new run: the
    same parameters, metrics and train_loss (its epoch sum restored) to the last bit."""
    argv = ["--num_train_epochs", "2", "--gradient_accumulation_steps", "2", "--checkpointing_steps", "2",
            "--keep_checkpoints", "3"]
    full_run, full_results, full = fit(parse(tmp_path / "full", *argv))
    checkpoint = tmp_path / "full" / "checkpoints" / "step_00000004"
    resumed_run, resumed_results, resumed = fit(parse(tmp_path / "resumed", *argv), checkpoint=checkpoint)
    assert resumed["resumed_from"] == str(checkpoint) and resumed["completed_steps"] == 6
    for a, b in zip(full_run.model.parameters(), resumed_run.model.parameters()):
        assert torch.equal(a, b)
    assert resumed_results == full_results and resumed["train_loss"] == full["train_loss"]
    assert resumed_run.lr_schedule.applied_steps == 6 and resumed_run.base_optimizer.param_groups[0]["lr"] == \
        full_run.base_optimizer.param_groups[0]["lr"]


def test_a_nan_loss_is_one_skipped_update_that_the_schedule_and_the_optimizer_do_not_count(tmp_path):
    run, _, summary = fit(parse(tmp_path, "--max_train_steps", "6", "--logging_steps", "1"), nan_at=[5])
    assert summary["completed_steps"] == 6 and summary["skipped_updates"] == 1
    assert run.lr_schedule.applied_steps == 5  # the LR the last update used is the 5th applied update's
    assert {float(s["step"]) for s in run.base_optimizer.state.values()} == {5.0}
    assert log_lines(tmp_path)[-2]["train/skipped_updates"] == 1  # the logs read the same count


def test_updates_skipped_in_a_row_stop_the_run(tmp_path):
    args = parse(tmp_path, "--max_train_steps", "6", "--max_consecutive_skipped_steps", "3")
    with pytest.raises(TooManySkippedUpdates, match="3 updates in a row were skipped"):
        fit(args, nan_at=range(ROWS))


def test_train_clock_leaves_out_what_runs_paused():
    clock = TrainClock()
    clock.start()
    with clock.paused():
        paused_at = clock.seconds
        sum(range(10**5))
    assert clock.seconds == paused_at  # nothing counted while paused
    clock.stop()
    clock.stop()  # stopping twice counts nothing twice
    assert clock.seconds >= paused_at


def test_loss_totals_keep_a_window_and_the_epoch():
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    losses = LossTotals(accelerator.device)
    losses.start_epoch(restored=(10.0, 4))  # a resumed epoch: the checkpoint's sum over all ranks
    for value in (1.0, 2.0, 3.0):
        losses.add(torch.tensor(value))
    assert losses.window_mean() == 2.0 and losses.window_count == 0
    assert losses.epoch_total(accelerator) == (16.0, 7)
    losses.start_epoch()
    assert losses.epoch_total(accelerator) == (0.0, 0)
