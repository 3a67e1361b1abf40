"""The AdaptOpt update, as functions over lists of tensors.

One math, three implementations of the same signature:

- ``adaptopt_single_tensor``: a for-loop over tensors, written like ``torch.optim.AdamW``'s single-tensor
  path (same operation order, so with the adaptive parts off it is bit-identical to AdamW in float64);
- ``adaptopt_foreach``: the same arithmetic with ``torch._foreach_*`` (fewer kernel launches);
- ``adaptopt_compiled``: one ``torch.compile``-d kernel, called on 8 tensors at a time. Without statistics
  its loop per tensor reads p, g, m, v once and writes p, m, v once (7 tensors: the memory-bandwidth floor
  of an Adam step). With them, inductor's C++ backend (torch 2.13) gives each tensor two loops: the sums'
  (reading g, m, v, and p, x0 for Mechanic) and then the update's, because it does not fuse a reduction
  with a later loop that overwrites the reduction's inputs (TORCH_LOGS=output_code). The one-pass update on
  the CPU is the native one (native_update.py). Small tensors are concatenated into one first (see
  ``_SMALL_NUMEL``).

Every function updates ``params``, ``exp_avgs``, ``exp_avg_sqs`` in place and returns a float64 tensor of
sums over the tensors given (None when it has none to return):

- when ``want_stats``: ``[g·u, g·g, u·u]``, where ``u = m̂_{t-1} / (sqrt(v̂_{t-1}) + eps)`` is the direction
  of the *previous* update recomputed from the moments before they are overwritten (so no extra state
  buffer is needed). The caller turns them into cos(g_t, u_{t-1}) after reducing them over shards;
- when ``x0s`` (the reference points of the Mechanic scale, ``mechanic.py``) are given, then:
  ``[g·d, x·d, x·x, g·g]`` with ``d = x - x0`` taken before the update, and the update also stretches the
  displacement: ``x <- x + scale_shift * (x - x0)`` on top of the AdamW step.

Per-tensor scalars come precomputed from the caller in ``TensorScalars`` because tensors can be at
different step counts (a parameter that got no gradient for a while).
"""
from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass
from typing import Callable

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
    # Mechanic: x - x0 is multiplied by 1 + scale_shift = s_t / s_{t-1} (0.0 when the scale did not move)
    scale_shift: float = 0.0


def _zero_stats(device, n: int = 3) -> Tensor:
    return torch.zeros(n, dtype=torch.float64, device=device)


def _join(stats: Tensor | None, distance: Tensor | None) -> Tensor | None:
    """The sums a function returns: the cosine's, then the distance's, whichever were asked for."""
    present = [t for t in (stats, distance) if t is not None]
    return torch.cat(present) if present else None


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
    x0s: list[Tensor] | None = None,
) -> Tensor | None:
    stats = _zero_stats(params[0].device) if (want_stats and params) else None
    distance = _zero_stats(params[0].device, 4) if (x0s is not None and params) else None
    for i, (p, g, m, v, s) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs, scalars)):
        if stats is not None:
            # u_{t-1} from the moments as they were after step t-1.
            u = (m / s.bias_correction1_prev) / (v.sqrt() / s.bias_correction2_prev_sqrt + eps)
            stats += torch.stack([(g * u).sum(), (g * g).sum(), (u * u).sum()]).to(torch.float64)
        if distance is not None:
            d = p - x0s[i]
            distance += torch.stack([(g * d).sum(), (p * d).sum(), (p * p).sum(), (g * g).sum()]).to(torch.float64)
        p.mul_(s.decay)
        if distance is not None and s.scale_shift != 0.0:
            p.add_(d, alpha=s.scale_shift)
        m.lerp_(g, 1 - s.beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        denom = (v.sqrt() / s.bias_correction2_sqrt).add_(eps)
        p.addcdiv_(m, denom, value=-s.step_size)
    return _join(stats, distance)


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
    x0s: list[Tensor] | None = None,
) -> Tensor | None:
    if not params:
        return None
    stats = distance = None
    if x0s is not None:
        d = torch._foreach_sub(params, x0s)
        gd = torch.stack([x.sum() for x in torch._foreach_mul(grads, d)]).to(torch.float64).sum()
        pd = torch.stack([x.sum() for x in torch._foreach_mul(params, d)]).to(torch.float64).sum()
        pp = torch.stack(torch._foreach_norm(params)).to(torch.float64).square().sum()
        gg = torch.stack(torch._foreach_norm(grads)).to(torch.float64).square().sum()
        distance = torch.stack([gd, pd, pp, gg])
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
    if x0s is not None and any(s.scale_shift != 0.0 for s in scalars):
        torch._foreach_add_(params, torch._foreach_mul(d, [s.scale_shift for s in scalars]))
    # m <- m + (1 - beta1) (g - m): lerp with per-tensor weights.
    for beta1, idx in _indices_by_value([s.beta1 for s in scalars]).items():
        torch._foreach_lerp_([exp_avgs[i] for i in idx], [grads[i] for i in idx], 1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denom, [s.bias_correction2_sqrt for s in scalars])
    torch._foreach_add_(denom, eps)
    torch._foreach_addcdiv_(params, exp_avgs, denom, [-s.step_size for s in scalars])
    return _join(stats, distance)


