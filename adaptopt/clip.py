"""Global L2 gradient-norm clipping, fixed or with an adaptive threshold.

Fixed (the papers' rule): with g the concatenation of every gradient and c the threshold,

    g <- g * c / ||g||_2   if ||g||_2 > c,   else g unchanged.

(``torch.nn.utils.clip_grad_norm_`` instead multiplies by c / (||g|| + 1e-6) clamped to 1; we keep the
paper's exact form.)

Adaptive: the z-score rule of ZClip (Kumar, Owen, Roy Chowdhury, Gura, "ZClip: Adaptive Spike
Mitigation for LLM Pre-Training", arXiv:2504.02507, 2025). An exponential moving average of the norm's
mean mu and variance sigma^2 (decay ``ema_decay``, initialised from the first ``warmup_steps`` norms)
sets the threshold c_t = mu + z * sigma; a norm above it is scaled down to c_t, and the EMA is updated
with the norm *after* clipping so that one spike does not raise the next threshold. During the warmup
steps the fixed ``max_norm`` applies (no clipping if it is None). (ZClip also has a "reciprocal" variant
that clips below the threshold; we clip to the threshold itself, which is simpler to reason about.)

Sharding: the norm is the true global norm when every rank holds a slice of the gradients (ZeRO
partitions, or a flat shard): ``reduce_fn`` receives the local sum of squares (a float64 tensor) and
returns the sum over all shards, e.g. ``lambda t: (dist.all_reduce(t, group=dp_group), t)[1]``. Plain
data parallel (every rank holds full, identical gradients) needs no reduce_fn.

A non-finite norm (FP16 overflow, a NaN loss) leaves the gradients untouched and is reported through
``last_finite = False``; the caller (AdaptOpt, or the baseline hook) then skips the update, so NaN never
reaches the parameters.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

ReduceFn = Callable[[Tensor], Tensor]


def global_grad_norm(grads: list[Tensor], reduce_fn: ReduceFn | None = None) -> Tensor:
    """The L2 norm of all ``grads`` taken together, as a float64 0-d tensor (summed over shards)."""
    if grads:
        sumsq = torch.stack(torch._foreach_norm(grads)).to(torch.float64).square().sum()
    else:  # a rank can own no gradient (e.g. an empty ZeRO partition) and must still join the reduce
        sumsq = torch.zeros((), dtype=torch.float64)
    if reduce_fn is not None:
        sumsq = reduce_fn(sumsq)
    return sumsq.sqrt()


def clip_grad_norm_(grads: list[Tensor], max_norm: float, reduce_fn: ReduceFn | None = None) -> float:
    """Clips ``grads`` in place to global L2 norm ``max_norm`` (the paper's rule); returns the pre-clip norm.

    A non-finite norm is returned as is and the gradients are left untouched.
    """
    norm = float(global_grad_norm(grads, reduce_fn))
    if math.isfinite(norm) and norm > max_norm:
        torch._foreach_mul_(grads, max_norm / norm)
    return norm


class GradClipper:
    """Global-norm clipping with a fixed or adaptive (ZClip) threshold; keeps the figures for logging.

    Args:
        max_norm: the fixed threshold c (> 0); with ``adaptive`` it applies only during the warmup steps.
            None: no fixed threshold.
        adaptive: use the ZClip z-score threshold mu + z_thresh * sigma after ``warmup_steps`` steps.
        z_thresh: how many standard deviations above the mean norm is a spike (ZClip default 2.5).
        ema_decay: decay of the mean/variance EMA (ZClip's alpha, default 0.97).
        warmup_steps: finite norms collected before the adaptive threshold takes over.
        reduce_fn: sums a local sum of squares over shards (see the module docstring).
    """

    def __init__(
        self,
        max_norm: float | None = 1.0,
        *,
        adaptive: bool = False,
        z_thresh: float = 2.5,
        ema_decay: float = 0.97,
        warmup_steps: int = 25,
        reduce_fn: ReduceFn | None = None,
    ):
        if max_norm is not None and not max_norm > 0:
            raise ValueError(f"Invalid max_grad_norm: {max_norm} (must be > 0, or None for no fixed clipping)")
        if not z_thresh > 0:
            raise ValueError(f"Invalid z_thresh: {z_thresh} (must be > 0)")
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"Invalid ema_decay: {ema_decay} (must be in [0, 1))")
        if warmup_steps < 1:
            raise ValueError(f"Invalid warmup_steps: {warmup_steps} (must be >= 1)")
        self.max_norm = max_norm
        self.adaptive = adaptive
        self.z_thresh = z_thresh
        self.ema_decay = ema_decay
        self.warmup_steps = warmup_steps
        self.reduce_fn = reduce_fn
        # Running state (checkpointed through state_dict).
        self.warmup_norms: list[float] = []
        self.mean: float | None = None
        self.var: float | None = None
        self.nonfinite_steps = 0  # total steps whose norm was inf/nan
        # Last step, for logging.
        self.last_norm: float = float("nan")
        self.last_threshold: float | None = None
        self.last_finite = True

    @property
    def enabled(self) -> bool:
        return self.adaptive or self.max_norm is not None

    def threshold(self) -> float | None:
        """The threshold the next step will use (None: no clipping)."""
        if self.adaptive and self.mean is not None:
            return self.mean + self.z_thresh * math.sqrt(max(self.var, 0.0))
        return self.max_norm

    def clip_factor(self, grads: list[Tensor]) -> float:
        """The factor that clips ``grads``, without applying it: measures their global norm and returns
        ``factor_for_norm(norm)`` (threshold / norm, 1.0, or NaN when the norm is not finite). AdaptOpt's
        compiled path passes it into its kernel instead of scaling the gradients in place."""
        return self.factor_for_norm(float(global_grad_norm(grads, self.reduce_fn)))

    def factor_for_norm(self, norm: float) -> float:
        """The clipping factor for a global norm, recorded (``last_norm``, ``last_threshold``,
        ``last_finite``) with the running state updated as a clipping step does (the ZClip EMA sees the
        post-clip norm). Also for a norm measured elsewhere, e.g. by the DeepSpeed engine, which clips ZeRO
        shards itself (adaptopt.deepspeed_run). NaN when the norm is not finite: the caller skips the step."""
        threshold = self.threshold()
        self.last_norm, self.last_threshold = norm, threshold
        self.last_finite = math.isfinite(norm)
        if not self.last_finite:
            self.nonfinite_steps += 1
            return math.nan
        factor, clipped = 1.0, norm
        if threshold is not None and norm > threshold:
            factor, clipped = threshold / norm, threshold
        if self.adaptive:
            self._observe(clipped)
        return factor

    def clip_(self, grads: list[Tensor]) -> float:
        """Clips ``grads`` in place; returns the pre-clip global norm. Sets ``last_finite``."""
        factor = self.clip_factor(grads)
        if self.last_finite and factor != 1.0:
            torch._foreach_mul_(grads, factor)
        return self.last_norm

    def _observe(self, norm: float) -> None:
        if self.mean is None:
            self.warmup_norms.append(norm)
            if len(self.warmup_norms) == self.warmup_steps:
                n = torch.tensor(self.warmup_norms, dtype=torch.float64)
                self.mean, self.var = float(n.mean()), float(n.var(unbiased=False))
                self.warmup_norms = []
            return
        a = self.ema_decay
        self.mean = a * self.mean + (1 - a) * norm
        self.var = a * self.var + (1 - a) * (norm - self.mean) ** 2

    def state_dict(self) -> dict:
        return {
            "warmup_norms": list(self.warmup_norms),
            "mean": self.mean,
            "var": self.var,
            "nonfinite_steps": self.nonfinite_steps,
        }

    def load_state_dict(self, state: dict) -> None:
        self.warmup_norms = list(state["warmup_norms"])
        self.mean, self.var = state["mean"], state["var"]
        self.nonfinite_steps = state["nonfinite_steps"]

    def attach(self, optimizer: torch.optim.Optimizer) -> "GradClipper":
        """Makes ``optimizer`` clip its gradients before every step, and checkpoint this clipper's state.

        Used for optimizers that do not clip themselves (the torch baselines). The hook sees exactly the
        tensors the optimizer updates, which under DeepSpeed ZeRO are the rank's flat fp32 partitions:
        with a ``reduce_fn`` the norm is still the global one. On a non-finite norm the hook drops the
        gradients (``grad = None``), which makes torch optimizers skip every parameter: no NaN update.
        """
        optimizer.grad_clipper = self

        def pre_step(opt, args, kwargs):
            # args[0] is the optimizer itself; accelerate passes closure=None positionally
            closure = args[1] if len(args) > 1 else kwargs.get("closure")
            if closure is not None:
                raise RuntimeError(
                    "gradient clipping is attached to this optimizer, and clipping needs the gradients "
                    "before step(): call loss.backward() and then step() without a closure"
                )
            params = [p for group in opt.param_groups for p in group["params"] if p.grad is not None]
            self.clip_([p.grad for p in params])
            if not self.last_finite:
                for p in params:
                    p.grad = None

        optimizer.register_step_pre_hook(pre_step)
        attach_state(optimizer, self)
        return self


def attach_state(optimizer: torch.optim.Optimizer, owner, key: str = "grad_clipper") -> None:
    """Stores ``owner``'s state (a clipper's running statistics, the Mechanic learner) inside
    ``optimizer.state_dict()`` under ``key``, so every checkpoint of the optimizer (accelerate, DeepSpeed)
    carries it without extra plumbing. ``owner`` has ``state_dict()`` and ``load_state_dict(state)``."""

    def save(opt, state_dict):
        state_dict[key] = owner.state_dict()
        return state_dict

    def load(opt, state_dict):
        # read, not popped: under DeepSpeed the engine's clipper is attached under the key of AdaptOpt's own (which
        # is off there); the one attached last saved it, and every owner must see it (torch ignores extra keys)
        saved = state_dict.get(key)
        if saved is not None:
            owner.load_state_dict(saved)
        return state_dict

    optimizer.register_state_dict_post_hook(save)
    optimizer.register_load_state_dict_pre_hook(load)
