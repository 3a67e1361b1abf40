"""LR schedules at their boundaries, warmup, and the applied-update counting of ScheduledLR."""
import math

import pytest
import torch

from adaptopt import AdaptOpt, Plateau, build_optimizer, build_schedule, build_scheduler
from adaptopt import schedules


def test_constant_and_exponential():
    assert build_schedule("constant")(0) == 1.0 and build_schedule("constant")(10**6) == 1.0
    f = build_schedule("exponential", gamma=0.9)
    assert f(0) == 1.0 and f(1) == 0.9 and f(10) == pytest.approx(0.9**10, rel=1e-15)
    assert build_schedule("exponential", gamma=1.0)(500) == 1.0  # gamma = 1 is allowed: no decay


def test_linear_boundaries():
    f = build_schedule("linear", total_steps=10)
    assert f(0) == 1.0 and f(5) == 0.5 and f(10) == 0.0 and f(25) == 0.0


def test_cosine_boundaries():
    f = build_schedule("cosine", total_steps=100, min_ratio=0.1)
    assert f(0) == pytest.approx(1.0) and f(50) == pytest.approx(0.55) and f(100) == pytest.approx(0.1)
    assert f(1000) == pytest.approx(0.1)  # stays at the floor after the end


def test_cyclical_triangle():
    f = build_schedule("cyclical", half_cycle_steps=4, min_ratio=0.2)
    assert [round(f(t), 10) for t in range(9)] == [0.2, 0.4, 0.6, 0.8, 1.0, 0.8, 0.6, 0.4, 0.2]


def test_warmup_then_decay_counted_from_end_of_warmup():
    f = build_schedule("linear", total_steps=14, warmup_steps=4)
    assert [f(t) for t in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == 1.0 and f(9) == 0.5 and f(14) == 0.0
    g = build_schedule("exponential", gamma=0.5, warmup_steps=2)
    assert [g(t) for t in range(5)] == [0.5, 1.0, 1.0, 0.5, 0.25]


def test_plateau_reduces_after_patience():
    p = Plateau(mode="max", factor=0.5, patience=1)
    assert not p.observe(0.70)
    assert not p.observe(0.69)  # first bad evaluation: within patience
    assert p.observe(0.69) and p(123) == 0.5
    assert not p.observe(0.80) and p.multiplier == 0.5  # improvement resets, never raises the LR


@pytest.mark.parametrize("kwargs,match", [
    (dict(name="exponential", gamma=0.0), r"Invalid gamma: 0.0 \(the exponential decay factor must be in \(0, 1\]\)"),
    (dict(name="exponential", gamma=1.5), r"Invalid gamma: 1.5"),
    (dict(name="linear", total_steps=5, warmup_steps=5), r"needs total_steps > warmup_steps"),
    (dict(name="cyclical"), r"needs half_cycle_steps >= 1"),
    (dict(name="warmup_cosine"), r"Unknown lr schedule 'warmup_cosine'; choose one of constant, exponential"),
])
def test_schedule_errors(kwargs, match):
    name = kwargs.pop("name")
    with pytest.raises(ValueError, match=match):
        build_schedule(name, **kwargs)


def _model_and_opt(**kw):
    p = torch.nn.Parameter(torch.ones(2))
    return p, AdaptOpt([p], lr=1.0, adaptive_lr=None, **kw)


def test_scheduler_follows_applied_updates_only():
    p, opt = _model_and_opt(max_grad_norm=10.0)
    sched = build_scheduler(opt, "exponential", gamma=0.5)
    assert opt.param_groups[0]["lr"] == 1.0
    p.grad = torch.ones(2)
    opt.step(); sched.step()
    assert opt.param_groups[0]["lr"] == 0.5
    # an overflowed FP16 step: the gradient is inf, AdaptOpt skips it, the schedule must not advance
    p.grad = torch.full((2,), float("inf"))
    opt.step(); sched.step()
    assert opt.param_groups[0]["lr"] == 0.5 and sched.applied_steps == 1
    # GradScaler / DeepSpeed skip by not calling optimizer.step() at all; accelerate may step the
    # scheduler several times per update: neither moves the schedule
    sched.step(); sched.step()
    assert opt.param_groups[0]["lr"] == 0.5
    p.grad = torch.ones(2)
    opt.step(); sched.step()
    assert opt.param_groups[0]["lr"] == 0.25


def test_scheduler_with_baseline_clip_hook_skips_non_finite():
    p = torch.nn.Parameter(torch.ones(2))
    opt = build_optimizer("sgd", [p], lr=1.0, max_grad_norm=1.0)
    sched = build_scheduler(opt, "linear", total_steps=4)
    p.grad = torch.tensor([float("nan"), 1.0])
    opt.step(); sched.step()
    assert torch.equal(p.detach(), torch.ones(2)) and sched.applied_steps == 0


def test_schedule_counted_externally_ignores_step_calls():
    """The recipes tell the schedule each applied update (adaptopt/divergence.py decides which): DeepSpeed ZeRO
    calls step() once per group or sub-group, and those calls must not move it."""
    model = torch.nn.Linear(3, 1)
    opt = build_optimizer("adamw", model, lr=1.0)
    sched = build_scheduler(opt, "linear", total_steps=10, warmup_steps=0)
    sched.count_updates_externally()
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    opt.step()
    sched.step()
    assert sched.applied_steps == 0 and opt.param_groups[0]["lr"] == 1.0
    sched.record_update()
    sched.step()
    assert sched.applied_steps == 1 and opt.param_groups[0]["lr"] == pytest.approx(0.9)


def test_scheduler_state_dict_round_trip_with_plateau():
    p, opt = _model_and_opt()
    sched = build_scheduler(opt, "plateau", warmup_steps=2)
    for metric in (0.5, 0.4, 0.4):
        p.grad = torch.ones(2)
        opt.step(); sched.step(); sched.observe(metric)
    assert sched.plateau.multiplier == 0.5 and opt.param_groups[0]["lr"] == 0.5
    state = sched.state_dict()
    assert "schedule" not in state and "_hook" not in state
    p2, opt2 = _model_and_opt()
    sched2 = build_scheduler(opt2, "plateau", warmup_steps=2)
    sched2.load_state_dict(state)
    assert sched2.applied_steps == 3 and sched2.plateau.multiplier == 0.5
    assert opt2.param_groups[0]["lr"] == 0.5


def test_pure_functions_are_pure():
    assert schedules.cosine(3, total_steps=10) == schedules.cosine(3, total_steps=10)
    assert math.isclose(schedules.linear(3, total_steps=4), 0.25)