def _indices_by_value(values: list[float]) -> dict[float, list[int]]:
    """Groups tensor indices that share a value (almost always one group: every tensor at one step)."""
    out: dict[float, list[int]] = {}
    for i, value in enumerate(values):
        out.setdefault(value, []).append(i)
    return out


# The scalars of a tensor's update, one row per tensor, in the order the compiled kernels unpack them. A
# tensor rather than Python floats, so new values every step reuse the compiled code. Divisions by a
# scalar are stored as their reciprocal (computed here in float64) so that the loop multiplies instead:
# on CPU, sqrt and division share one slow unit, which bounds this update once memory is fast enough.
def _pack_scalars(rows: list[TensorScalars], beta2: float, eps: float, like: Tensor,
                  grad_scale: float = 1.0) -> Tensor:
    values = [
        [s.step_size, s.decay, 1 - s.beta1, beta2, 1 - beta2, eps,
         1 / s.bias_correction2_sqrt, 1 / s.bias_correction1_prev, 1 / s.bias_correction2_prev_sqrt,
         grad_scale, s.scale_shift]
        for s in rows
    ]
    return torch.tensor(values, dtype=like.dtype, device=like.device)


def _update(p, g, m, v, x0, scalars, want_stats: bool) -> list[Tensor]:
    """One tensor's update in place, from its row of ``_pack_scalars``; returns its sums (see the module
    docstring): the cosine's when ``want_stats``, the distance's when ``x0`` is given.

    The gradient is multiplied by ``grad_scale`` (the clipping factor, 1.0 when not clipping) on the way
    in, so clipping costs no pass of its own and ``g`` itself is left as it was.

    With ``want_stats``, u = m̂_{t-1} / (sqrt(v̂_{t-1}) + eps) is read from the moments before they are
    overwritten. Its denominator d_prev and the update's d share one division, r = 1 / (d_prev d), so the
    loop does 2 sqrt + 1 div per element instead of 2 + 2 (~5% faster on one CPU thread). d_prev d can only
    overflow (r = 0) when g^2 itself overflows, where v is inf anyway.

    The sums accumulate in the parameters' precision but at least float32: inductor's CPU code sums
    float32 by cascade (pairwise over chunks of 4096), so the relative error stays ~1e-6 even over 10^8
    elements, far below what the adaptive rules need, while float64 accumulators made the update ~40%
    slower on one CPU thread. The caller adds the per-tensor sums in float64.
    """
    (step_size, decay, one_minus_beta1, beta2, one_minus_beta2, eps,
     inv_bc2_sqrt, inv_bc1_prev, inv_bc2_prev_sqrt, grad_scale, scale_shift) = scalars.unbind()
    g = g * grad_scale  # the clipped gradient: the update and the statistics both use it
    acc = torch.promote_types(g.dtype, torch.float32)
    m_new = m + (g - m) * one_minus_beta1
    v_new = v * beta2 + g * g * one_minus_beta2
    sums = []
    gg = None
    if want_stats:
        d_prev = v.sqrt() * inv_bc2_prev_sqrt + eps
        d = v_new.sqrt() * inv_bc2_sqrt + eps
        r = 1 / (d_prev * d)
        u = m * inv_bc1_prev * (d * r)
        gg = (g * g).sum(dtype=acc)
        sums += [(g * u).sum(dtype=acc), gg, (u * u).sum(dtype=acc)]
        p_new = p * decay - step_size * m_new * (d_prev * r)
    else:
        p_new = p * decay - step_size * m_new / (v_new.sqrt() * inv_bc2_sqrt + eps)
    if x0 is not None:
        delta = p - x0  # before the update: x_t - x0
        sums += [(g * delta).sum(dtype=acc), (p * delta).sum(dtype=acc), (p * p).sum(dtype=acc),
                 gg if gg is not None else (g * g).sum(dtype=acc)]  # one reduction of g.g serves both
        p_new = p_new + scale_shift * delta
    p.copy_(p_new)
    m.copy_(m_new)
    v.copy_(v_new)
    return sums


