"""Optimizers by name: defaults, weight-decay grouping, errors, and that each one learns."""
import pytest
import torch
from torch import nn

from adaptopt import AdaptOpt, build_optimizer, optimizer_names, param_groups


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.dense = nn.Linear(4, 3)
        self.LayerNorm = nn.LayerNorm(3)
        self.out = nn.Linear(3, 2)

    def forward(self, x):
        return self.out(self.LayerNorm(self.dense(x)))


def test_all_seven_names_present():
    assert set(optimizer_names()) >= {"sgd", "momentum", "adagrad", "rmsprop", "adam", "adamw", "adaptopt"}


@pytest.mark.parametrize("name,cls,expected", [
    ("adamw", torch.optim.AdamW, dict(lr=5e-5, betas=(0.9, 0.999))),
    ("sgd", torch.optim.SGD, dict(lr=0.01, momentum=0.0)),
    ("momentum", torch.optim.SGD, dict(lr=0.01, momentum=0.9)),
    ("rmsprop", torch.optim.RMSprop, dict(lr=1e-3)),
    ("adam", torch.optim.Adam, dict(lr=2e-5)),
    ("adagrad", torch.optim.Adagrad, dict(lr=0.01)),
    ("adaptopt", AdaptOpt, dict(lr=1e-4, betas=(0.9, 0.999), adaptive_lr="mechanic", scale_init=0.01)),
    ("prodigy", None, dict(lr=1.0, weight_decay=0.01, safeguard_warmup=True, decouple=True)),
    ("dadapt_adam", None, dict(lr=1.0, weight_decay=0.01, decouple=True)),
    ("schedulefree_adamw", None, dict(lr=0.0025, weight_decay=0.01)),
])
def test_papers_defaults(name, cls, expected):
    opt = build_optimizer(name, Tiny())
    from adaptopt.registry import optimizer_class

    assert type(opt) is (cls or optimizer_class(name))  # the peers come from their own packages
    for key, value in expected.items():
        assert opt.param_groups[0][key] == value


def test_weight_decay_grouping_excludes_biases_and_layernorm():
    model = Tiny()
    groups = param_groups(model, 0.01)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = sorted(names[id(p)] for p in groups[0]["params"])
    plain = sorted(names[id(p)] for p in groups[1]["params"])
    assert decayed == ["dense.weight", "out.weight"] and groups[0]["weight_decay"] == 0.01
    assert plain == ["LayerNorm.bias", "LayerNorm.weight", "dense.bias", "out.bias"]
    assert groups[1]["weight_decay"] == 0.0


def test_only_trainable_parameters_reach_the_optimizer():
    model = Tiny()
    model.dense.requires_grad_(False)
    opt = build_optimizer("adaptopt", model)
    seen = {id(p) for g in opt.param_groups for p in g["params"]}
    assert id(model.dense.weight) not in seen and id(model.out.weight) in seen


