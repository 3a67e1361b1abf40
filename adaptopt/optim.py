"""AdaptOpt: Adam moments + decoupled weight decay + three switchable adaptive components.

At step t (1-based) with gradient g_t, for every element (the update is element-wise, so it runs on any
tensor shape, including DeepSpeed ZeRO's flat, sharded partitions):

    g_t     <- clip(g_t)                                        (1) global L2-norm clipping (clip.py)
    m_t      = b1_t m_{t-1} + (1 - b1_t) g_t                    Adam first moment
    v_t      = b2 v_{t-1} + (1 - b2) g_t^2                      Adam second moment
    m̂_t      = m_t / (1 - prod_{i<=t} b1_i),  v̂_t = v_t / (1 - b2^t)    bias correction
    lr_t     = schedule(t) * lr * s_t                           (2) adaptive learning rate (scale s_t)
    theta_t  = theta_{t-1} (1 - lr_t wd) - lr_t m̂_t / (sqrt(v̂_t) + eps)     decoupled weight decay
               + (s_t / s_{t-1} - 1) (theta_{t-1} - theta_0)     (only with the Mechanic rule)

With a constant b1 the bias correction is the usual 1 - b1^t.

(2) Adaptive learning rate: the scale s_t, by one of two rules (``adaptive_lr``):

  "mechanic" (the default): Mechanic (Cutkosky, Defazio, Mehta, "Mechanic: A Learning Rate Tuner",
    NeurIPS 2023). The iterate is the start theta_0 plus a scaled displacement, theta_t = theta_0 +
    s_t Delta_t, where Delta sums the AdamW updates above taken at scale 1. A parameter-free online
    learner (mechanic.py) sets s from h_t = -<g_t, Delta_t> (plus a small decay term): the hypergradient
    of the loss with respect to a scale of the *whole* path since the start. While going further along
    the path still lowers the loss, s grows exponentially; when the path overshoots, s falls and pulls
    the displacement back (the last term of the update). s starts at ``scale_init`` (1% of ``lr``) and
    the run finds its own level (docs/optimizer.md shows how far that holds across starting values). One more
    fp32 buffer per element: the start theta_0 (``x0``), since Delta_t = (theta_t - theta_0) / s_{t-1}.
  "hypergradient": hypergradient descent (Baydin, Cornish, Martinez Rubio, Schmidt, Wood, "Online
    Learning Rate Adaptation with Hypergradient Descent", ICLR 2018), multiplicative and normalised,
    from the cosine c_t (below) between the new gradient and the *last* update:
        s_{t+1} = clip(s_t (1 + hypergrad_rate * c_t), lr_scale_bounds),   s_1 = 1
    Measured on short fine-tuning runs (docs/optimizer.md), the scale moves only while consecutive
    updates agree (the first ~150 updates) and then freezes where its rate got it (about 2.2x at rate
    0.1): it corrects a base LR that is too small by about that much; it does not find an arbitrary one.
  None: s_t = 1 (the schedule's LR as given).

(3) Adaptive momentum, the AMoC rule (Rashidi, Ahmadi K. A., An, Wang, "Adaptive Momentum Coefficient
    for Neural Network Optimization", ECML-PKDD 2020): weight the momentum by how well the path keeps
    its direction,

        b1_{t+1} = min(b1 (1 + momentum_rate * c_t), beta1_max)

    where c_t is the cosine between the new gradient and the previous update direction
    u_{t-1} = m̂_{t-1} / (sqrt(v̂_{t-1}) + eps), summed over all parameters of a param group:

        c_t = <g_t, u_{t-1}> / (||g_t|| ||u_{t-1}||)

Every rule uses step t's statistics one step late (computed during step t, applied from step t+1). That
is what lets the native update be a single pass over memory: the statistics are reduced in the same loop
that writes the new moments (native_update.py; the compiled kernel on the CPU reduces them in a loop of
its own, see functional.py). With ``adaptive_lr=None, adaptive_momentum=False,
max_grad_norm=None`` AdaptOpt is exactly AdamW (the tests hold it to torch.optim.AdamW for 100 steps in
float64).

State per parameter element: exp_avg and exp_avg_sq (2 x 4 bytes in fp32), as Adam, and with the Mechanic
rule the start x0 (4 bytes more). Per tensor a step counter and, only with adaptive momentum, the scalar
``beta1_prod``. Per group the scalars ``lr_scale`` (the scale the group's last step used) and
``path_cos``; the Mechanic learner's few floats and the clipper's ride in ``state_dict`` too.

Sharded statistics: under ZeRO each rank holds a slice of every group; pass ``reduce_fn`` (sums a
float64 tensor over the data-parallel group) so that c_t, Mechanic's h_t and the clipping norm are
global. Plain data parallel needs none (every rank sees the full, identical gradients).

Deferred statistics: a step leaves its local sums in the group (``pending_stats``, for c_t) and in the
Mechanic learner (for h_t, summed over *all* groups: one scale for the whole model); the next step
reduces them over shards and applies the rules before its update. The rules use them one step late
anyway, and deferring is what makes the statistics right under DeepSpeed, which calls ``step()`` once per
param group (ZeRO-1/2) or once per sub-group (ZeRO-3 splits groups larger than ``sub_group_size``): the
calls of one step (recognised by the same step number per group) add their sums before they are used.
So after ``step()``, ``group["lr_scale"]`` is the scale that step used.
"""
from __future__ import annotations

