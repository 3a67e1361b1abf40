"""AdaptOpt's update as a native, vectorised CPU kernel (``native_update.cpp``): the path for optimizer steps
that run on the host, such as DeepSpeed ZeRO-Offload's step on its flat fp32 partition.

Same signature and math as ``functional.adaptopt_compiled`` (the clipping factor folded in, the cosine's and
Mechanic's sums returned): one pass over memory per tensor, reading p, g, m, v (and x0) once and writing p, m,
v once, in AVX-512 or AVX2 for float32, threaded with torch's intra-op threads (``torch.set_num_threads``).

It is built on first use the way DeepSpeed builds its CPU Adam: ``torch.utils.cpp_extension.load`` with
CPUAdamBuilder's flags (``-O3 -march=native -fopenmp``) and a define that picks the vector width from the
CPU it runs on (DeepSpeed's ``-D__AVX512__`` / ``-D__AVX256__``). The build takes about a minute and is
cached in ``~/.cache/torch_extensions`` (``TORCH_EXTENSIONS_DIR`` moves it). Where no C++ compiler is
present, ``native_update_unavailable`` says why and the caller uses the compiled path instead.

Tensors it does not run (not on the CPU, not float32/float64) go to the compiled path; strided ones (which the
compiled path cannot update in place either) to the single-tensor loop.
"""
from __future__ import annotations

import functools
import logging
import time
from pathlib import Path

import torch
from torch import Tensor

from .functional import TensorScalars, _pack_scalars, adaptopt_compiled, adaptopt_single_tensor

logger = logging.getLogger(__name__)
# A build takes about 1.5 min on 2 cores. torch's loader waits, without a timeout or a message, for as long as a
# build's lock file exists, so a build that was killed (Ctrl-C, a job's time limit) would hang every later run.
STALE_LOCK_S = 600

SOURCE = Path(__file__).with_name("native_update.cpp")
SIMD_LEVELS = ("avx512", "avx2", "scalar")  # widest first


def cpu_simd_level() -> str:
    """The widest vector instructions of this CPU that the kernel has a path for, as ATen detects them."""
    capability = torch.backends.cpu.get_cpu_capability().lower()  # "avx512", "avx2", "default", ...
    return capability if capability in SIMD_LEVELS else "scalar"


def load(simd: str | None = None):
    """The built extension for ``simd`` (default: this CPU's level; a narrower one can be forced, e.g. to
    check the AVX2 path on an AVX-512 machine). Builds it on first use."""
    return _load(simd or cpu_simd_level())


@functools.cache  # one import of each build per process
def _load(simd: str):
    from torch.utils.cpp_extension import load as load_extension

    if simd not in SIMD_LEVELS:
        raise ValueError(f"simd={simd!r}: use one of {SIMD_LEVELS}")
    name = f"adaptopt_native_update_{simd}"
    remove_stale_lock(name)
    return load_extension(
        name=name,
        sources=[str(SOURCE)],
        extra_cflags=["-O3", "-march=native", "-fopenmp", f"-DADAPTOPT_SIMD_{simd.upper()}"],
        extra_ldflags=["-fopenmp"],
        verbose=False,
    )


def remove_stale_lock(name: str, max_age_s: float = STALE_LOCK_S) -> bool:
    """Removes the build lock of extension ``name`` when it is older than any build takes (left by a build
    that was stopped); True if it did. A younger lock is another process building: torch waits for it."""
    from torch.utils.cpp_extension import _get_build_directory  # where torch's loader puts the build and lock

    lock = Path(_get_build_directory(name, verbose=False)) / "lock"
    try:
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return False
    if age <= max_age_s:
        return False
    logger.warning(f"removing {lock}: a build of the native update stopped {age / 60:.0f} min ago left it, and "
                   "torch's loader would wait on it forever")
    lock.unlink(missing_ok=True)
    return True


def native_update_unavailable() -> str | None:
    """None if the native kernel builds and runs here; otherwise why not (no compiler, a failed build), so
    that a caller can fall back to the compiled path and say why."""
    try:
        ext = load()
        p, m, v = torch.zeros(3), torch.zeros(3), torch.zeros(3)
        row = TensorScalars(step_size=1e-3, decay=1.0, beta1=0.9, bias_correction2_sqrt=0.1,
                            bias_correction1_prev=1.0, bias_correction2_prev_sqrt=1.0)
        ext.step([p], [torch.ones(3)], [m], [v], [], _pack_scalars([row], 0.999, 1e-8, _ROWS_LIKE), False)
        if not torch.isfinite(p).all() or float(p[0]) >= 0:  # it must have stepped downhill
            return "the native update ran but produced a wrong result"
    except Exception as err:  # any failure of the toolchain: the reason goes into the caller's warning
        text = str(err).strip()
        return f"{type(err).__name__}: {text.splitlines()[0] if text else ''}"
    return None


_ROWS_LIKE = torch.empty(0, dtype=torch.float64)  # the scalars go to the kernel in float64


def _runs_natively(*tensors: Tensor | None) -> bool:
    p = tensors[0]
    return p.device.type == "cpu" and p.dtype in (torch.float32, torch.float64) and all(
        t is None or (t.is_contiguous() and t.device == p.device and t.dtype == p.dtype) for t in tensors)


def adaptopt_native(
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
    simd: str | None = None,
) -> Tensor | None:
    """The native path (see the module docstring); ``simd`` forces a vector width (default: this CPU's)."""
    if not params:
        return None
    want_distance = x0s is not None
    native, other = [], []
    for i, p in enumerate(params):
        x0 = x0s[i] if want_distance else None
        # A gradient is only read: a strided one (rare) is copied rather than sent to the compiled path.
        ok = _runs_natively(p, exp_avgs[i], exp_avg_sqs[i], x0) and grads[i].dtype == p.dtype
        (native if ok else other).append(i)
    sums = []
    if native:
        pick = lambda ts: [ts[i] for i in native]  # noqa: E731
        rows = _pack_scalars([scalars[i] for i in native], beta2, eps, _ROWS_LIKE, grad_scale)
        out = load(simd).step(
            [params[i].detach() for i in native], [grads[i].detach().contiguous() for i in native],
            pick(exp_avgs), pick(exp_avg_sqs), pick(x0s) if want_distance else [], rows, want_stats)
        sums.append(out)
    # The rest: contiguous tensors (e.g. on a GPU) on the compiled path, strided ones (which it cannot update in
    # place) on the single-tensor loop, given the clipped gradients.
    contiguous = [i for i in other if all(t[i].is_contiguous() for t in (params, exp_avgs, exp_avg_sqs))]
    strided = [i for i in other if i not in contiguous]
    for idx, impl in ((contiguous, adaptopt_compiled), (strided, adaptopt_single_tensor)):
        if not idx:
            continue
        pick = lambda ts: [ts[i] for i in idx]  # noqa: E731
        g = pick(grads)
        extra = {"grad_scale": grad_scale}
        if impl is adaptopt_single_tensor:
            g, extra = ([x * grad_scale for x in g] if grad_scale != 1.0 else g), {}
        sums.append(impl(pick(params), g, pick(exp_avgs), pick(exp_avg_sqs), pick(scalars), beta2=beta2, eps=eps,
                         want_stats=want_stats, x0s=pick(x0s) if want_distance else None, **extra))
    present = [s for s in sums if s is not None and s.numel()]
    return torch.stack(present).sum(0) if present else None