@pytest.mark.parametrize("name,kwargs,match", [
    ("adamx", {}, r"Unknown optimizer 'adamx'; choose one of sgd, momentum, adagrad, rmsprop, adam, adamw, adaptopt, "
                  r"prodigy, dadapt_adam, schedulefree_adamw"),
    ("adamw", dict(lr=-1.0), r"Invalid lr: -1.0 \(must be a number >= 0\)"),
    ("adam", dict(betas=(0.9, 1.5)), r"Invalid beta parameter at index 1: 1.5 \(must be in \[0, 1\)\)"),
    ("rmsprop", dict(eps=-1e-8), r"Invalid eps: -1e-08 \(must be a number > 0\)"),
    ("momentum", dict(momentum=1.0), r"Invalid momentum: 1.0 \(must be in \[0, 1\)\)"),
    ("sgd", dict(betas=(0.9, 0.99)), r"optimizer 'sgd': .*betas"),
])
def test_errors_name_value_and_range(name, kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_optimizer(name, Tiny(), **kwargs)


@pytest.mark.parametrize("name", ["sgd", "momentum", "adagrad", "rmsprop", "adam", "adamw", "adaptopt", "prodigy",
                                  "dadapt_adam", "schedulefree_adamw"])
def test_every_optimizer_reduces_a_convex_loss(name):
    """Logistic regression on separable data: convex, so every optimizer must lower the loss."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 8, generator=gen)
    y = (x @ torch.randn(8, generator=gen) > 0).long()
    model = nn.Linear(8, 2)
    lr = {"adam": 1e-2, "adamw": 1e-2}.get(name)  # the BERT LRs are for fine-tuning; adaptopt and the peers set theirs
    opt = build_optimizer(name, model, lr=lr, max_grad_norm=1.0)
    if hasattr(opt, "train"):  # Schedule-Free steps in train mode
        opt.train()
    loss_fn = nn.CrossEntropyLoss()
    first = loss_fn(model(x), y).item()
    for _ in range(100):
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
    last = loss_fn(model(x), y).item()
    assert last < 0.8 * first, (name, first, last)


def test_default_hyperparameters_are_the_registry_over_the_class_without_implementation_switches():
    from adaptopt.registry import default_hyperparameters, run_hyperparameters

    adamw = default_hyperparameters("adamw")
    assert adamw["lr"] == 5e-5 and adamw["weight_decay"] == 0.01 and adamw["amsgrad"] is False  # registry, class
    assert not {"foreach", "fused", "compiled", "capturable", "differentiable"} & set(adamw)
    adaptopt = default_hyperparameters("AdaptOpt")  # the class's own defaults: the registry repeats none
    assert adaptopt["adaptive_lr"] == "mechanic" and adaptopt["lr"] == 1e-4 and "reduce_fn" not in adaptopt
    assert adaptopt["max_grad_norm"] == 1.0 and adaptopt["hypergrad_rate"] == 0.1
    used = run_hyperparameters(build_optimizer("adaptopt", [torch.nn.Parameter(torch.ones(2))], lr=1e-3))
    assert used["lr"] == 1e-3 and used["hypergrad_rate"] == 0.1 and "lr_scale" not in used and "compiled" not in used


@pytest.mark.parametrize("name, state, argument", [
    ("prodigy", {"d", "d_max", "d_numerator", "k"}, ("d0", 1e-5)),
    ("dadapt_adam", {"d", "k", "numerator_weighted", "layer_scale"}, ("d0", 1e-5)),
    ("schedulefree_adamw", {"k", "train_mode", "weight_sum", "lr_max", "scheduled_lr"}, ("warmup_steps", 7)),
])
def test_a_run_records_the_peers_arguments_not_their_estimates_state(name, state, argument):
    """The peers keep their estimates' state in ``defaults`` (d, k, ...): results.json records only what the
    optimizer was built with, D-Adapt's d0 (stored as d) under its argument's name."""
    from adaptopt.registry import run_hyperparameters

    key, value = argument
    optimizer = build_optimizer(name, [torch.nn.Parameter(torch.ones(2))], **{key: value})
    assert state <= set(optimizer.defaults)  # what the package keeps there today
    used = run_hyperparameters(optimizer)
    assert not state & set(used) and used[key] == value and used["weight_decay"] == 0.01


def test_clipping_is_the_same_whichever_way_adaptopt_is_built():
    """AdaptOpt(params) and build_optimizer("adaptopt", ...) clip at the class's default (1.0); a baseline built
    by name does not clip unless asked, as the torch class would not."""
    model = Tiny()
    assert AdaptOpt(model.parameters()).grad_clipper.max_norm == 1.0
    assert build_optimizer("adaptopt", model).grad_clipper.max_norm == 1.0
    assert not build_optimizer("adaptopt", model, max_grad_norm=None).grad_clipper.enabled
    assert not hasattr(build_optimizer("adamw", model), "grad_clipper")
    assert build_optimizer("adamw", model, max_grad_norm=0.5).grad_clipper.max_norm == 0.5


def test_a_missing_peer_package_names_what_to_install(monkeypatch):
    import sys

    from adaptopt import registry

    monkeypatch.setitem(sys.modules, "prodigyopt", None)  # import prodigyopt now raises ImportError
    with pytest.raises(ValueError, match=r"comes from the prodigyopt package.*pip install 'adaptopt\[peers\]'"):
        build_optimizer("prodigy", Tiny())
    assert registry.optimizer_class("adamw") is torch.optim.AdamW