import math
from typing import Callable, Iterable

import torch
from torch import Tensor

from .clip import GradClipper, ReduceFn, attach_state
from .functional import (
    TensorScalars,
    adaptopt_compiled,
    adaptopt_foreach,
    adaptopt_single_tensor,
    bias_correction2_sqrt,
)
from .mechanic import MechanicScale
from .hparam_checks import check_betas, check_nonneg, check_positive, check_range

# The rules for the learning-rate scale s_t (module docstring, (2)); None switches it off.
ADAPTIVE_LR_RULES = ("mechanic", "hypergradient")


class AdaptOpt(torch.optim.Optimizer):
    """Adam(W) with an adaptive learning-rate scale, adaptive momentum and gradient clipping.

    Args:
        params: parameters or param groups, as for any torch optimizer.
        lr: base learning rate; the schedule multiplies it and the adaptive scale multiplies the result.
            With ``adaptive_lr="mechanic"`` it only sets the units: the learned scale starts at
            ``scale_init`` times it and finds the level itself; with the other rules it is the learning
            rate itself.
        betas: (b1, b2): b1 is the base momentum the adaptive rule starts from.
        eps: term added to sqrt(v̂) (> 0).
        weight_decay: decoupled weight decay (AdamW's), per param group.
        adaptive_lr: "mechanic" (learned scale of the whole displacement), "hypergradient" (per-step
            hypergradient scale) or None (no adaptive scale). One value for the whole optimizer.
        scale_decay: Mechanic's decay of the scale (the paper's lambda).
        scale_init: Mechanic's starting scale, relative to ``lr`` (the paper's s_init): the first updates
            are this fraction of ``lr``, and the learner grows (or shrinks) it from there.
        hypergrad_rate: hypergradient rule: how fast the scale moves, by at most this fraction per step.
        lr_scale_bounds: hypergradient rule: (low, high) the scale is kept in; 1.0 must lie inside.
        adaptive_momentum: AMoC momentum (rule (3)).
        momentum_rate: how strongly b1 follows the path cosine.
        beta1_max: upper bound of the adapted b1 (< 1).
        max_grad_norm: global L2 clipping threshold; None: no fixed clipping.
        adaptive_clip: ZClip threshold from the norm's running statistics (max_grad_norm then applies
            only during its warmup). See clip.GradClipper.
        foreach: use the torch._foreach_* implementation (default: on for CUDA tensors).
        compiled: use the torch.compile-d kernel (CPU and GPU; compiles on first step). With
            compiled=True or native=True (in every param group) clipping is folded into that kernel: it
            multiplies the gradient by the clip factor as it reads it, so after step() p.grad still holds the
            *unclipped* gradient (the update used the clipped one); the pre-clip norm is
            ``grad_clipper.last_norm``. The other implementations clip p.grad in place.
        native: use the vectorised C++ kernel for CPU tensors (native_update.py; built with the C++ compiler on
            first use, about a minute, then cached): the host-side step of DeepSpeed ZeRO-Offload. Tensors
            elsewhere take the compiled path.
        reduce_fn: sums a float64 tensor over shards; only for sharded parameters (ZeRO).
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.01,
        *,
        adaptive_lr: str | None = "mechanic",
        scale_decay: float = 0.01,
        scale_init: float = 0.01,
        hypergrad_rate: float = 0.1,
        lr_scale_bounds: tuple[float, float] = (0.1, 10.0),
        adaptive_momentum: bool = True,
        momentum_rate: float = 0.1,
        beta1_max: float = 0.99,
        max_grad_norm: float | None = 1.0,
        adaptive_clip: bool = False,
        foreach: bool | None = None,
        compiled: bool | None = None,
        native: bool | None = None,
        reduce_fn: ReduceFn | None = None,
    ):
        check_positive("lr", lr, allow_zero=True)
        check_betas(betas)
        check_positive("eps", eps)
        check_nonneg("weight_decay", weight_decay)
        if adaptive_lr not in (None, *ADAPTIVE_LR_RULES):
            raise ValueError(f"Invalid adaptive_lr: {adaptive_lr!r} (must be one of {ADAPTIVE_LR_RULES} or None)")
        check_nonneg("scale_decay", scale_decay)
        check_range("scale_init", scale_init, 1e-12, 1.0 + 1e-12, "(0, 1]")
        check_nonneg("hypergrad_rate", hypergrad_rate, upper=1.0)
        low, high = lr_scale_bounds
        if not 0 < low <= 1.0 <= high:
            raise ValueError(f"Invalid lr_scale_bounds: {lr_scale_bounds} (need 0 < low <= 1 <= high)")
        check_nonneg("momentum_rate", momentum_rate, upper=1.0)
        check_range("beta1_max", beta1_max, betas[0], 1.0, "[beta1, 1)")
        chosen = [name for name, on in (("foreach", foreach), ("compiled", compiled), ("native", native)) if on]
        if len(chosen) > 1:
            raise ValueError(f"{'=True and '.join(chosen)}=True are exclusive: pick one implementation")
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
            adaptive_lr=adaptive_lr, scale_decay=scale_decay, scale_init=scale_init,
            hypergrad_rate=hypergrad_rate, lr_scale_bounds=tuple(lr_scale_bounds),
            adaptive_momentum=adaptive_momentum, momentum_rate=momentum_rate, beta1_max=beta1_max,
            foreach=foreach, compiled=compiled, native=native,
            # Run-wide scalars live in the group so that state_dict() carries them.
            lr_scale=1.0, path_cos=0.0,
            # This group's local statistics of the last step, folded into path_cos/lr_scale when the next
            # step starts (see "Deferred statistics" in the module docstring).
            pending_stats=None, pending_step=None,
        )
        super().__init__(params, defaults)
        rules = {group["adaptive_lr"] for group in self.param_groups}
        if len(rules) > 1:
            raise ValueError(f"adaptive_lr differs between param groups ({sorted(map(str, rules))}): it sets one "
                             "scale for the whole optimizer; give it to AdaptOpt, not per group")
        self.reduce_fn = reduce_fn
        self.grad_clipper = GradClipper(max_grad_norm, adaptive=adaptive_clip, reduce_fn=reduce_fn)
        attach_state(self, self.grad_clipper)
        # Mechanic's scale is one number for every group, so its learner lives here, not in a group.
        self.lr_tuner = MechanicScale(lr, scale_decay, scale_init) if adaptive_lr == "mechanic" else None
        if self.lr_tuner is not None:
            attach_state(self, self.lr_tuner, key="lr_tuner")

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)  # also the end of load_state_dict
        for group in self.param_groups:  # a checkpoint whose groups name the compiled path by its old key
            if "compiled" not in group:
                group["compiled"] = group.pop("fused", None)
            group.setdefault("native", None)  # saved before the native kernel existed

    def add_param_group(self, param_group: dict) -> None:
        # A group's position, kept in the group: DeepSpeed ZeRO-1/2 hand step() one group at a time, and the
        # Mechanic learner must tell "another group of this step" from "the next step" (mechanic.py).
        param_group.setdefault("index", len(self.param_groups))
        super().add_param_group(param_group)

    @staticmethod
    def current_beta1(group: dict) -> float:
        """b1 this group uses at its next step (rule (3), from the last path cosine)."""
        beta1 = group["betas"][0]
        if not group["adaptive_momentum"]:
            return beta1
        return min(beta1 * (1.0 + group["momentum_rate"] * group["path_cos"]), group["beta1_max"])

    def _init_group(self, group, params, grads, exp_avgs, exp_avg_sqs, states) -> None:
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("AdaptOpt does not support sparse gradients")
            state = self.state[p]
            if not state:
                state["step"] = torch.tensor(0.0, dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                # optional buffers exist only when their feature is on
                if group["adaptive_momentum"]:
                    state["beta1_prod"] = 1.0
                if group["adaptive_lr"] == "mechanic":
                    state["x0"] = p.detach().clone(memory_format=torch.preserve_format)
            params.append(p)
            grads.append(p.grad)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            states.append(state)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        grad_scale = None  # the clipping factor, when the compiled kernels apply it instead of clip_
        if self.grad_clipper.enabled:
            grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
            if all(g["compiled"] or g["native"] for g in self.param_groups):
                # p.grad keeps the unclipped gradient: the compiled or native update multiplies it by the factor.
                grad_scale = self.grad_clipper.clip_factor(grads)
            else:
                self.grad_clipper.clip_(grads)
            if not self.grad_clipper.last_finite:
                # Leave parameters, moments and step counts untouched: the step did not happen (the clipper
                # counts it: grad_clipper.nonfinite_steps).
                return loss

        tuner = self.lr_tuner
        for group in self.param_groups:
            params, grads, exp_avgs, exp_avg_sqs, states = [], [], [], [], []
            self._init_group(group, params, grads, exp_avgs, exp_avg_sqs, states)
            if not params:  # e.g. ZeRO-3 empties every group but the sub-group it is stepping
                continue
            want_stats = group["adaptive_lr"] == "hypergradient" or group["adaptive_momentum"]
            # The step number this call performs (the same for every sub-group DeepSpeed steps separately).
            step_no = max(float(state["step"]) for state in states) + 1
            if want_stats and group.get("pending_step") not in (None, step_no):
                self._adapt(group)  # c_{t-1} from the previous step, before it sets this step's b1 and lr
            if tuner is not None:
                tuner.begin(group["index"], step_no, self.reduce_fn)  # h_{t-1} -> this step's scale
                group["lr_scale"] = tuner.scale
            beta1, beta2 = self.current_beta1(group), group["betas"][1]
            lr = group["lr"] * (group["lr_scale"] if group["adaptive_lr"] else 1.0)
            shift = tuner.ratio - 1.0 if tuner is not None else 0.0
            scalars = [self._scalars(group, state, beta1, beta2, lr, shift) for state in states]

            impl = _pick_impl(group, params)
            sums = impl(
                params, grads, exp_avgs, exp_avg_sqs, scalars,
                beta2=beta2, eps=group["eps"], want_stats=want_stats,
                x0s=[state["x0"] for state in states] if tuner is not None else None,
                **({} if grad_scale is None else {"grad_scale": grad_scale}),
            )
            local = sums.tolist() if sums is not None else []  # one host sync per call
            if want_stats:
                cos_sums = local[:3]
                if group.get("pending_step") == step_no:  # another sub-group of this group, same step
                    cos_sums = [a + b for a, b in zip(group["pending_stats"], cos_sums)]
                group["pending_stats"], group["pending_step"] = cos_sums, step_no
            if tuner is not None:
                tuner.add(group["index"], step_no, local[-4:])
        return loss

    @staticmethod
    def _scalars(group: dict, state: dict, beta1: float, beta2: float, lr: float,
                 scale_shift: float) -> TensorScalars:
        state["step"] += 1
        step = float(state["step"])
        if group["adaptive_momentum"]:
            prod_prev = state["beta1_prod"]
            state["beta1_prod"] = prod_prev * beta1
            bias_correction1 = 1 - state["beta1_prod"]
            bias_correction1_prev = 1 - prod_prev if step > 1 else 1.0
        else:
            bias_correction1 = 1 - beta1**step
            bias_correction1_prev = 1 - beta1 ** (step - 1) if step > 1 else 1.0
        return TensorScalars(
            step_size=lr / bias_correction1,
            decay=1 - lr * group["weight_decay"],
            beta1=beta1,
            bias_correction2_sqrt=bias_correction2_sqrt(beta2, step),
            bias_correction1_prev=bias_correction1_prev,
            bias_correction2_prev_sqrt=bias_correction2_sqrt(beta2, step - 1),
            scale_shift=scale_shift,
        )

    def _adapt(self, group: dict) -> None:
        """Rules (2, hypergradient) and (3): turn the previous step's pending sums [g·u, g·g, u·u] into the
        group's path cosine and LR scale (summed over shards first: every rank calls this at the same point)."""
        stats = torch.tensor(group["pending_stats"], dtype=torch.float64)
        group["pending_stats"], group["pending_step"] = None, None
        if self.reduce_fn is not None:
            stats = self.reduce_fn(stats)
        gu, gg, uu = (float(x) for x in stats)
        denom = math.sqrt(gg * uu)
        cos = gu / denom if denom > 0 and math.isfinite(denom) else 0.0
        group["path_cos"] = cos
        if group["adaptive_lr"] == "hypergradient":
            low, high = group["lr_scale_bounds"]
            scale = group["lr_scale"] * (1.0 + group["hypergrad_rate"] * cos)
            group["lr_scale"] = min(max(scale, low), high)


def _pick_impl(group: dict, params: list[Tensor]):
    if group["native"]:
        from .native_update import adaptopt_native  # builds the extension on first use

        return adaptopt_native
    if group["compiled"]:
        return adaptopt_compiled
    foreach = group["foreach"]
    if foreach is None:  # as torch: foreach by default where kernels launch on a device
        foreach = bool(params) and all(p.is_cuda for p in params)
    return adaptopt_foreach if foreach else adaptopt_single_tensor