def _make_kernel(want_stats: bool, want_distance: bool) -> Callable:
    def kernel(params, grads, exp_avgs, exp_avg_sqs, x0s, scalars) -> list[Tensor]:
        """The sums of each tensor, one tensor after the other, as a flat list (fewer graph nodes than a
        stacked tensor; see _CHUNK). Per tensor the update is one loop that reads p, g, m, v (and x0) once
        and writes p, m, v once; the sums, when asked for, a loop of their own before it on the CPU (see
        the module docstring; TORCH_LOGS=output_code shows both)."""
        sums = []
        for i in range(len(params)):
            sums += _update(params[i], grads[i], exp_avgs[i], exp_avg_sqs[i], x0s[i] if want_distance else None,
                            scalars[i], want_stats)
        return sums

    return kernel


# Every compiled call updates exactly this many tensors (shorter lists are padded with dummies, below). Fewer
# calls save Python and dispatch overhead (tens of us a call, more than updating a 384-element tensor
# costs), but with more tensors a call inductor fuses less of each tensor's work: its scheduler does not
# fuse nodes that lie more than 64 apart in the graph, and the copies into p, m, v all sit at the graph's
# end, after every tensor's sums.
_CHUNK = 8

# Tensors of at most this many elements (biases, LayerNorm weights) are updated together: their p, g, m, v
# are concatenated into one flat tensor per step (padded to _DUMMY_NUMEL elements if shorter), updated by
# the same kernel, and p, m, v copied back. Each tensor given to the kernel costs a loop of its own
# (~25 us on one CPU thread whatever its size), while concatenating and copying back 16k elements costs
# about as much, so below this size gathering wins.
_SMALL_NUMEL = 16384

# The size of the dummy tensors that pad a call to _CHUNK tensors, and the least size of a concatenation of
# small tensors. Above 4096 because inductor's CPU code sums tensors of more than 4096 elements by cascade
# and guards on that, so a tensor at or below it would compile a second graph.
_DUMMY_NUMEL = 4097

# What p, g, m, v, x0 of a dummy tensor or of a concatenation's padding hold: zeros, and v = 1 so that every
# term of their update and sums is 0 in any dtype (v = 0 gives 0 * inf in float16, where eps rounds to 0).
_PAD_FILLS = (0.0, 0.0, 0.0, 1.0, 0.0)

_compiled_kernels: dict[tuple[bool, bool], Callable] = {}
_dummies: dict[tuple, list[tuple[Tensor, ...]]] = {}


