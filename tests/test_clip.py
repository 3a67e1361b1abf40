"""Global-norm clipping: exactness, pre-clip norm, non-finite handling, the ZClip rule, hooks."""
import math

import pytest
import torch

from adaptopt import GradClipper, build_optimizer, clip_grad_norm_, global_grad_norm


def grads():
    return [torch.tensor([3.0, 0.0], dtype=torch.float64), torch.tensor([[4.0]], dtype=torch.float64)]


def test_clip_is_exactly_the_papers_rule():
    g = grads()
    norm = clip_grad_norm_(g, 1.0)
    assert norm == 5.0  # pre-clip norm, for logging
    coef = 1.0 / 5.0  # c / ||g||, then one multiplication per element
    assert torch.equal(g[0], torch.tensor([3.0 * coef, 0.0], dtype=torch.float64))
    assert torch.equal(g[1], torch.tensor([[4.0 * coef]], dtype=torch.float64))
    assert float(global_grad_norm(g)) == pytest.approx(1.0, rel=1e-15)


def test_below_threshold_is_untouched():
    g = grads()
    assert clip_grad_norm_(g, 5.0) == 5.0  # ||g|| == c: not "> c", unchanged
    assert torch.equal(g[0], grads()[0]) and torch.equal(g[1], grads()[1])


def test_non_finite_norm_is_reported_and_grads_untouched():
    g = [torch.tensor([1.0, float("nan")]), torch.tensor([2.0])]
    clipper = GradClipper(1.0)
    norm = clipper.clip_(g)
    assert math.isnan(norm) and not clipper.last_finite and clipper.nonfinite_steps == 1
    assert g[1].item() == 2.0  # not multiplied by NaN


def test_reduce_fn_receives_local_sum_of_squares():
    seen = []

    def twice(sumsq):  # pretend another shard holds an identical slice
        seen.append(float(sumsq))
        return sumsq * 2

    g = grads()
    assert clip_grad_norm_(g, 100.0, reduce_fn=twice) == pytest.approx(math.sqrt(50.0))
    assert seen == [25.0]


def test_adaptive_threshold_follows_zclip_rule():
    clipper = GradClipper(max_norm=None, adaptive=True, warmup_steps=3, ema_decay=0.5, z_thresh=2.0)
    for n in (1.0, 2.0, 3.0):  # warmup: no fixed threshold, nothing clipped
        g = [torch.tensor([n])]
        assert clipper.clip_(g) == n and g[0].item() == n
    mean, var = 2.0, 2.0 / 3.0  # population statistics of the warmup norms
    assert clipper.mean == pytest.approx(mean) and clipper.var == pytest.approx(var)
    threshold = mean + 2.0 * math.sqrt(var)
    assert clipper.threshold() == pytest.approx(threshold)
    g = [torch.tensor([10.0])]  # a spike
    assert clipper.clip_(g) == 10.0
    assert g[0].item() == pytest.approx(threshold)
    # the EMA is updated with the clipped norm, so one spike does not drag the threshold up to 10
    new_mean = 0.5 * mean + 0.5 * threshold
    assert clipper.mean == pytest.approx(new_mean)
    assert clipper.var == pytest.approx(0.5 * var + 0.5 * (threshold - new_mean) ** 2)


def test_fixed_threshold_applies_during_adaptive_warmup():
    clipper = GradClipper(max_norm=1.0, adaptive=True, warmup_steps=5)
    g = [torch.tensor([4.0])]
    clipper.clip_(g)
    assert g[0].item() == 1.0


def test_attached_clipper_clips_a_baseline_and_checkpoints_its_state():
    p = torch.nn.Parameter(torch.zeros(2))
    opt = build_optimizer("sgd", [p], lr=1.0, max_grad_norm=1.0, adaptive_clip=True)
    p.grad = torch.tensor([3.0, 4.0])
    opt.step()
    assert torch.allclose(p.detach(), torch.tensor([-0.6, -0.8]))
    assert opt.grad_clipper.last_norm == 5.0
    state = opt.state_dict()
    assert state["grad_clipper"]["warmup_norms"] == [1.0]
    q = torch.nn.Parameter(torch.zeros(2))
    opt2 = build_optimizer("sgd", [q], lr=1.0, max_grad_norm=1.0, adaptive_clip=True)
    opt2.load_state_dict(state)
    assert opt2.grad_clipper.warmup_norms == [1.0]


