"""AdaptOpt written line by line from the equations in optim.py's and mechanic.py's docstrings, in float64,
for tests.

Deliberately naive: whole-vector arithmetic on one concatenated float64 vector per param group, no
in-place tricks, no shared code with the fast paths (the Mechanic learner is written out again here). The
fast implementations are held to it.
"""
from __future__ import annotations

import math

import torch

MECHANIC_BETAS = (0.9, 0.99, 0.999, 0.9999, 0.99999, 0.999999)


class ReferenceAdaptOpt:
    """One param group, given as a list of shapes; ``step(grads)`` returns the new parameter list."""

    def __init__(
        self,
        params: list[torch.Tensor],
        *,
        lr: float,
        betas: tuple[float, float],
        eps: float,
        weight_decay: float,
        adaptive_lr: str | None,
        hypergrad_rate: float,
        lr_scale_bounds: tuple[float, float],
        adaptive_momentum: bool,
        momentum_rate: float,
        beta1_max: float,
        max_grad_norm: float | None,
        scale_decay: float = 0.01,
        scale_init: float = 0.01,
    ):
        self.shapes = [p.shape for p in params]
        self.theta = torch.cat([p.detach().reshape(-1).double() for p in params])
        self.theta0 = self.theta.clone()
        self.m = torch.zeros_like(self.theta)
        self.v = torch.zeros_like(self.theta)
        self.t = 0
        self.lr, (self.b1, self.b2), self.eps, self.wd = lr, betas, eps, weight_decay
        self.rule, self.kappa, self.bounds = adaptive_lr, hypergrad_rate, lr_scale_bounds
        self.adaptive_momentum, self.mu, self.b1_max = adaptive_momentum, momentum_rate, beta1_max
        self.c = max_grad_norm
        # LR scale of the next step, and the scale the last step used
        self.s = self.s_used = scale_init if adaptive_lr == "mechanic" else 1.0
        self.cos = 0.0  # c_{t-1}
        self.b1_prod = 1.0  # prod of the b1_i used so far
        # Mechanic: the learner per beta, and h of the last step (applied one step late)
        self.lam, self.s_init = scale_decay, scale_init
        n = len(MECHANIC_BETAS)
        self.mech_m, self.mech_v, self.mech_r = [0.0] * n, [0.0] * n, [0.0] * n
        self.mech_s = [scale_init / n] * n
        self.h_last = None

    def _mechanic_learn(self, h: float) -> float:
        """One step of Mechanic's learner on h; returns sum_i s_i."""
        n = len(MECHANIC_BETAS)
        for i, beta in enumerate(MECHANIC_BETAS):
            self.mech_m[i] = max(beta * self.mech_m[i], abs(h))
            self.mech_v[i] = beta**2 * self.mech_v[i] + h**2
            self.mech_r[i] = max(0.0, beta * self.mech_r[i] + self.mech_s[i] * h)
            if self.mech_v[i] > 0:
                self.mech_s[i] = (self.s_init * self.mech_m[i] / n + self.mech_r[i]) / math.sqrt(self.mech_v[i])
        return sum(self.mech_s)

    def step(self, grads: list[torch.Tensor], lr: float | None = None) -> list[torch.Tensor]:
        lr = self.lr if lr is None else lr
        g = torch.cat([x.reshape(-1).double() for x in grads])
        # (1) clipping: g <- g c / ||g|| if ||g|| > c
        norm = math.sqrt(float((g * g).sum()))
        if self.c is not None and norm > self.c:
            g = g * (self.c / norm)
        # previous update direction u_{t-1} = m̂_{t-1} / (sqrt(v̂_{t-1}) + eps), zero at t = 1
        if self.t == 0:
            u = torch.zeros_like(g)
        else:
            m_hat = self.m / (1 - self.b1_prod)
            v_hat = self.v / (1 - self.b2**self.t)
            u = m_hat / (torch.sqrt(v_hat) + self.eps)
        # Mechanic: this step's scale from h_{t-1}; the parameters were built with the last step's scale
        stretch = 1.0
        if self.rule == "mechanic" and self.h_last is not None:
            self.s = self._mechanic_learn(self.h_last)
            stretch = self.s / self.s_used
        # b1 for this step, from the previous cosine (rule 3)
        b1 = min(self.b1 * (1 + self.mu * self.cos), self.b1_max) if self.adaptive_momentum else self.b1
        self.t += 1
        self.m = b1 * self.m + (1 - b1) * g
        self.v = self.b2 * self.v + (1 - self.b2) * g * g
        self.b1_prod = self.b1_prod * b1 if self.adaptive_momentum else self.b1**self.t
        m_hat = self.m / (1 - self.b1_prod)
        v_hat = self.v / (1 - self.b2**self.t)
        built_with = self.s_used  # theta_t = theta_0 + built_with * Delta_t
        self.s_used = self.s
        lr_t = lr * (self.s if self.rule else 1.0)
        displacement = self.theta - self.theta0
        if self.rule == "mechanic":
            # h_t = -<g + lambda (lr s) ||g|| theta / ||theta||, Delta_t>, Delta_t = displacement / built_with
            delta = displacement / built_with
            theta_norm = math.sqrt(float((self.theta * self.theta).sum()))
            decay = self.lam * self.lr * built_with * norm_of(g) / theta_norm if theta_norm > 0 else 0.0
            self.h_last = -float(((g + decay * self.theta) * delta).sum())
        self.theta = (self.theta * (1 - lr_t * self.wd) - lr_t * m_hat / (torch.sqrt(v_hat) + self.eps)
                      + (stretch - 1.0) * displacement)
        # c_t, then the hypergradient rule for the next step's scale
        denom = math.sqrt(float((g * g).sum()) * float((u * u).sum()))
        self.cos = float((g * u).sum()) / denom if denom > 0 else 0.0
        if self.rule == "hypergradient":
            low, high = self.bounds
            self.s = min(max(self.s * (1 + self.kappa * self.cos), low), high)
        return self.params()

    def params(self) -> list[torch.Tensor]:
        out, i = [], 0
        for shape in self.shapes:
            n = math.prod(shape)
            out.append(self.theta[i : i + n].reshape(shape))
            i += n
        return out


def norm_of(x: torch.Tensor) -> float:
    return math.sqrt(float((x * x).sum()))