def _get_compiled_kernel(want_stats: bool, want_distance: bool) -> Callable:
    # Compiled lazily: importing adaptopt must not pay for (or require) a compiler. Dynamic shapes with one
    # size symbol per tensor, and always _CHUNK tensors a call: one graph serves every model, ZeRO's flat
    # shards included. It compiles once, on the first call (the recipes make that call in their check that
    # the compiler works, compiled_update_unavailable): all-MiniLM-L6-v2's first step took 5 s on one
    # CPU thread with inductor's disk cache warm, against 12-13 s for the 8 graphs (one per chunk length
    # and size class) before. Other dtypes and devices add graphs; dynamo's default recompile limit (8)
    # would make fullgraph=True raise past that, hence the higher limit.
    # cpp.dynamic_threads (CPU code only): without it inductor decides serial vs parallel loops from the
    # sizes of the first call, so a graph first compiled for 384-element tensors would also run the
    # 590k-element ones on one thread (measured on all-MiniLM-L6-v2 with 2 threads: the AdamW-only kernel
    # took 25.2 ms instead of 17.8).
    # realize_reads_threshold: inductor stores a pointwise value read by more than this many consumers in a
    # buffer of its own. The Mechanic kernel's extra sums push a value of the update over the default (4), and
    # the new p then went through a temporary and a second loop (two more passes over memory: 2.0x the step
    # time of the kernel without them, measured). Every consumer of those values is in the update's one loop,
    # where they share the value anyway.
    key = (want_stats, want_distance)
    if key not in _compiled_kernels:
        options = dict(dynamic=True, fullgraph=True, options={"cpp.dynamic_threads": True, "realize_reads_threshold": 64})
        if "recompile_limit" in inspect.signature(torch.compile).parameters:
            options["recompile_limit"] = 64
        _compiled_kernels[key] = torch.compile(_make_kernel(want_stats, want_distance), **options)
    return _compiled_kernels[key]


def _dummy_slots(dtype: torch.dtype, device: torch.device) -> list[tuple[Tensor, ...]]:
    """_CHUNK - 1 sets of (p, g, m, v, x0) (filled as _PAD_FILLS) that fill the empty places of a call.
    Distinct tensors (dynamo compiles another graph when one tensor appears twice in a call). The kernel
    writes them; their sums are dropped."""
    key = (dtype, device)
    if key not in _dummies:
        _dummies[key] = [tuple(torch.full((_DUMMY_NUMEL,), fill, dtype=dtype, device=device) for fill in _PAD_FILLS)
                         for _ in range(_CHUNK - 1)]
    return _dummies[key]


def _flat(t: Tensor, written: bool = True) -> Tensor:
    """``t`` as a 1-D tensor on the same memory, and not a view: dynamo guards on the shape of a view's
    base, which would compile a graph for each shape of parameter (2-D weights, 1-D biases, ...). A tensor
    the kernel writes must be contiguous (``view`` raises otherwise, rather than updating a copy); a
    gradient, only read, may be copied."""
    return (t.view(-1) if written else t.reshape(-1)).detach()