def test_the_engine_clipper_beside_adaptopts_own_is_restored_too():
    """Under DeepSpeed the engine's clipper is attached under the key of AdaptOpt's own (off there): the one attached
    last is saved, and a load gives the saved state to both (adaptopt/deepspeed_run.py, DeepSpeedRun.attach)."""
    from adaptopt import AdaptOpt
    from adaptopt.clip import attach_state

    def build():
        p = torch.nn.Parameter(torch.zeros(2))
        opt = AdaptOpt([p], max_grad_norm=None)  # the optimizer does not clip: the engine does
        engine_clipper = GradClipper(1.0, adaptive=True)
        attach_state(opt, engine_clipper)
        return p, opt, engine_clipper

    p, opt, engine_clipper = build()
    engine_clipper.factor_for_norm(3.0)
    p.grad = torch.ones(2)
    opt.step()
    state = opt.state_dict()
    assert state["grad_clipper"]["warmup_norms"] == [1.0]
    _, opt2, engine_clipper2 = build()
    opt2.load_state_dict(state)
    assert engine_clipper2.warmup_norms == [1.0] and opt2.grad_clipper.warmup_norms == [1.0]
    assert not opt2.grad_clipper.enabled


def test_attached_clipper_accepts_an_explicit_none_closure():
    """accelerate's AcceleratedOptimizer calls optimizer.step(None): that is not a closure."""
    p = torch.nn.Parameter(torch.zeros(2))
    opt = build_optimizer("sgd", [p], lr=1.0, max_grad_norm=1.0)
    p.grad = torch.tensor([3.0, 4.0])
    opt.step(None)
    assert torch.allclose(p.detach(), torch.tensor([-0.6, -0.8]))


def test_attached_clipper_refuses_closures():
    p = torch.nn.Parameter(torch.zeros(2))
    opt = build_optimizer("adamw", [p], max_grad_norm=1.0)
    with pytest.raises(RuntimeError, match="without a closure"):
        opt.step(lambda: 0.0)


@pytest.mark.parametrize("kwargs,match", [
    (dict(max_norm=-1.0), r"Invalid max_grad_norm: -1.0"),
    (dict(ema_decay=1.0), r"Invalid ema_decay: 1.0 \(must be in \[0, 1\)\)"),
    (dict(z_thresh=0), r"Invalid z_thresh"),
])
def test_clipper_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GradClipper(**kwargs)


def test_clip_factor_returns_the_factor_without_touching_the_grads():
    clipper, twin = GradClipper(1.0, adaptive=True, warmup_steps=2), GradClipper(1.0, adaptive=True, warmup_steps=2)
    for scale in (4.0, 0.5, 3.0, 10.0):  # warmup (fixed c), then the adaptive threshold
        g = [x * scale for x in grads()]
        before = [x.clone() for x in g]
        factor = clipper.clip_factor(g)
        assert all(torch.equal(a, b) for a, b in zip(g, before))  # not applied
        norm = 5.0 * scale
        assert clipper.last_norm == norm and clipper.last_finite
        threshold = clipper.last_threshold
        assert factor == (threshold / norm if norm > threshold else 1.0)
        twin.clip_(before)  # clip_ is clip_factor applied in place: same state, same clipped grads
        assert all(torch.equal(a * factor, b) for a, b in zip(g, before))
        assert (twin.mean, twin.var, twin.warmup_norms) == (clipper.mean, clipper.var, clipper.warmup_norms)


def test_clip_factor_on_non_finite_norm_is_nan_and_counts():
    clipper = GradClipper(1.0, adaptive=True)
    factor = clipper.clip_factor([torch.tensor([1.0, float("inf")])])
    assert math.isnan(factor) and not clipper.last_finite and clipper.nonfinite_steps == 1
    assert clipper.warmup_norms == []  # a skipped step does not feed the ZClip statistics
