"""The recipes' shared flags: which AdaptOpt update --optimizer_impl picks, and its fallback."""
import argparse
import logging

import pytest
from torch import nn

from adaptopt import AdaptOpt, cli


def parse(*argv):
    parser = argparse.ArgumentParser()
    cli.add_optimization_args(parser)
    cli.add_run_args(parser)
    args = parser.parse_args(["--output_dir", "unused", *argv])
    cli.check_shared_args(parser, args)
    return args


def test_auto_uses_the_compiled_update_where_torch_compile_works():
    opt = cli.optimizer_from_args(parse(), nn.Linear(4, 2))
    assert isinstance(opt, AdaptOpt) and all(g["fused"] for g in opt.param_groups)


@pytest.mark.parametrize("argv, fused", [(["--optimizer_impl", "eager"], False), (["--optimizer_impl", "fused"], True),
                                         (["--fused_optimizer"], True)])
def test_explicit_choice_is_kept(argv, fused):
    opt = cli.optimizer_from_args(parse(*argv), nn.Linear(4, 2))
    assert all(bool(g["fused"]) == fused for g in opt.param_groups)


def test_auto_falls_back_to_eager_and_says_why(caplog):
    # A device the compiled kernel cannot run on (meta tensors hold no data): a real failure of the
    # probe, not a simulated one. The recipe passes accelerator.device here.
    with caplog.at_level(logging.WARNING, logger="adaptopt.cli"):
        opt = cli.optimizer_from_args(parse(), nn.Linear(4, 2), device="meta")
    assert not any(g["fused"] for g in opt.param_groups)
    assert "compiled update does not work here" in caplog.text and "meta" in caplog.text


def test_impl_flags_only_apply_to_adaptopt():
    with pytest.raises(SystemExit):
        parse("--optimizer", "adamw", "--optimizer_impl", "eager")


@pytest.mark.parametrize("total, warmup", [(1, 0), (2, 1), (10, 1), (100, 10)])
def test_warmup_ratio_leaves_at_least_one_update_after_warmup(total, warmup):
    # --max_train_steps 1 with the default ratio 0.1 used to round up to a warmup of 1 and fail at start-up
    sched = cli.scheduler_from_args(parse("--max_train_steps", str(total)), cli.optimizer_from_args(
        parse("--optimizer", "adamw"), nn.Linear(4, 2)), total)
    # the schedule's first multiplier is 1/warmup during a warmup, 1 without one
    assert sched.schedule(0) == pytest.approx(1 / warmup if warmup else 1.0)


def test_explicit_warmup_longer_than_the_run_is_an_error():
    with pytest.raises(ValueError, match="--num_warmup_steps 5 must be smaller than the run's 5 updates"):
        cli.scheduler_from_args(parse("--num_warmup_steps", "5"), cli.optimizer_from_args(
            parse("--optimizer", "adamw"), nn.Linear(4, 2)), 5)
