"""AdaptOpt against torch's AdamW and against the float64 reference written from the equations."""
import copy

import pytest
import torch

from adaptopt import AdaptOpt
from adaptopt._reference import ReferenceAdaptOpt

# Mixed shapes and sizes; all below functional._SMALL_NUMEL, so the compiled path concatenates them (the
# test at the end covers its large tensors).
SHAPES = [(7, 5), (5,), (3, 4, 2), (1,), (5,), (5, 7), (1,), (5,)]
IMPLS = [dict(foreach=False), dict(foreach=True), dict(compiled=True), dict(native=True)]
IMPL_IDS = ["single_tensor", "foreach", "compiled", "native"]
# The implementations that fold the clipping factor into their kernel (p.grad stays unclipped).
IN_KERNEL = {"compiled": dict(compiled=True), "native": dict(native=True)}

ADAPTIVE = dict(
    lr=3e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1,
    adaptive_lr="hypergradient", hypergrad_rate=0.2, lr_scale_bounds=(0.25, 4.0),
    adaptive_momentum=True, momentum_rate=0.5, beta1_max=0.99, max_grad_norm=2.0,
)
# The Mechanic rule; its scale starts at scale_init = 1% of lr, far below what this problem needs, so it must grow.
MECHANIC = dict(ADAPTIVE, adaptive_lr="mechanic", scale_decay=0.01, scale_init=0.01)
RULES = {"hypergradient": ADAPTIVE, "mechanic": MECHANIC}


def make_params(seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen, dtype=dtype) for s in SHAPES]


def grad_stream(params, steps, seed=1):
    """Gradients of a fixed quadratic plus noise, so successive steps are correlated (cos != 0)."""
    gen = torch.Generator().manual_seed(seed)
    targets = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]
    for _ in range(steps):
        # Noise drawn now, so replaying an element of the stream gives the same gradient function.
        noise = [0.5 * torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]
        yield lambda ps, noise=noise: [3 * (p.detach() - t) + n for p, t, n in zip(ps, targets, noise)]


@pytest.mark.parametrize("impl", IMPLS, ids=IMPL_IDS)
def test_reduces_to_torch_adamw_for_100_steps(impl):
    init = make_params()
    ours = [p.clone().requires_grad_() for p in init]
    theirs = [p.clone().requires_grad_() for p in init]
    opt = AdaptOpt(ours, lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.05,
                   adaptive_lr=None, adaptive_momentum=False, max_grad_norm=None, **impl)
    ref = torch.optim.AdamW(theirs, lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.05, foreach=False)
    for grads_of in grad_stream(init, 100):
        grads = grads_of(theirs)
        for p, g in zip(ours, grads):
            p.grad = g.clone()
        for p, g in zip(theirs, grads):
            p.grad = g.clone()
        opt.step()
        ref.step()
    for a, b in zip(ours, theirs):
        if impl == IMPLS[0]:
            assert torch.equal(a, b)  # same operation order as torch's single-tensor AdamW
        else:
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("impl", IMPLS, ids=IMPL_IDS)
@pytest.mark.parametrize("adaptive_lr,adaptive_momentum,max_grad_norm", [
    ("mechanic", True, 2.0), ("mechanic", False, None), ("hypergradient", True, 2.0),
    ("hypergradient", False, None), (None, True, 2.0), (None, False, 0.5)])
def test_matches_float64_reference(impl, adaptive_lr, adaptive_momentum, max_grad_norm):
    hp = dict(RULES.get(adaptive_lr, ADAPTIVE), adaptive_lr=adaptive_lr, adaptive_momentum=adaptive_momentum,
              max_grad_norm=max_grad_norm)
    init = make_params()
    params = [p.clone().requires_grad_() for p in init]
    opt = AdaptOpt(params, **hp, **impl)
    ref = ReferenceAdaptOpt(init, **hp)
    for grads_of in grad_stream(init, 150):
        grads = grads_of(ref.params())
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        expected = ref.step(grads)
    for a, b in zip(params, expected):
        torch.testing.assert_close(a.detach(), b, rtol=1e-10, atol=1e-12)
    group = opt.param_groups[0]
    assert group["lr_scale"] == pytest.approx(ref.s_used, rel=1e-9)  # the scale the last step used
    if adaptive_lr == "mechanic":
        assert group["lr_scale"] > 10 * MECHANIC["scale_init"]  # it found a step far larger than its start
    elif adaptive_lr:
        assert group["lr_scale"] != 1.0  # the adaptive rule really moved the scale


