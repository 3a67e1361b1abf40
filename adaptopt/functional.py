"""The AdaptOpt update, as functions over lists of tensors.

One math, three implementations of the same signature:

- ``adaptopt_single_tensor``: a for-loop over tensors, written like ``torch.optim.AdamW``'s single-tensor
  path (same operation order, so with the adaptive parts off it is bit-identical to AdamW in float64);
- ``adaptopt_foreach``: the same arithmetic with ``torch._foreach_*`` (fewer kernel launches);
- ``adaptopt_compiled``: one ``torch.compile``-d kernel per tensor that reads p, g, m, v once and writes
  p, m, v once (7 tensors: the memory-bandwidth floor of an Adam step), with the adaptive-LR/momentum
  statistics reduced inside the same pass.

Every function updates ``params``, ``exp_avgs``, ``exp_avg_sqs`` in place and, when ``want_stats`` is
true, returns a float64 tensor ``[g·u, g·g, u·u]`` summed over the tensors given, where
``u = m̂_{t-1} / (sqrt(v̂_{t-1}) + eps)`` is the direction of the *previous* update recomputed from the
moments before they are overwritten (so no extra state buffer is needed). The caller turns those sums
into cos(g_t, u_{t-1}) after reducing them over shards (see ``AdaptOpt``).

Per-tensor scalars come precomputed from the caller in ``TensorScalars`` because tensors can be at
different step counts (a parameter that got no gradient for a while).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class TensorScalars:
    """Scalars of one tensor's update at step t (1-based). All in float64 Python floats."""

    step_size: float  # lr_t / (1 - prod_{i<=t} beta1_i): the bias-corrected step
    decay: float  # 1 - lr_t * weight_decay: decoupled weight decay factor
    beta1: float  # beta1 used at this step (adaptive momentum may change it every step)
    bias_correction2_sqrt: float  # sqrt(1 - beta2^t)
    # For the statistics of the previous update direction u_{t-1} (unused at t == 1 where m = v = 0):
    bias_correction1_prev: float  # 1 - prod_{i<=t-1} beta1_i   (1.0 at t == 1)
    bias_correction2_prev_sqrt: float  # sqrt(1 - beta2^(t-1))  (1.0 at t == 1)


def _zero_stats(device) -> Tensor:
    return torch.zeros(3, dtype=torch.float64, device=device)


