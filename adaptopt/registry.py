"""Optimizers by name, with the papers' defaults and weight-decay grouping in one place.

    opt = build_optimizer("adamw", model, lr=3e-5, max_grad_norm=1.0)

``params`` may be an ``nn.Module`` (then parameters are grouped: no weight decay for biases and
LayerNorm weights, as BERT does) or an iterable of parameters / param groups (used as given). Only
parameters with ``requires_grad`` are passed on, so with LoRA the optimizer sees only the adapters.

Clipping: every optimizer here clips through the same ``clip.GradClipper`` (AdaptOpt owns one; the
torch baselines get one attached as a step pre-hook), so ``max_grad_norm`` and ``adaptive_clip`` mean
the same thing whichever optimizer a study picks, and the clipper's state rides in the optimizer's
``state_dict``.
"""
from __future__ import annotations

import inspect
from typing import Iterable

import torch
from torch import nn

from .clip import GradClipper
from .optim import AdaptOpt
from .hparam_checks import check_betas, check_nonneg, check_positive, check_range

# name -> (constructor, the papers' defaults where they differ from the class's own). AdaptOpt owns its
# defaults (optim.py): nothing is repeated here. The learning-rate-free peers come from their own packages
# (``pip install 'adaptopt[peers]'``), imported when first used: "module:Class".
OPTIMIZERS: dict[str, tuple[type | str, dict]] = {
    "sgd": (torch.optim.SGD, dict(lr=0.01, momentum=0.0, weight_decay=0.0)),
    "momentum": (torch.optim.SGD, dict(lr=0.01, momentum=0.9, weight_decay=0.0)),
    "adagrad": (torch.optim.Adagrad, dict(lr=0.01, eps=1e-10, weight_decay=0.0)),  # torch's default lr
    "rmsprop": (torch.optim.RMSprop, dict(lr=1e-3, alpha=0.99, eps=1e-8, weight_decay=0.0)),
    "adam": (torch.optim.Adam, dict(lr=2e-5, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)),  # BERT setup
    "adamw": (torch.optim.AdamW, dict(lr=5e-5, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)),
    "adaptopt": (AdaptOpt, {}),
    # The authors' recommended settings (their READMEs): lr 1.0 (a multiplier of the estimated step size),
    # AdamW-style decoupled weight decay (0.01, as adamw here); Prodigy's safeguard_warmup because the recipes
    # warm up (without it "the method might overestimate d"). Schedule-Free replaces the schedule: its own
    # linear warmup (the recipe passes warmup_steps) and the package's default lr.
    "prodigy": ("prodigyopt:Prodigy", dict(lr=1.0, weight_decay=0.01, decouple=True, safeguard_warmup=True)),
    "dadapt_adam": ("dadaptation:DAdaptAdam", dict(lr=1.0, weight_decay=0.01, decouple=True)),
    "schedulefree_adamw": ("schedulefree:AdamWScheduleFree", dict(weight_decay=0.01)),
}

# Optimizers that replace the LR schedule and keep two iterates (train/eval): the recipe runs them with a
# constant schedule, hands them the warmup, and calls optimizer.train()/eval() around evaluation and saving.
SCHEDULE_FREE = frozenset({"schedulefree_adamw"})

# Constructor arguments that pick an implementation (or AdaptOpt's sharding hook), not the math: left out
# of the hyperparameters a run records.
IMPLEMENTATION_ARGS = frozenset({"params", "foreach", "fused", "compiled", "capturable", "differentiable",
                                 "reduce_fn"})

# Names of parameters that never get weight decay (biases, LayerNorm/RMSNorm weights).
NO_DECAY_MARKERS = ("bias", "layernorm", "layer_norm", "ln_", ".norm", "rmsnorm")


def optimizer_names() -> list[str]:
    return list(OPTIMIZERS)


def optimizer_class(name: str) -> type:
    """The class behind a registry name, importing a peer's package on first use.

    Raises ValueError naming the package to install when it is missing."""
    spec, _ = OPTIMIZERS[name.lower()]
    if not isinstance(spec, str):
        return spec
    module, attr = spec.split(":")
    try:
        import importlib

        return getattr(importlib.import_module(module), attr)
    except ImportError:
        raise ValueError(f"optimizer {name!r} comes from the {module} package, which is not installed: "
                         f"pip install 'adaptopt[peers]' (or pip install {module})") from None


def default_hyperparameters(name: str) -> dict:
    """Every hyperparameter ``build_optimizer(name, ...)`` uses where the caller sets none: the registry's
    defaults over the class's own signature defaults. The optimizer study records them with each run, so
    that a library default changed later (say AdaptOpt's ``hypergrad_rate``) cannot pass for the old one."""
    import inspect

    cls, defaults = optimizer_class(name), OPTIMIZERS[name.lower()][1]
    signature = {k: v.default for k, v in inspect.signature(cls).parameters.items()
                 if v.default is not inspect.Parameter.empty and k not in IMPLEMENTATION_ARGS}
    return {**signature, **defaults}