@pytest.mark.parametrize("rule", RULES)
def test_stepping_sub_groups_separately_as_deepspeed_does_matches_one_step(rule):
    """DeepSpeed calls step() once per param group (ZeRO-1/2) and, under ZeRO-3, once per sub-group with
    the other groups emptied. The deferred statistics must make that identical to one step() over all
    (for Mechanic: one scale from the sums of every group)."""
    init = make_params()
    hp = dict(RULES[rule], max_grad_norm=None)  # under DeepSpeed the engine clips, before step()
    whole = [p.clone().requires_grad_() for p in init]
    split = [p.clone().requires_grad_() for p in init]
    opt_whole = AdaptOpt([{"params": whole[:5]}, {"params": whole[5:], "weight_decay": 0.0}], **hp)
    opt_split = AdaptOpt([{"params": split[:5]}, {"params": split[5:], "weight_decay": 0.0}], **hp)
    sub_groups = [(0, split[:2]), (0, split[2:5]), (1, split[5:])]  # group 0 in two sub-groups
    for grads_of in grad_stream(init, 60):
        for ps in (whole, split):
            for p, g in zip(ps, grads_of(ps)):
                p.grad = g
        opt_whole.step()
        saved = [g["params"] for g in opt_split.param_groups]
        for group_no, sub in sub_groups:
            for i, group in enumerate(opt_split.param_groups):
                group["params"] = sub if i == group_no else []
            opt_split.step()
        for group, params in zip(opt_split.param_groups, saved):
            group["params"] = params
    for a, b in zip(whole, split):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    for ga, gb in zip(opt_whole.param_groups, opt_split.param_groups):
        assert ga["lr_scale"] == pytest.approx(gb["lr_scale"], rel=1e-12) and ga["lr_scale"] != 1.0


def test_adaptive_parts_change_the_trajectory():
    """Guards the reference test against a degenerate stream where the adaptive rules do nothing."""
    init = make_params()
    runs = {}
    for name, hp in {"adaptive": ADAPTIVE, "plain": dict(ADAPTIVE, adaptive_lr=None, adaptive_momentum=False)}.items():
        params = [p.clone().requires_grad_() for p in init]
        opt = AdaptOpt(params, **hp)
        for grads_of in grad_stream(init, 50):
            for p, g in zip(params, grads_of(params)):
                p.grad = g
            opt.step()
        runs[name] = torch.cat([p.detach().reshape(-1) for p in params])
    assert (runs["adaptive"] - runs["plain"]).abs().max() > 1e-3


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("impl", IMPLS[:2], ids=IMPL_IDS[:2])
def test_state_dict_round_trip_continues_identically(impl, rule):
    init = make_params()
    hp = dict(RULES[rule], adaptive_clip=True, **impl)

    def run(params, opt, stream):
        for grads_of in stream:
            for p, g in zip(params, grads_of(params)):
                p.grad = g
            opt.step()

    stream = list(grad_stream(init, 40))
    a = [p.clone().requires_grad_() for p in init]
    opt_a = AdaptOpt(a, **hp)
    run(a, opt_a, stream[:20])
    saved_params = [p.detach().clone() for p in a]
    saved_state = copy.deepcopy(opt_a.state_dict())
    assert "grad_clipper" in saved_state  # the adaptive clipping statistics travel with the optimizer
    assert ("lr_tuner" in saved_state) == (rule == "mechanic")  # and so does Mechanic's learner
    run(a, opt_a, stream[20:])

    b = [p.clone().requires_grad_() for p in saved_params]
    opt_b = AdaptOpt(b, **hp)
    opt_b.load_state_dict(saved_state)
    run(b, opt_b, stream[20:])
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    assert opt_a.param_groups[0]["lr_scale"] == opt_b.param_groups[0]["lr_scale"]
    assert opt_a.grad_clipper.mean == opt_b.grad_clipper.mean


