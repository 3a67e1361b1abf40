"""AdaptOpt written line by line from the equations in optim.py's docstring, in float64, for tests.

Deliberately naive: whole-vector arithmetic on one concatenated float64 vector per param group, no
in-place tricks, no shared code with the fast paths. The fast implementations are held to it.
"""
from __future__ import annotations

import math

import torch


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
        adaptive_lr: bool,
        hypergrad_rate: float,
        lr_scale_bounds: tuple[float, float],
        adaptive_momentum: bool,
        momentum_rate: float,
        beta1_max: float,
        max_grad_norm: float | None,
    ):
        self.shapes = [p.shape for p in params]
        self.theta = torch.cat([p.detach().reshape(-1).double() for p in params])
        self.m = torch.zeros_like(self.theta)
        self.v = torch.zeros_like(self.theta)
        self.t = 0
        self.lr, (self.b1, self.b2), self.eps, self.wd = lr, betas, eps, weight_decay
        self.adaptive_lr, self.kappa, self.bounds = adaptive_lr, hypergrad_rate, lr_scale_bounds
        self.adaptive_momentum, self.mu, self.b1_max = adaptive_momentum, momentum_rate, beta1_max
        self.c = max_grad_norm
        self.s = 1.0  # LR scale s_t
        self.s_used = 1.0  # the scale the last step used
        self.cos = 0.0  # c_{t-1}
        self.b1_prod = 1.0  # prod of the b1_i used so far

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
        # b1 for this step, from the previous cosine (rule 3)
        b1 = min(self.b1 * (1 + self.mu * self.cos), self.b1_max) if self.adaptive_momentum else self.b1
        self.t += 1
        self.m = b1 * self.m + (1 - b1) * g
        self.v = self.b2 * self.v + (1 - self.b2) * g * g
        self.b1_prod = self.b1_prod * b1 if self.adaptive_momentum else self.b1**self.t
        m_hat = self.m / (1 - self.b1_prod)
        v_hat = self.v / (1 - self.b2**self.t)
        self.s_used = self.s
        lr_t = lr * (self.s if self.adaptive_lr else 1.0)
        self.theta = self.theta * (1 - lr_t * self.wd) - lr_t * m_hat / (torch.sqrt(v_hat) + self.eps)
        # c_t, then rule (2) for the next step's scale
        denom = math.sqrt(float((g * g).sum()) * float((u * u).sum()))
        self.cos = float((g * u).sum()) / denom if denom > 0 else 0.0
        if self.adaptive_lr:
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
