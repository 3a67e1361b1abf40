"""The recipes' shared flags: which update --optimizer_impl picks (AdaptOpt and the torch baselines), and its
fallback."""
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


def test_auto_uses_the_native_update_for_a_step_on_the_cpu():
    opt = cli.optimizer_from_args(parse(), nn.Linear(4, 2))  # CI's machine has the C++ compiler it needs
    assert isinstance(opt, AdaptOpt) and all(g["native"] and not g["compiled"] for g in opt.param_groups)


@pytest.mark.parametrize("impl, native, compiled, foreach", [
    ("eager", None, False, None), ("native", True, None, None), ("compiled", None, True, None),
    ("foreach", None, None, True)])
def test_explicit_choice_is_kept(impl, native, compiled, foreach):
    opt = cli.optimizer_from_args(parse("--optimizer_impl", impl), nn.Linear(4, 2))
    assert all(g["native"] == native and g["compiled"] == compiled and g["foreach"] == foreach
               for g in opt.param_groups)


def test_auto_falls_back_to_eager_and_says_why(caplog):
    # A device the compiled kernel cannot run on (meta tensors hold no data): a real failure of the
    # probe, not a simulated one. The recipe passes accelerator.device here; not the CPU, so not native.
    with caplog.at_level(logging.WARNING, logger="adaptopt.cli"):
        opt = cli.optimizer_from_args(parse(), nn.Linear(4, 2), device="meta")
    assert not any(g["compiled"] or g["native"] for g in opt.param_groups)
    assert "compiled update does not work here" in caplog.text and "meta" in caplog.text


def test_auto_falls_back_to_compiled_where_the_native_update_does_not_build(caplog, monkeypatch, tmp_path):
    """No C++ compiler: the build really fails (CXX names a program that does not exist), in a fresh
    extensions directory so that no cached build is found; the compiled path (inductor finds its compiler
    itself) takes over and the warning says why."""
    from adaptopt import native_update

    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "extensions"))
    native_update._load.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="adaptopt.cli"):
            opt = cli.optimizer_from_args(parse(), nn.Linear(4, 2))
    finally:
        native_update._load.cache_clear()
    assert all(g["compiled"] and not g["native"] for g in opt.param_groups)
    assert "native CPU update does not build here" in caplog.text


@pytest.mark.parametrize("name", ["adam", "adamw", "sgd", "momentum", "adagrad"])
def test_auto_gives_torch_baselines_their_fused_kernel(name):
    # HF Trainer defaults to fused AdamW; a baseline left at torch's CPU default (a per-tensor loop) would be
    # timed on its slowest path
    for impl in ("auto", "fused"):
        opt = cli.optimizer_from_args(parse("--optimizer", name, "--optimizer_impl", impl), nn.Linear(4, 2))
        assert all(g["fused"] for g in opt.param_groups)
    eager = cli.optimizer_from_args(parse("--optimizer", name, "--optimizer_impl", "eager"), nn.Linear(4, 2))
    assert not any(g["fused"] or g["foreach"] for g in eager.param_groups)
    foreach = cli.optimizer_from_args(parse("--optimizer", name, "--optimizer_impl", "foreach"), nn.Linear(4, 2))
    assert all(g["foreach"] and not g["fused"] for g in foreach.param_groups)


def test_rmsprop_has_no_fused_kernel():
    opt = cli.optimizer_from_args(parse("--optimizer", "rmsprop"), nn.Linear(4, 2))
    assert all(g["foreach"] for g in opt.param_groups)


@pytest.mark.parametrize("name, impl, runs_with", [
    ("rmsprop", "fused", "auto, foreach, eager"), ("adamw", "compiled", "auto, fused, foreach, eager"),
    ("adaptopt", "fused", "auto, native, compiled, foreach, eager"),
    ("adamw", "native", "auto, fused, foreach, eager"), ("prodigy", "foreach", "auto, eager"),
    ("schedulefree_adamw", "compiled", "auto, foreach, eager")])
def test_an_implementation_the_optimizer_lacks_is_refused_with_what_it_has(name, impl, runs_with, capsys):
    with pytest.raises(SystemExit):
        parse("--optimizer", name, "--optimizer_impl", impl)
    assert f"--optimizer_impl {impl} (" in capsys.readouterr().err
    assert cli.impl_refusal(name, impl).endswith(f"--optimizer {name}; it runs with {runs_with}")


def test_one_spelling_per_flag():
    with pytest.raises(SystemExit):
        parse("--fused_optimizer")


def test_fused_torch_baseline_steps_like_the_eager_one():
    import torch

    torch.manual_seed(0)
    models = [nn.Linear(8, 3) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    opts = [cli.optimizer_from_args(parse("--optimizer", "adamw", "--learning_rate", "1e-2", *impl), m)
            for impl, m in zip([[], ["--optimizer_impl", "eager"]], models)]
    x = torch.randn(16, 8)
    for _ in range(5):
        for m, o in zip(models, opts):
            o.zero_grad()
            m(x).pow(2).sum().backward()
            o.step()  # clipping at the default 1.0 runs as the step pre-hook on both
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_optimizer_args_reach_the_constructor_and_the_record():
    from adaptopt.registry import run_hyperparameters

    args = parse("--optimizer", "prodigy", "--optimizer_args", "use_bias_correction=true", "d_coef=0.5",
                 "betas=(0.9,0.99)")
    optimizer = cli.optimizer_from_args(args, nn.Linear(4, 2))
    used = run_hyperparameters(optimizer)
    assert used["use_bias_correction"] is True and used["d_coef"] == 0.5 and tuple(used["betas"]) == (0.9, 0.99)
    assert used["lr"] == 1.0 and used["safeguard_warmup"] is True  # the registry's settings stay
    assert cli.parse_optimizer_args(["name=foo", "x=null", "n=3"]) == {"name": "foo", "x": None, "n": 3}


@pytest.mark.parametrize("optimizer, item, message", [
    ("prodigy", "use_bias_corection=true", "prodigy takes no argument 'use_bias_corection'; it takes "),
    ("prodigy", "lr=0.5", "set it with --learning_rate instead"),
    ("adaptopt", "betas=(0.9,0.99)", "set it with --beta1 / --beta2 instead"),
    ("schedulefree_adamw", "warmup_steps=10", "set it with --warmup_ratio / --num_warmup_steps instead"),
    ("adaptopt", "compiled=true", "the implementation is picked by --optimizer_impl"),
    ("adamw", "amsgrad", "takes KEY=VALUE pairs (got 'amsgrad')"),
    ("prodigy", "d_coef=half", "prodigy's d_coef takes a value like its default 1.0"),
    ("prodigy", "use_bias_correction=1", "prodigy's use_bias_correction takes a value like its default False"),
    ("adamw", "amsgrad=yes", "adamw's amsgrad takes a value like its default False"),
])
def test_optimizer_args_a_flag_sets_or_the_constructor_lacks_are_refused(optimizer, item, message, capsys):
    with pytest.raises(SystemExit):
        parse("--optimizer", optimizer, "--optimizer_args", item)
    assert message in capsys.readouterr().err


def test_flag_hyperparameters_include_optimizer_args_keys():
    argv = ["--learning_rate", "1.0", "--optimizer_args", "d_coef=0.5", "use_bias_correction=true", "--seed", "1"]
    assert cli.flag_hyperparameters(argv) == {"lr", "d_coef", "use_bias_correction"}


def test_adaptopt_only_flags_are_refused_for_other_optimizers():
    with pytest.raises(SystemExit):
        parse("--optimizer", "adamw", "--adaptive_lr", "none")


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