def adaptopt_single_tensor(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    scalars: list[TensorScalars],
    *,
    beta2: float,
    eps: float,
    want_stats: bool,
) -> Tensor | None:
    stats = _zero_stats(params[0].device) if (want_stats and params) else None
    for p, g, m, v, s in zip(params, grads, exp_avgs, exp_avg_sqs, scalars):
        if stats is not None:
            # u_{t-1} from the moments as they were after step t-1.
            u = (m / s.bias_correction1_prev) / (v.sqrt() / s.bias_correction2_prev_sqrt + eps)
            stats += torch.stack([(g * u).sum(), (g * g).sum(), (u * u).sum()]).to(torch.float64)
        p.mul_(s.decay)
        m.lerp_(g, 1 - s.beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        denom = (v.sqrt() / s.bias_correction2_sqrt).add_(eps)
        p.addcdiv_(m, denom, value=-s.step_size)
    return stats


def adaptopt_foreach(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    scalars: list[TensorScalars],
    *,
    beta2: float,
    eps: float,
    want_stats: bool,
) -> Tensor | None:
    if not params:
        return None
    stats = None
    if want_stats:
        # u = (m / bc1_prev) / (sqrt(v) / sqrt(bc2_prev) + eps), elementwise over every tensor.
        denom = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_div_(denom, [s.bias_correction2_prev_sqrt for s in scalars])
        torch._foreach_add_(denom, eps)
        u = torch._foreach_div(exp_avgs, [s.bias_correction1_prev for s in scalars])
        torch._foreach_div_(u, denom)
        gu = torch.stack([x.sum() for x in torch._foreach_mul(grads, u)]).sum()
        gg = torch.stack(torch._foreach_norm(grads)).to(torch.float64).square().sum()
        uu = torch.stack(torch._foreach_norm(u)).to(torch.float64).square().sum()
        stats = torch.stack([gu.to(torch.float64), gg, uu])
        del u, denom
    torch._foreach_mul_(params, [s.decay for s in scalars])
    # m <- m + (1 - beta1) (g - m): lerp with per-tensor weights.
    for beta1, idx in _indices_by_value([s.beta1 for s in scalars]).items():
        torch._foreach_lerp_([exp_avgs[i] for i in idx], [grads[i] for i in idx], 1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denom, [s.bias_correction2_sqrt for s in scalars])
    torch._foreach_add_(denom, eps)
    torch._foreach_addcdiv_(params, exp_avgs, denom, [-s.step_size for s in scalars])
    return stats


def _indices_by_value(values: list[float]) -> dict[float, list[int]]:
    """Groups tensor indices that share a value (almost always one group: every tensor at one step)."""
    out: dict[float, list[int]] = {}
    for i, value in enumerate(values):
        out.setdefault(value, []).append(i)
    return out


def _adaptopt_kernel(p, g, m, v, step_size, decay, beta1, beta2, eps, bc2_sqrt, bc1_prev, bc2_prev_sqrt):
    """One tensor's update, written so that inductor fuses it into a single read-p,g,m,v / write-p,m,v loop.

    Scalars arrive as 0-d tensors so that new values (every step) do not trigger recompilation. The
    statistics are float64 sums of float32 products: accumulation error stays below what cos needs.
    """
    u = (m / bc1_prev) / (v.sqrt() / bc2_prev_sqrt + eps)
    gu = (g * u).sum(dtype=torch.float64)
    gg = (g * g).sum(dtype=torch.float64)
    uu = (u * u).sum(dtype=torch.float64)
    m_new = m + (g - m) * (1 - beta1)
    v_new = v * beta2 + g * g * (1 - beta2)
    p_new = p * decay - step_size * m_new / (v_new.sqrt() / bc2_sqrt + eps)
    p.copy_(p_new)
    m.copy_(m_new)
    v.copy_(v_new)
    return torch.stack([gu, gg, uu])


_compiled_kernel = None


def _get_compiled_kernel():
    # Compiled lazily: importing adaptopt must not pay for (or require) a compiler.
    global _compiled_kernel
    if _compiled_kernel is None:
        _compiled_kernel = torch.compile(_adaptopt_kernel, dynamic=True, fullgraph=True)
    return _compiled_kernel


def adaptopt_compiled(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    scalars: list[TensorScalars],
    *,
    beta2: float,
    eps: float,
    want_stats: bool,
) -> Tensor | None:
    if not params:
        return None
    kernel = _get_compiled_kernel()
    stats = _zero_stats(params[0].device)
    # Views as 1-D so that one dynamic-shape kernel serves every parameter shape (and ZeRO's flat shards).
    for p, g, m, v, s in zip(params, grads, exp_avgs, exp_avg_sqs, scalars):
        dev, dt = p.device, p.dtype
        t = lambda x: torch.tensor(x, dtype=dt, device=dev)  # noqa: E731
        stats += kernel(
            p.view(-1), g.reshape(-1), m.view(-1), v.view(-1),
            t(s.step_size), t(s.decay), t(s.beta1), t(beta2), t(eps),
            t(s.bias_correction2_sqrt), t(s.bias_correction1_prev), t(s.bias_correction2_prev_sqrt),
        )
    return stats if want_stats else None


def bias_correction2_sqrt(beta2: float, step: float) -> float:
    """sqrt(1 - beta2^step), computed as torch.optim.AdamW does (``** 0.5``) so results match bit for bit."""
    return (1 - beta2**step) ** 0.5 if step > 0 else 1.0
