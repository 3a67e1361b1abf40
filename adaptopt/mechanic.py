"""The learned step-size scale of ``AdaptOpt(adaptive_lr="mechanic")``: Mechanic's one-dimensional learner.

Cutkosky, Defazio, Mehta, "Mechanic: A Learning Rate Tuner", NeurIPS 2023 (arXiv:2306.00144),
Algorithm 1. Mechanic writes the iterate as a reference point plus a scaled displacement,

    x_t = x_ref + s_t * Delta_t,      Delta_{t+1} = Delta_t + u_t    (u_t: the base optimizer's update)

and learns the one number s by online learning on the one-dimensional losses s -> h_t s, where

    h_t = -< g_t + lambda s_t ||g_t|| x_t / ||x_t||,  Delta_t >

is minus the derivative of the loss at x_ref + s Delta_t with respect to s: the hypergradient of a scale of
the *whole* displacement since the start, not of the last step. h_t > 0: going further along the path
still lowers the loss. (h has the opposite sign from the paper's, so that "progress" is positive.) The
lambda term (``scale_decay``) is the paper's weight decay on s. For each of n decay rates beta_i:

    m_i  = max(beta_i m_i, |h_t|)                 the largest recent |h|
    v_i  = beta_i^2 v_i + h_t^2                   its recent sum of squares
    r_i  = max(0, beta_i r_i + s_i h_t)           the "wealth" won by betting s_i on h
    s_i  = (s_init / n * m_i + r_i) / sqrt(v_i)   the next bet              (s_i starts at s_init / n)
    s    = sum_i s_i

This is a coin-betting (parameter-free) learner: s grows exponentially while h keeps its sign, and falls
back when h turns negative (the displacement overshot), without a rate to choose. The base update carries
the optimizer's ``lr`` and s is relative to it, starting at ``scale_init``: by the method's scale invariance
(h scales with the base step, s inversely) that is Mechanic with base learning rate 1 and
s_init = lr * scale_init. The paper starts from a tiny s_init (1e-8) on purpose: the learner works by
growing its bet from a small stake. A start at or above the level the run needs leaves s at its floor
(the s_init m_i / n term), where every sign change of h moves s by tens of percent and stretches or
shrinks the whole displacement with it (docs/optimizer.md has the pilot that showed it). So the default
starts at 1% of ``lr``.

Where we differ from the paper, and why:
- h_t reaches the learner one step late (the sums behind it are reduced in the update's own pass over
  memory; see optim.py), so the scale of step t is learned from h_1 .. h_{t-1}.
- no epsilon: a learner with v_i = 0 (no signal yet: h_1 = 0 because Delta_1 = 0) keeps its s_i, so the
  method is exactly invariant to the units of lr.
"""
from __future__ import annotations

import math

# The paper's decay rates: a learner per memory length, from ~10 to ~10^6 updates.
BETAS = (0.9, 0.99, 0.999, 0.9999, 0.99999, 0.999999)


class MechanicScale:
    """The scale s and the sums that feed it. Plain floats, so ``state_dict`` is a small dict.

    The optimizer feeds it, per ``step()`` call, the local sums of the call's tensors; ``begin`` sees when
    a new optimizer step starts (DeepSpeed may call ``step()`` several times per update, once per param
    group or ZeRO-3 sub-group), reduces the previous step's sums over shards and updates s.
    """

    def __init__(self, lr: float, scale_decay: float = 0.01, scale_init: float = 0.01):
        n = len(BETAS)
        self.lr = lr  # the base step size: turns the relative scale into the paper's absolute one (lambda term)
        self.scale_decay = scale_decay
        self.scale_init = scale_init  # the paper's s_init, relative to lr
        self.m = [0.0] * n
        self.v = [0.0] * n
        self.r = [0.0] * n
        self.s = [scale_init / n] * n
        self.scale = scale_init  # sum(s): the scale the current step uses
        self.built_with = scale_init  # the scale the current parameters were built with (the previous step's)
        self.ratio = 1.0  # scale / built_with: how much this step stretches x - x_ref
        # The sums [g.(x - x_ref), x.(x - x_ref), x.x, g.g] of the step in progress, and the step number
        # each param group (by its "index") contributed them at.
        self.pending: list[float] | None = None
        self.pending_steps: dict[int, float] = {}

    def begin(self, group_index: int, step: float, reduce_fn=None) -> None:
        """Called by every ``step()`` call for a param group, before its update. When this group already
        contributed to the pending sums at an earlier step number, a new optimizer step has started: fold
        the previous step's sums (over shards, with ``reduce_fn``) into the scale."""
        if not self.pending_steps:  # nothing was learned since the last update of s: no stretch
            self.ratio = 1.0
            return
        done = self.pending_steps.get(group_index)
        if done is None or done == step:  # another group or sub-group of the step in progress
            return
        sums, self.pending, self.pending_steps = self.pending, None, {}
        if reduce_fn is not None:
            import torch

            sums = reduce_fn(torch.tensor(sums, dtype=torch.float64)).tolist()
        self.update(self.hypergradient(*sums))

    def add(self, group_index: int, step: float, sums: list[float]) -> None:
        """This call's local sums [g.(x - x_ref), x.(x - x_ref), x.x, g.g]."""
        self.pending = list(sums) if self.pending is None else [a + b for a, b in zip(self.pending, sums)]
        self.pending_steps[group_index] = step

    def hypergradient(self, g_d: float, x_d: float, xx: float, gg: float) -> float:
        """h from the global sums of a step whose parameters x were built with scale ``built_with``
        (Delta = (x - x_ref) / built_with)."""
        s_prev = self.built_with
        decay = self.scale_decay * self.lr * s_prev * math.sqrt(gg) / math.sqrt(xx) if xx > 0 else 0.0
        h = -(g_d + decay * x_d) / s_prev
        return h if math.isfinite(h) else 0.0

    def update(self, h: float) -> None:
        """One step of the learner on h; moves ``scale`` on and records the stretch ``ratio``."""
        n = len(BETAS)
        for i, beta in enumerate(BETAS):
            self.m[i] = max(beta * self.m[i], abs(h))
            self.v[i] = beta * beta * self.v[i] + h * h
            self.r[i] = max(0.0, beta * self.r[i] + self.s[i] * h)
            if self.v[i] > 0:
                self.s[i] = (self.scale_init * self.m[i] / n + self.r[i]) / math.sqrt(self.v[i])
        new = sum(self.s)
        self.built_with, self.scale = self.scale, new
        self.ratio = new / self.built_with

    def state_dict(self) -> dict:
        keys = ("lr", "scale_decay", "scale_init", "m", "v", "r", "s", "scale", "built_with", "ratio", "pending")
        state = {k: (list(getattr(self, k)) if isinstance(getattr(self, k), list) else getattr(self, k))
                 for k in keys}
        state["pending_steps"] = {str(k): v for k, v in self.pending_steps.items()}
        return state

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            if key == "pending_steps":
                self.pending_steps = {int(k): v for k, v in value.items()}
            else:
                setattr(self, key, list(value) if isinstance(value, list) else value)
