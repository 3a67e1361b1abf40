"""Learning-rate schedules as pure functions of the optimizer step, and one torch wrapper.

A schedule maps the 0-based index of the update about to be applied, t, to a multiplier of the base
LR: eta_t = eta_0 * f(t). Warmup combines with any of them: for t < W, f(t) = (t + 1) / W (the first
update already moves; t = W - 1 reaches the full LR), after which the decay runs on t - W.

    constant      f(t) = 1
    exponential   f(t) = gamma^t                                   (the papers' eta_t = eta_0 gamma^t)
    linear        f(t) = max(0, 1 - t / T)                         (T = total_steps - W)
    cosine        f(t) = m + (1 - m) (1 + cos(pi min(t, T) / T)) / 2   (m = min_ratio)
    cyclical      triangular (Smith, "Cyclical Learning Rates", 2017) between m and 1, half-period C:
                  f(t) = m + (1 - m) max(0, 1 - |t / C - 2 floor(t / (2C)) - 1|)   starting at m
    plateau       f = factor^k after k reductions, one each time the validation metric has not improved
                  for ``patience`` evaluations (torch's ReduceLROnPlateau rule, as a multiplier)

``ScheduledLR`` applies f to an optimizer and counts *applied* updates, not calls to ``scheduler.step()``.
So a step skipped for an FP16 overflow (GradScaler or DeepSpeed never call ``optimizer.step()``; AdaptOpt's
non-finite guard returns early) advances neither the schedule nor the optimizer's bias correction, and
calling ``scheduler.step()`` more than once per update (accelerate steps a prepared scheduler once per
process) cannot run it ahead. By itself it counts through an optimizer step hook, so a library user calls
``scheduler.step()`` after every ``optimizer.step()`` and needs nothing else. The recipes instead report
each applied update (``count_updates_externally()``, then ``record_update()``) from the one per-update
decision of adaptopt/divergence.py, which also covers DeepSpeed ZeRO's several ``step()`` calls per update.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from .hparam_checks import check_gamma, check_nonneg, check_range

Schedule = Callable[[int], float]


def constant(t: int) -> float:
    return 1.0


def exponential(t: int, *, gamma: float) -> float:
    return gamma**t


def linear(t: int, *, total_steps: int) -> float:
    return max(0.0, 1.0 - t / max(1, total_steps))


def cosine(t: int, *, total_steps: int, min_ratio: float = 0.0) -> float:
    progress = min(t, total_steps) / max(1, total_steps)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def cyclical(t: int, *, half_cycle_steps: int, min_ratio: float = 0.1) -> float:
    x = abs(t / half_cycle_steps - 2 * math.floor(t / (2 * half_cycle_steps)) - 1)
    return min_ratio + (1.0 - min_ratio) * max(0.0, 1.0 - x)


def with_warmup(schedule: Schedule, warmup_steps: int) -> Schedule:
    """Linear warmup over ``warmup_steps`` updates, then ``schedule`` counted from the end of warmup."""
    if warmup_steps <= 0:
        return schedule

    def f(t: int) -> float:
        if t < warmup_steps:
            return (t + 1) / warmup_steps
        return schedule(t - warmup_steps)

    return f


@dataclass
class Plateau:
    """Multiplier that drops by ``factor`` when the metric stalls for ``patience`` evaluations.

    Not a function of the step alone: ``observe(metric)`` after each evaluation, as ReduceLROnPlateau.
    """

    mode: str = "max"  # "max" for accuracy/F1, "min" for a loss or perplexity
    factor: float = 0.5
    patience: int = 1
    threshold: float = 1e-4  # relative improvement that counts
    min_multiplier: float = 1e-3
    multiplier: float = 1.0
    best: float | None = None
    bad_evals: int = 0

    def __post_init__(self):
        if self.mode not in ("min", "max"):
            raise ValueError(f"Invalid plateau mode: {self.mode!r} (must be 'min' or 'max')")
        check_range("plateau factor", self.factor, 1e-12, 1.0, "(0, 1)")
        if self.patience < 0:
            raise ValueError(f"Invalid plateau patience: {self.patience} (must be >= 0)")

    def __call__(self, t: int) -> float:
        return self.multiplier

    def observe(self, metric: float) -> bool:
        """Records an evaluation; returns True if the LR was reduced."""
        sign = 1.0 if self.mode == "max" else -1.0
        if self.best is None or sign * (metric - self.best) > self.threshold * abs(self.best):
            self.best, self.bad_evals = metric, 0
            return False
        self.bad_evals += 1
        if self.bad_evals > self.patience:
            self.multiplier = max(self.multiplier * self.factor, self.min_multiplier)
            self.bad_evals = 0
            return True
        return False

    def state_dict(self) -> dict:
        return {"multiplier": self.multiplier, "best": self.best, "bad_evals": self.bad_evals}

    def load_state_dict(self, state: dict) -> None:
        self.multiplier, self.best, self.bad_evals = state["multiplier"], state["best"], state["bad_evals"]


SCHEDULES = ("constant", "exponential", "linear", "cosine", "cyclical", "plateau")


def build_schedule(
    name: str,
    *,
    total_steps: int | None = None,
    warmup_steps: int = 0,
    gamma: float = 0.999,
    min_ratio: float = 0.0,
    half_cycle_steps: int | None = None,
    plateau: Plateau | None = None,
) -> Schedule:
    """The multiplier function f for schedule ``name`` (see the module docstring)."""
    if warmup_steps < 0:
        raise ValueError(f"Invalid warmup_steps: {warmup_steps} (must be >= 0)")
    check_nonneg("min_ratio", min_ratio, upper=1.0)
    decay_steps = None if total_steps is None else total_steps - warmup_steps
    if name in ("linear", "cosine") and (decay_steps is None or decay_steps < 1):
        raise ValueError(
            f"the {name} schedule needs total_steps > warmup_steps (got total_steps={total_steps}, "
            f"warmup_steps={warmup_steps})"
        )
    if name == "constant":
        f = constant
    elif name == "exponential":
        check_gamma(gamma)
        f = lambda t: exponential(t, gamma=gamma)  # noqa: E731
    elif name == "linear":
        f = lambda t: linear(t, total_steps=decay_steps)  # noqa: E731
    elif name == "cosine":
        f = lambda t: cosine(t, total_steps=decay_steps, min_ratio=min_ratio)  # noqa: E731
    elif name == "cyclical":
        if not half_cycle_steps or half_cycle_steps < 1:
            raise ValueError(f"the cyclical schedule needs half_cycle_steps >= 1 (got {half_cycle_steps})")
        ratio = min_ratio if min_ratio > 0 else 0.1
        f = lambda t: cyclical(t, half_cycle_steps=half_cycle_steps, min_ratio=ratio)  # noqa: E731
    elif name == "plateau":
        f = plateau if plateau is not None else Plateau()
    else:
        raise ValueError(f"Unknown lr schedule {name!r}; choose one of {', '.join(SCHEDULES)}")
    return with_warmup(f, warmup_steps)


class ScheduledLR(torch.optim.lr_scheduler.LRScheduler):
    """Sets each group's lr to base_lr * schedule(applied_steps), where applied_steps counts the
    optimizer updates that really happened (see the module docstring)."""

    def __init__(self, optimizer: torch.optim.Optimizer, schedule: Schedule, plateau: Plateau | None = None):
        self.schedule = schedule
        self.plateau = plateau  # the Plateau inside ``schedule``, if any, so its state is checkpointed
        self.applied_steps = 0
        self._hook = optimizer.register_step_post_hook(self._count_update)
        super().__init__(optimizer)

    def _count_update(self, optimizer, args, kwargs) -> None:
        # AdaptOpt returns early on a non-finite gradient norm; a baseline's clip hook drops the grads.
        clipper = getattr(optimizer, "grad_clipper", None)
        if clipper is None or clipper.last_finite:
            self.applied_steps += 1

    def count_updates_externally(self) -> None:
        """Stop counting ``optimizer.step()`` calls; the caller reports each applied update through
        ``record_update()``. The recipes do (adaptopt/training.py): they decide once per update whether it
        applied, also under DeepSpeed ZeRO, which calls ``step()`` once per param group (ZeRO-1/2) or
        sub-group (ZeRO-3) per update and whose engine knows whether an update applied."""
        self._hook.remove()

    def record_update(self) -> None:
        """One applied optimizer update (see ``count_updates_externally``)."""
        self.applied_steps += 1

    def get_lr(self) -> list[float]:
        multiplier = self.schedule(self.applied_steps)
        return [base_lr * multiplier for base_lr in self.base_lrs]

    def observe(self, metric: float) -> bool:
        """Feeds a validation metric to a plateau schedule (no-op for the others); True if LR dropped."""
        if self.plateau is None:
            return False
        reduced = self.plateau.observe(metric)
        if reduced:
            self._set_lrs()
        return reduced

    def _set_lrs(self) -> None:
        for group, lr in zip(self.optimizer.param_groups, self.get_lr()):
            group["lr"] = lr
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def step(self, epoch=None) -> None:
        # The torch base class also counts calls (last_epoch); we only ever read applied_steps.
        self.last_epoch += 1
        self._set_lrs()

    def state_dict(self) -> dict:
        state = {k: v for k, v in self.__dict__.items() if k not in ("optimizer", "schedule", "plateau", "_hook")}
        if self.plateau is not None:
            state["plateau"] = self.plateau.state_dict()
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        plateau = state_dict.pop("plateau", None)
        if plateau is not None and self.plateau is not None:
            self.plateau.load_state_dict(plateau)
        self.__dict__.update(state_dict)
        self._set_lrs()


def build_scheduler(optimizer: torch.optim.Optimizer, name: str, **kwargs) -> ScheduledLR:
    """``ScheduledLR`` for schedule ``name``; kwargs as for ``build_schedule``."""
    plateau = kwargs.pop("plateau", None)
    if name == "plateau" and plateau is None:
        plateau = Plateau()
    schedule = build_schedule(name, plateau=plateau, **kwargs)
    return ScheduledLR(optimizer, schedule, plateau=plateau if name == "plateau" else None)
