"""The native CPU kernel (adaptopt/native_update.cpp) in float32, where its vector lanes run: every vector width
this CPU has, held to the float64 single-tensor path step by step (tests/test_optim.py holds its float64
instantiation to the float64 reference through AdaptOpt)."""
import os

import pytest
import torch

from adaptopt import AdaptOpt
from adaptopt.functional import TensorScalars, adaptopt_single_tensor
from adaptopt.native_update import (SIMD_LEVELS, adaptopt_native, cpu_simd_level, load, native_update_unavailable,
                                    remove_stale_lock)

# Every width up to this CPU's: a forced narrower one (AVX2 on an AVX-512 machine) is the path AVX2-only
# machines run. Each width is a build of its own (about a minute, then cached).
WIDTHS = SIMD_LEVELS[SIMD_LEVELS.index(cpu_simd_level()):]
# Sizes around the vector widths and the kernel's 4096-element blocks: tails of every length, one block,
# several blocks (threads split those).
SIZES = [1, 7, 16, 33, 4095, 4096, 4097, 3 * 4096 + 5, 100_003]
FLAGS = [(True, True), (True, False), (False, True), (False, False)]  # (want_stats, x0 given)


def _scalars(t: int, shift: float) -> TensorScalars:
    beta1 = 0.9 + 0.01 * (t % 3)  # as adaptive momentum moves it
    prod_prev, prod = 0.9 ** (t - 1), 0.9 ** (t - 1) * beta1
    return TensorScalars(step_size=1e-2 / (1 - prod), decay=1 - 1e-2 * 0.1, beta1=beta1,
                         bias_correction2_sqrt=(1 - 0.99**t) ** 0.5,
                         bias_correction1_prev=1 - prod_prev if t > 1 else 1.0,
                         bias_correction2_prev_sqrt=(1 - 0.99 ** (t - 1)) ** 0.5 if t > 1 else 1.0,
                         scale_shift=shift)


@pytest.mark.parametrize("simd", [w for w in WIDTHS if w != "scalar"] or ["scalar"])
@pytest.mark.parametrize("want_stats,with_x0", FLAGS, ids=["stats+x0", "stats", "x0", "adamw"])
def test_float32_lanes_match_float64_single_tensor(simd, want_stats, with_x0):
    gen = torch.Generator().manual_seed(0)
    # Values drawn in float32, so that both runs start from (and are given) the same numbers.
    p32 = [torch.randn(n, generator=gen) for n in SIZES]
    x032 = [p + 0.1 * torch.randn(p.shape, generator=gen) for p in p32]
    state32 = [[torch.zeros_like(p) for p in p32] for _ in range(2)]
    p64, x064 = [p.double() for p in p32], [x.double() for x in x032]
    state64 = [[t.double() for t in ts] for ts in state32]
    for t in range(1, 21):
        g64 = [(torch.randn(p.shape, generator=gen) + (p - 1)).double() for p in p32]
        grad_scale = 0.5 if t % 2 else 1.0  # clipping on every other step
        scalars = [_scalars(t, shift=0.02 * (-1) ** t if t > 1 else 0.0)] * len(SIZES)
        expected = adaptopt_single_tensor(p64, [g * grad_scale for g in g64], *state64, scalars, beta2=0.99,
                                          eps=1e-8, want_stats=want_stats, x0s=x064 if with_x0 else None)
        got = adaptopt_native(p32, [g.float() for g in g64], *state32, scalars, beta2=0.99, eps=1e-8,
                              want_stats=want_stats, x0s=x032 if with_x0 else None, grad_scale=grad_scale, simd=simd)
        if expected is None:
            assert got is None
        else:
            torch.testing.assert_close(got, expected, rtol=2e-5, atol=1e-6)
        # Round the float64 run to the float32 one's values, so that errors do not compound over the steps.
        for ours, theirs in zip([p32, *state32], [p64, *state64]):
            for a, b in zip(ours, theirs):
                torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-7)
                b.copy_(a)
    assert load(simd).simd() == simd


def test_sums_do_not_depend_on_the_thread_count():
    gen = torch.Generator().manual_seed(1)
    init = torch.randn(300_000, generator=gen)
    grad = torch.randn(300_000, generator=gen)
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            p, m, v, x0 = init.clone(), torch.full_like(init, 0.1), torch.full_like(init, 0.2), init - 0.5
            sums = adaptopt_native([p], [grad], [m], [v], [_scalars(3, 0.1)], beta2=0.99, eps=1e-8,
                                   want_stats=True, x0s=[x0])
            results.append((sums, p))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


@pytest.mark.parametrize("clip", [None, 0.5])
def test_strided_tensors_take_the_single_tensor_loop(clip):
    """A non-contiguous parameter (a transposed one) goes to the single-tensor loop in the same step, with the
    clipped gradient: the step matches the single-tensor loop on every tensor."""
    gen = torch.Generator().manual_seed(2)
    base = [torch.randn(40, 30, generator=gen, dtype=torch.float64), torch.randn(500, generator=gen, dtype=torch.float64)]
    runs = {}
    for name, impl in {"native": dict(native=True), "single": dict(foreach=False)}.items():
        params = [torch.nn.Parameter(base[0].clone().t()), torch.nn.Parameter(base[1].clone())]
        assert not params[0].is_contiguous()
        opt = AdaptOpt(params, lr=1e-2, max_grad_norm=clip, **impl)
        for _ in range(5):
            for p in params:
                p.grad = p.detach() * 2 + 1
            opt.step()
        runs[name] = params
    for a, b in zip(runs["native"], runs["single"]):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-10, atol=1e-12)


def test_the_kernel_builds_and_runs_here():
    assert native_update_unavailable() is None  # CI's machine has a C++ compiler, as DeepSpeedCPUAdam needs


def test_a_lock_left_by_a_stopped_build_is_removed_and_a_fresh_one_kept(tmp_path, monkeypatch):
    """torch's loader waits forever on a build lock; one older than any build is removed, a fresh one (another
    process building now) is kept."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    from torch.utils.cpp_extension import _get_build_directory

    lock = tmp_path.joinpath(_get_build_directory("adaptopt_native_update_test", verbose=False), "lock")
    lock.write_text("")
    assert not remove_stale_lock("adaptopt_native_update_test") and lock.exists()
    old = lock.stat().st_mtime - 3600
    os.utime(lock, (old, old))
    assert remove_stale_lock("adaptopt_native_update_test") and not lock.exists()
    assert not remove_stale_lock("adaptopt_native_update_test")  # no lock: nothing to do
