"""adaptopt/divergence.py: the one rule that tells an applied update from a skipped one, and the monitor that
stops a run whose updates keep being skipped."""
import pytest
import torch

from adaptopt import build_optimizer
from adaptopt.divergence import DivergenceMonitor, TooManySkippedUpdates, update_applied


def stepped(name: str, grad: float, **kwargs) -> torch.optim.Optimizer:
    p = torch.nn.Parameter(torch.ones(3))
    opt = build_optimizer(name, [p], lr=0.1, **kwargs)
    p.grad = torch.full((3,), grad)
    opt.step()
    return opt


@pytest.mark.parametrize("name", ["adaptopt", "adamw"])
def test_a_non_finite_gradient_the_optimizers_clipper_caught_is_a_skipped_update(name):
    assert update_applied(True, stepped(name, 1.0, max_grad_norm=1.0))
    assert not update_applied(True, stepped(name, float("nan"), max_grad_norm=1.0))
    assert not update_applied(True, stepped(name, float("inf"), max_grad_norm=1.0))


def test_a_step_the_launcher_skipped_is_a_skipped_update():
    """DeepSpeed's engine or accelerate's GradScaler skipped it (fp16 overflow): the optimizer never ran."""
    assert not update_applied(False, stepped("adamw", 1.0, max_grad_norm=1.0))
    assert not update_applied(False, stepped("sgd", 1.0))  # no clipper at all


def test_without_a_clipper_nothing_can_tell_and_the_update_counts_as_applied():
    opt = stepped("sgd", float("nan"))  # no max_grad_norm: a baseline without clipping
    assert not hasattr(opt, "grad_clipper") and update_applied(True, opt)


def test_monitor_stops_after_the_configured_run_of_skips():
    monitor = DivergenceMonitor(3)
    for applied in (False, False, True, False, False):
        monitor.update(applied)
    assert monitor.skipped == 4 and monitor.consecutive == 2
    with pytest.raises(TooManySkippedUpdates, match=r"3 updates in a row were skipped.*last checkpoint was kept"):
        monitor.update(False)
    with pytest.raises(ValueError, match="max_consecutive must be >= 1"):
        DivergenceMonitor(0)