def run_hyperparameters(optimizer: torch.optim.Optimizer) -> dict:
    """The hyperparameters an optimizer was built with (its ``defaults``), for results.json: without the
    implementation switches and without run-time state kept in ``defaults``. Only the constructor's own
    arguments count as hyperparameters: the peers keep their estimates' state there (Prodigy's d, d_max,
    d_numerator and k, Schedule-Free's weight_sum and train_mode, ...), which at construction holds only
    starting values, and AdaptOpt its LR scale and path statistics. D-Adapt Adam stores its d0 argument
    as ``d``: recorded as d0. Clipping is not among them: the recipe's --max_grad_norm sets it (and under
    DeepSpeed the engine clips)."""
    defaults = dict(optimizer.defaults)
    arguments = inspect.signature(type(optimizer).__init__).parameters
    if "d0" in arguments and "d0" not in defaults and "d" in defaults:
        defaults["d0"] = defaults["d"]
    takes_any = any(a.kind is inspect.Parameter.VAR_KEYWORD for a in arguments.values())
    return {k: v for k, v in defaults.items()
            if k not in IMPLEMENTATION_ARGS and (takes_any or k in arguments)}


def no_weight_decay(name: str, param: nn.Parameter) -> bool:
    """True for biases and normalisation weights (1-D tensors whose name marks them as such)."""
    lowered = name.lower()
    return param.ndim <= 1 and any(marker in lowered for marker in NO_DECAY_MARKERS)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups of trainable parameters: with ``weight_decay``, and without (biases, norms)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if no_weight_decay(name, param) else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise ValueError("the model has no trainable parameters (all have requires_grad=False)")
    return groups


def _validate(name: str, hp: dict) -> None:
    if "lr" in hp:
        check_positive("lr", hp["lr"], allow_zero=True)
    if "betas" in hp:
        check_betas(hp["betas"])
    if "eps" in hp:
        check_positive("eps", hp["eps"])
    if "weight_decay" in hp:
        check_nonneg("weight_decay", hp["weight_decay"])
    if "momentum" in hp:
        check_range("momentum", hp["momentum"], 0.0, 1.0, "[0, 1)")
    if "alpha" in hp and name == "rmsprop":
        check_range("alpha", hp["alpha"], 0.0, 1.0, "[0, 1)")


_CLASS_DEFAULT = object()  # build_optimizer's max_grad_norm when not given: whatever the class does by itself


def build_optimizer(
    name: str,
    params: nn.Module | Iterable,
    *,
    max_grad_norm: float | None = _CLASS_DEFAULT,
    adaptive_clip: bool = False,
    **hyperparameters,
) -> torch.optim.Optimizer:
    """A torch optimizer by registry name, with the papers' defaults overridden by ``hyperparameters``.

    ``max_grad_norm``: the global L2 clipping threshold (None: no clipping). Not given, an optimizer clips as
    its class does when built directly: AdaptOpt at its own default (1.0), the torch baselines not at all.

    Raises ValueError naming the bad value and the valid range for unknown names, unknown
    hyperparameters and out-of-range values.
    """
    key = name.lower()
    if key not in OPTIMIZERS:
        raise ValueError(f"Unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")
    cls, defaults = optimizer_class(key), OPTIMIZERS[key][1]
    hp = {**defaults, **{k: v for k, v in hyperparameters.items() if v is not None}}
    _validate(key, hp)

    if isinstance(params, nn.Module):
        params = param_groups(params, hp.get("weight_decay", default_hyperparameters(key).get("weight_decay", 0.0)))
    else:
        params = [p for p in params if not isinstance(p, torch.Tensor) or p.requires_grad]

    if cls is AdaptOpt:  # AdaptOpt owns its clipper
        hp["adaptive_clip"] = adaptive_clip
        if max_grad_norm is not _CLASS_DEFAULT:
            hp["max_grad_norm"] = max_grad_norm
    try:
        optimizer = cls(params, **hp)
    except TypeError as err:  # an argument the class does not take
        raise ValueError(f"optimizer {name!r}: {err}; its defaults are {default_hyperparameters(key)}") from None
    if cls is AdaptOpt:
        return optimizer
    clipper = GradClipper(None if max_grad_norm is _CLASS_DEFAULT else max_grad_norm, adaptive=adaptive_clip)
    if clipper.enabled:
        clipper.attach(optimizer)
    return optimizer