def _no_duck_sizing():
    """Dynamo gives tensors of equal size one size symbol when it compiles ("duck sizing") and then guards
    that they stay equal, so a first call on 8 equal-size tensors would compile a graph that the next call,
    with other sizes, cannot use. With this off every tensor gets its own symbol and one graph serves all."""
    try:
        from torch.fx.experimental import _config
        return _config.patch(use_duck_shape=False)
    except (ImportError, AttributeError):  # a torch without this switch: more graphs, same results
        return contextlib.nullcontext()


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
    x0s: list[Tensor] | None = None,
    grad_scale: float = 1.0,
) -> Tensor | None:
    """The compiled path. ``grad_scale`` multiplies every gradient inside the kernel (AdaptOpt passes
    the clipping factor): the update and the sums use ``grads * grad_scale``, and ``grads`` are not
    modified."""
    if not params:
        return None
    want_distance = x0s is not None
    kernel = _get_compiled_kernel(want_stats, want_distance)
    per_tensor = 3 * want_stats + 4 * want_distance  # sums each tensor returns
    n_in = 5 if want_distance else 4  # tensors per item: p, g, m, v (, x0)
    # Flat (p, g, m, v, x0, scalars) items for the kernel, by dtype and device: the large tensors as they are,
    # the small ones concatenated per set of scalars (almost always one: every tensor at the same step).
    items: dict[tuple, list[tuple]] = {}
    small: dict[tuple, list[int]] = {}
    for i, p in enumerate(params):
        if p.numel() <= _SMALL_NUMEL:
            small.setdefault((scalars[i], p.dtype, p.device), []).append(i)
        else:
            tensors = (_flat(p), _flat(grads[i], written=False), _flat(exp_avgs[i]), _flat(exp_avg_sqs[i]))
            if want_distance:
                tensors += (_flat(x0s[i], written=False),)
            items.setdefault((p.dtype, p.device), []).append((*tensors, scalars[i]))
    gathered = []
    sources = (params, grads, exp_avgs, exp_avg_sqs, x0s)[:n_in]
    for (row, dtype, device), idx in small.items():
        # Padded to _DUMMY_NUMEL elements if shorter, so that it runs in the same graph.
        pad = max(0, _DUMMY_NUMEL - sum(params[i].numel() for i in idx))
        flat = [torch.cat([t[i].reshape(-1) for i in idx]
                          + ([torch.full((pad,), fill, dtype=dtype, device=device)] if pad else []))
                for t, fill in zip(sources, _PAD_FILLS)]
        items.setdefault((dtype, device), []).append((*flat, row))
        gathered.append((idx, flat))

    sums = []
    packed: dict[tuple, Tensor] = {}  # calls whose tensors are at the same steps share (nearly always all)
    for (dtype, device), todo in items.items():
        dummies = _dummy_slots(dtype, device)
        for start in range(0, len(todo), _CHUNK):
            chunk = todo[start:start + _CHUNK]
            real = len(chunk)
            rows = tuple(item[n_in] for item in chunk) + (chunk[0][n_in],) * (_CHUNK - real)
            chunk = [item[:n_in] for item in chunk] + [d[:n_in] for d in dummies[:_CHUNK - real]]
            if rows not in packed:
                packed[rows] = _pack_scalars(list(rows), beta2, eps, chunk[0][0], grad_scale)
            columns = [list(ts) for ts in zip(*chunk)] + ([] if want_distance else [[]])  # x0s: [] unused
            with _no_duck_sizing():
                out = kernel(*columns, packed[rows])
            sums += out[:per_tensor * real]

    for idx, (flat_p, _, flat_m, flat_v, *_) in gathered:
        sizes = [params[i].numel() for i in idx]
        for tensors, flat in ((params, flat_p), (exp_avgs, flat_m), (exp_avg_sqs, flat_v)):
            torch._foreach_copy_([tensors[i].view(-1) for i in idx], list(flat[:sum(sizes)].split(sizes)))
    if not per_tensor:
        return None
    return torch.stack(sums).view(-1, per_tensor).to(torch.float64).sum(0)


def compiled_update_unavailable(device: torch.device | str = "cpu") -> str | None:
    """None if the compiled path runs on ``device``; otherwise why not (e.g. no C++ compiler for
    inductor's CPU code, no Triton for CUDA), so a caller can fall back to the eager path and say why.

    It runs the real kernel once, on float32 tensors of the size class a model's update uses (above
    ``_SMALL_NUMEL`` elements), so its compilation is not wasted: the training step that follows reuses
    the graph (for float32 parameters with AdaptOpt's defaults: the cosine's and the distance's sums)."""
    try:
        numel = _SMALL_NUMEL + 1
        tensors = [torch.zeros(numel, device=device) for _ in range(4)]
        grad = torch.ones(numel, device=device)
        scalars = TensorScalars(step_size=1e-3, decay=1.0, beta1=0.9, bias_correction2_sqrt=0.1,
                                bias_correction1_prev=1.0, bias_correction2_prev_sqrt=1.0)
        with torch.no_grad():  # as in optimizer.step(): grad mode is part of what the compiled graph guards on
            adaptopt_compiled([tensors[0]], [grad], [tensors[1]], [tensors[2]], [scalars],
                              beta2=0.999, eps=1e-8, want_stats=True, x0s=[tensors[3]])
        if not torch.isfinite(tensors[0]).all() or float(tensors[0][0]) >= 0:  # it must have stepped downhill
            return "the compiled update ran but produced a wrong result"
    except Exception as err:  # any failure of the toolchain: the reason goes into the caller's warning
        return f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
    return None


def bias_correction2_sqrt(beta2: float, step: float) -> float:
    """sqrt(1 - beta2^step), computed as torch.optim.AdamW does (``** 0.5``) so results match bit for bit."""
    return (1 - beta2**step) ** 0.5 if step > 0 else 1.0