def test_optional_state_only_when_enabled():
    p = torch.nn.Parameter(torch.randn(4))
    p.grad = torch.randn(4)
    plain = AdaptOpt([p], adaptive_lr=None, adaptive_momentum=False)
    plain.step()
    assert set(plain.state[p]) == {"step", "exp_avg", "exp_avg_sq"} and plain.lr_tuner is None
    q = torch.nn.Parameter(torch.randn(4))
    q.grad = torch.randn(4)
    hyper = AdaptOpt([q], adaptive_lr="hypergradient", adaptive_momentum=True)
    hyper.step()
    assert set(hyper.state[q]) == {"step", "exp_avg", "exp_avg_sq", "beta1_prod"}
    r = torch.nn.Parameter(torch.randn(4))
    r.grad = torch.randn(4)
    full = AdaptOpt([r])  # the defaults: Mechanic keeps the start x0 (the one extra buffer per element)
    full.step()
    assert set(full.state[r]) == {"step", "exp_avg", "exp_avg_sq", "beta1_prod", "x0"}
    assert full.state[r]["x0"].dtype == r.dtype and full.state[r]["x0"].shape == r.shape


def test_non_finite_gradient_skips_the_step_and_keeps_parameters():
    p = torch.nn.Parameter(torch.ones(3))
    opt = AdaptOpt([p], lr=0.1, max_grad_norm=1.0)
    p.grad = torch.tensor([1.0, float("inf"), 0.0])
    opt.step()
    assert torch.equal(p.detach(), torch.ones(3))
    assert opt.state[p] == {}  # no moments were touched, no step counted
    assert opt.grad_clipper.nonfinite_steps == 1
    p.grad = torch.tensor([1.0, 1.0, 0.0])
    opt.step()
    assert float(opt.state[p]["step"]) == 1.0 and torch.isfinite(p).all()


def test_closure_and_zero_grad():
    p = torch.nn.Parameter(torch.tensor([2.0, -1.0]))
    opt = AdaptOpt([p], lr=0.1)

    def closure():
        opt.zero_grad()
        loss = (p**2).sum()
        loss.backward()
        return loss

    first = opt.step(closure)
    for _ in range(50):
        last = opt.step(closure)
    assert float(last) < float(first)
    opt.zero_grad()
    assert p.grad is None


@pytest.mark.parametrize("rule", RULES)
def test_elementwise_update_is_shape_agnostic(rule):
    """ZeRO hands the optimizer flat partitions: the same numbers in any shape give the same update."""
    init = make_params()
    shaped = [p.clone().requires_grad_() for p in init]
    flat = torch.cat([p.reshape(-1) for p in init]).clone().requires_grad_()
    opt_shaped = AdaptOpt(shaped, **RULES[rule])
    opt_flat = AdaptOpt([flat], **RULES[rule])
    for grads_of in grad_stream(init, 30):
        grads = grads_of(shaped)
        for p, g in zip(shaped, grads):
            p.grad = g
        flat.grad = torch.cat([g.reshape(-1) for g in grads])
        opt_shaped.step()
        opt_flat.step()
    torch.testing.assert_close(torch.cat([p.detach().reshape(-1) for p in shaped]), flat.detach(),
                               rtol=1e-12, atol=1e-14)


def test_a_checkpoint_that_calls_the_compiled_path_fused_loads():
    """Param groups saved while AdaptOpt's argument was named fused= (the compiled path) carry that key."""
    p = torch.nn.Parameter(torch.ones(3))
    opt = AdaptOpt([p], foreach=False)
    p.grad = torch.ones(3)
    opt.step()
    state = copy.deepcopy(opt.state_dict())
    for group in state["param_groups"]:
        group["fused"] = group.pop("compiled")
    state["param_groups"][0]["fused"] = True
    fresh = AdaptOpt([torch.nn.Parameter(torch.ones(3))], foreach=False)
    fresh.load_state_dict(state)
    assert fresh.param_groups[0]["compiled"] is True and "fused" not in fresh.param_groups[0]


