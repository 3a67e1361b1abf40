"""adaptopt/deepspeed_run.py without a process group: who clips and at what value, and the optimizers refused
where DeepSpeed would run them wrongly (tests/test_deepspeed.py runs them under DeepSpeed)."""
import json

import pytest
import torch

from adaptopt import build_optimizer
from adaptopt.deepspeed_run import DeepSpeedRun
from conftest import REPO


def test_adagrad_under_zero_is_refused_with_the_reason():
    run = DeepSpeedRun(json.loads((REPO / "ds_configs" / "zero2.json").read_text()), 1.0, False)
    with pytest.raises(ValueError, match="adagrad cannot run under DeepSpeed ZeRO-1/2/3.*zero0.json"):
        run.guard(build_optimizer("adagrad", torch.nn.Linear(2, 2)))


@pytest.mark.parametrize("name,config,precision", [
    ("prodigy", "zero2.json", "fp32"), ("dadapt_adam", "zero3.json", "fp32"), ("prodigy", "zero0.json", "bf16"),
    ("schedulefree_adamw", "zero1.json", "fp32"), ("schedulefree_adamw", "zero0.json", "fp16")])
def test_peers_are_refused_where_deepspeed_wraps_them(name, config, precision):
    """Prodigy and D-Adapt would take a different step size on every rank and group, Schedule-Free would
    evaluate and save the wrong iterate: refused before training, with the reason and what to use instead."""
    ds = json.loads((REPO / "ds_configs" / config).read_text())
    for key in ("fp16", "bf16"):
        ds[key]["enabled"] = key == precision
    run = DeepSpeedRun(ds, 1.0, False)
    with pytest.raises(ValueError, match=r"cannot run under DeepSpeed ZeRO 1-3 or DeepSpeed's fp16/bf16: it .*"
                                         r"Use a ZeRO-0 fp32 config .* or plain DDP .* or --optimizer adaptopt"):
        run.guard(build_optimizer(name, torch.nn.Linear(2, 2)))


def test_auto_clipping_becomes_the_recipes_value_and_one_side_clips():
    z2 = json.loads((REPO / "ds_configs" / "zero2.json").read_text())
    run = DeepSpeedRun(z2, 0.25, False)
    assert run.config["gradient_clipping"] == 0.25 and not run.optimizer_clips
    z0 = json.loads((REPO / "ds_configs" / "zero0.json").read_text())
    for key in ("fp16", "bf16"):
        z0[key]["enabled"] = False
    run = DeepSpeedRun(z0, 0.25, False)  # the engine calls our optimizer directly: ours clips, DeepSpeed's is off
    assert run.config["gradient_clipping"] == 0.0 and run.optimizer_clips


def test_guard_makes_deepspeeds_initialising_step_a_no_op_until_attach():
    """DeepSpeed's fp16/bf16 ZeRO-0 wrappers call step() once with zero gradients before training: guard() makes
    that call change nothing (no weight decay, no Adam step count); attach() lifts it."""
    z0 = json.loads((REPO / "ds_configs" / "zero0.json").read_text())
    for key in ("fp16", "bf16"):
        z0[key]["enabled"] = False
    run = DeepSpeedRun(z0, 1.0, False)
    model = torch.nn.Linear(2, 2)
    optimizer = build_optimizer("adamw", model, lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    run.guard(optimizer)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters())) and not optimizer.state
    run.attach(None, optimizer)  # ZeRO-0 fp32: the engine is not consulted here
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    assert not all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # weight decay moved them


@pytest.mark.parametrize("config, on_host", [("zero2_offload.json", True), ("zero3_offload.json", True),
                                             ("zero2.json", False), ("zero0.json", False)])
def test_the_optimizer_steps_on_the_host_exactly_under_optimizer_offload(config, on_host):
    """The recipes build AdaptOpt for the device its step runs on: the host under ZeRO-Offload (where
    --optimizer_impl auto then picks the native CPU update), whatever device the model trains on."""
    from adaptopt import cli

    run = DeepSpeedRun(json.loads((REPO / "ds_configs" / config).read_text()), 1.0, False)
    assert run.optimizer_on_host is on_host
    chosen = cli.impl_arguments("adaptopt", "auto", "cpu" if run.optimizer_on_host else "meta")
    assert chosen.get("native", False) is on_host