@pytest.mark.parametrize("kwargs,match", [
    (dict(lr=-1e-3), r"Invalid lr: -0.001 \(must be a number >= 0\)"),
    (dict(betas=(1.2, 0.999)), r"Invalid beta parameter at index 0: 1.2 \(must be in \[0, 1\)\)"),
    (dict(betas=(0.9, 1.0)), r"Invalid beta parameter at index 1: 1.0"),
    (dict(eps=0.0), r"Invalid eps: 0.0 \(must be a number > 0\)"),
    (dict(weight_decay=-0.1), r"Invalid weight_decay: -0.1"),
    (dict(lr_scale_bounds=(2.0, 4.0)), r"Invalid lr_scale_bounds"),
    (dict(adaptive_lr=True), r"Invalid adaptive_lr: True \(must be one of \('mechanic', 'hypergradient'\) or None\)"),
    (dict(scale_decay=-1.0), r"Invalid scale_decay: -1.0"),
    (dict(scale_init=0.0), r"Invalid scale_init: 0.0 \(must be in \(0, 1\]\)"),
    (dict(max_grad_norm=0.0), r"Invalid max_grad_norm: 0.0 \(must be > 0"),
    (dict(foreach=True, compiled=True), r"exclusive"),
    (dict(compiled=True, native=True), r"compiled=True and native=True are exclusive"),
])
def test_invalid_hyperparameters_name_value_and_range(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AdaptOpt([torch.nn.Parameter(torch.zeros(1))], **kwargs)


# --- The compiled path folds the clipping factor into the compiled update (p.grad stays unclipped). ---

def _zclip_reference(norms, *, max_norm, warmup_steps=25, ema_decay=0.97, z_thresh=2.5):
    """ZClip written from docs/optimizer.md, independently of clip.py: the clipping factor of each step."""
    warmup, mean, var, factors = [], None, None, []
    for norm in norms:
        threshold = max_norm if mean is None else mean + z_thresh * var**0.5
        clipped = threshold if threshold is not None and norm > threshold else norm
        factors.append(clipped / norm)
        if mean is None:
            warmup.append(clipped)
            if len(warmup) == warmup_steps:
                mean = sum(warmup) / warmup_steps
                var = sum((x - mean) ** 2 for x in warmup) / warmup_steps
        else:
            mean = ema_decay * mean + (1 - ema_decay) * clipped
            var = ema_decay * var + (1 - ema_decay) * (clipped - mean) ** 2
    return factors


@pytest.mark.parametrize("kernel", IN_KERNEL)
@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("adaptive_clip", [False, True], ids=["fixed", "zclip"])
def test_clipping_in_kernel_matches_reference(adaptive_clip, rule, kernel):
    """compiled=True or native=True: the kernel multiplies g by the clip factor; the update and the adaptive
    rules' statistics must be those of the clipped gradient (the reference clips g before everything), for
    150 steps."""
    hp = dict(RULES[rule], max_grad_norm=8.0)  # norms fall from 45 to ~6: clipped early, then only spikes
    init = make_params()
    params = [p.clone().requires_grad_() for p in init]
    opt = AdaptOpt(params, adaptive_clip=adaptive_clip, **IN_KERNEL[kernel], **hp)
    # Without ZClip the reference clips itself; with it the test clips by the independent ZClip above.
    ref = ReferenceAdaptOpt(init, **dict(hp, max_grad_norm=None if adaptive_clip else hp["max_grad_norm"]))
    norms, clipped_steps = [], 0
    for t, grads_of in enumerate(grad_stream(init, 150)):
        grads = grads_of(ref.params())
        if t % 37 == 36:  # spikes, so that the adaptive threshold clips after its warmup
            grads = [10 * g for g in grads]
        norm = float(torch.cat([g.reshape(-1) for g in grads]).norm())
        norms.append(norm)
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        assert opt.grad_clipper.last_norm == pytest.approx(norm, rel=1e-12)  # the pre-clip norm
        for p, g in zip(params, grads):
            assert torch.equal(p.grad, g)  # p.grad keeps the unclipped gradient
        if adaptive_clip:
            factor = _zclip_reference(norms, max_norm=hp["max_grad_norm"])[-1]
            clipped_steps += factor < 1
            expected = ref.step([g * factor for g in grads])
        else:
            clipped_steps += norm > hp["max_grad_norm"]
            expected = ref.step(grads)
    assert 10 <= clipped_steps < 150  # clipping really happened, and not on every step
    # The parameters depend on every earlier step's LR scale and momentum, so on the clipped statistics.
    for a, b in zip(params, expected):
        torch.testing.assert_close(a.detach(), b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("impl", IMPLS, ids=IMPL_IDS)
def test_non_finite_gradient_mid_run_leaves_params_and_state_untouched(impl):
    init = make_params()
    params = [p.clone().requires_grad_() for p in init]
    opt = AdaptOpt(params, adaptive_clip=True, **ADAPTIVE, **impl)
    stream = grad_stream(init, 6)
    for _ in range(5):
        for p, g in zip(params, next(stream)(params)):
            p.grad = g
        opt.step()
    before_params = [p.detach().clone() for p in params]
    before_state = copy.deepcopy(opt.state_dict())
    grads = next(stream)(params)
    grads[3] = grads[3].clone().fill_(float("nan"))
    grads[0][0, 0] = float("inf")
    for p, g in zip(params, grads):
        p.grad = g
    opt.step()
    assert opt.grad_clipper.nonfinite_steps == 1
    for p, q in zip(params, before_params):
        assert torch.equal(p.detach(), q)
    after_state = opt.state_dict()
    assert after_state["param_groups"] == before_state["param_groups"]  # lr_scale, path_cos
    assert after_state["grad_clipper"] == dict(before_state["grad_clipper"], nonfinite_steps=1)
    for i, s in before_state["state"].items():
        for key, value in s.items():
            other = after_state["state"][i][key]
            assert torch.equal(other, value) if torch.is_tensor(value) else other == value


@pytest.mark.parametrize("kernel", IN_KERNEL)
@pytest.mark.parametrize("rule", RULES)
def test_compiled_path_with_large_and_small_tensors_at_different_steps_matches_single_tensor(rule, kernel):
    """The compiled path updates tensors above functional._SMALL_NUMEL elements as they are, in calls of
    _CHUNK padded with dummies, and concatenates the smaller ones. Ten large tensors (two calls, the second
    padded) and small ones; two tensors miss their gradient on some steps, so tensors sit at different step
    counts and the small ones split into several concatenations. Held to the single-tensor loop."""
    from adaptopt import functional

    big = functional._SMALL_NUMEL + 1
    shapes = [(big + 7 * i,) for i in range(9)] + [(3, big // 3 + 1)] + SHAPES
    gen = torch.Generator().manual_seed(3)
    init = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    runs = {}
    for name, impl in {"kernel": IN_KERNEL[kernel], "single": dict(foreach=False)}.items():
        params = [p.clone().requires_grad_() for p in init]
        opt = AdaptOpt(params, **RULES[rule], **impl)
        grad_gen = torch.Generator().manual_seed(4)
        for t in range(12):
            for i, p in enumerate(params):
                g = 0.5 * torch.randn(p.shape, generator=grad_gen, dtype=p.dtype) + 3 * (p.detach() - 1)
                skipped = (i == 2 and t % 3 == 1) or (i == len(shapes) - 1 and t % 4 == 2)
                p.grad = None if skipped else g
            opt.step()
        runs[name] = (params, opt.param_groups[0]["lr_scale"])
    for a, b in zip(runs["kernel"][0], runs["single"][0]):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-10, atol=1e-12)
    assert runs["kernel"][1] == pytest.approx(runs["single"][1], rel=1e-10) and runs["single"][1] != 1.0


def test_compiled_update_check_compiles_the_graph_the_first_step_reuses():
    """cli picks the compiled update after functional.compiled_update_unavailable() ran it once; that run must
    compile the very graph a float32 model's step then uses (size class, grad mode), not a throwaway one."""
    from torch._dynamo.utils import counters

    from adaptopt.functional import compiled_update_unavailable

    assert compiled_update_unavailable() is None  # CI's machine has inductor's C++ toolchain
    compiled = counters["stats"]["unique_graphs"]
    params = [torch.nn.Parameter(torch.randn(n)) for n in (40_000, 20_000, 300, 7)]
    for p in params:
        p.grad = torch.randn_like(p)
    AdaptOpt(params, compiled=True).step()
    assert counters["stats"]["unique_graphs"] == compiled
