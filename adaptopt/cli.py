"""Command-line options every recipe shares: optimizer, LR schedule, clipping, training length,
checkpoints, tracking and LoRA, and the builders that turn them into objects.

One definition here means glue.py, squad.py and clm.py spell and default every setting the same way.
"""
from __future__ import annotations

import argparse
import ast
import inspect
import logging
import math
import os

from .launch import exit_with
from .optim import ADAPTIVE_LR_RULES
from .registry import (IMPLEMENTATION_ARGS, SCHEDULE_FREE, OPTIMIZERS, build_optimizer, default_hyperparameters,
                       optimizer_class)
from .schedules import SCHEDULES, Plateau, build_scheduler

logger = logging.getLogger(__name__)

# The optimizer hyperparameter each shared flag sets (optimizer_from_args). The optimizer study uses it to tell a
# library default a run overrode by a flag from one it ran with (adaptopt/study/runner.py, same_run).
FLAG_HYPERPARAMETERS = {
    "learning_rate": "lr", "weight_decay": "weight_decay", "beta1": "betas", "beta2": "betas", "eps": "eps",
    "momentum": "momentum", "adaptive_lr": "adaptive_lr", "scale_decay": "scale_decay", "scale_init": "scale_init",
    "hypergrad_rate": "hypergrad_rate", "no_adaptive_momentum": "adaptive_momentum", "momentum_rate": "momentum_rate",
    "max_grad_norm": "max_grad_norm", "adaptive_clip": "adaptive_clip",
}

# The optimizers that --beta1/--beta2 and --momentum apply to.
BETAS_FLAG_OPTIMIZERS = ("adam", "adamw", "adaptopt")
MOMENTUM_FLAG_OPTIMIZERS = ("sgd", "momentum")


def parse_optimizer_args(items: list[str] | None) -> dict:
    """--optimizer_args KEY=VALUE ... as a dict. A value is read as a Python literal (1e-5, 0.5, (0.9, 0.99),
    True; JSON's true/false/null too), else kept as the string."""
    out = {}
    for item in items or []:
        key, sep, text = item.partition("=")
        if not sep or not key.isidentifier():
            raise ValueError(f"--optimizer_args takes KEY=VALUE pairs (got {item!r}), e.g. use_bias_correction=true")
        text = {"true": "True", "false": "False", "null": "None", "none": "None"}.get(text.lower(), text)
        try:
            out[key] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            out[key] = text
    return out


def flag_hyperparameters(argv: list[str]) -> set[str]:
    """The optimizer hyperparameters a recipe command line sets by flags, --optimizer_args' keys included (the
    study uses it to tell a library default a run overrode from one it ran with)."""
    keys, in_optimizer_args = set(), False
    for arg in argv:
        if arg.startswith("--"):
            in_optimizer_args = arg == "--optimizer_args"
            if arg[2:] in FLAG_HYPERPARAMETERS:
                keys.add(FLAG_HYPERPARAMETERS[arg[2:]])
        elif in_optimizer_args:
            keys.add(arg.partition("=")[0])
    return keys


def add_optimization_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("optimizer")
    g.add_argument("--optimizer", default="adaptopt", choices=list(OPTIMIZERS), help="optimizer by registry name")
    g.add_argument("--learning_rate", type=float, default=None,
                   help="peak learning rate (default: the optimizer's, e.g. 5e-5 adamw). adaptopt with its default "
                        "--adaptive_lr mechanic: the units of its learned scale, which starts at 1%% of it and finds "
                        "the level (default 1e-4: a start of 1e-6)")
    g.add_argument("--weight_decay", type=float, default=None, help="(decoupled for adamw/adaptopt) weight decay")
    g.add_argument("--beta1", type=float, default=None, help="Adam b1 (adam, adamw, adaptopt)")
    g.add_argument("--beta2", type=float, default=None, help="Adam b2 (adam, adamw, adaptopt)")
    g.add_argument("--eps", type=float, default=None, help="denominator epsilon")
    g.add_argument("--momentum", type=float, default=None, help="SGD momentum (sgd, momentum)")
    g.add_argument("--adaptive_lr", choices=[*ADAPTIVE_LR_RULES, "none"], default=None,
                   help="adaptopt: how the LR scale adapts. mechanic (default): learned scale of the whole path, finds "
                        "its level from the starting --learning_rate; hypergradient: per-step nudge of a given LR; none")
    g.add_argument("--scale_decay", type=float, default=None, help="adaptopt, mechanic: decay of the learned scale")
    g.add_argument("--scale_init", type=float, default=None,
                   help="adaptopt, mechanic: the learned scale's start, as a fraction of --learning_rate")
    g.add_argument("--hypergrad_rate", type=float, default=None,
                   help="adaptopt, hypergradient: max relative LR-scale change per step")
    g.add_argument("--optimizer_args", nargs="+", default=None, metavar="KEY=VALUE",
                   help="more constructor arguments of the optimizer, for those no flag above sets, e.g. --optimizer "
                        "prodigy --optimizer_args use_bias_correction=true d_coef=0.5 (values read as Python literals)")
    g.add_argument("--no_adaptive_momentum", action="store_true", help="adaptopt: switch off adaptive b1")
    g.add_argument("--momentum_rate", type=float, default=None, help="adaptopt: how strongly b1 follows the path")
    g.add_argument("--optimizer_impl", choices=OPTIMIZER_IMPLS, default="auto",
                   help="how the update runs, the same math each way. native: adaptopt's vectorised C++ kernel for "
                        "a step on the CPU (a plain CPU run, or the host step of DeepSpeed ZeRO-Offload; built with "
                        "the C++ compiler on first use, cached across runs). compiled: adaptopt's torch.compile-d "
                        "kernel (4-5x faster step than eager; compiles once, cached across runs). "
                        "fused: torch's fused C++ kernel of a torch baseline (adam, adamw, sgd, momentum, adagrad). "
                        "foreach: torch._foreach_* ops (adaptopt and the torch optimizers). eager: the optimizer's "
                        "default path (a per-tensor loop on CPU). auto: the fastest that works here: for adaptopt native "
                        "where its step runs on the CPU, else compiled (with a warning saying why where one does not "
                        "build: compiled, then eager), fused for "
                        "the torch baselines, foreach for rmsprop and schedulefree_adamw; prodigy and dadapt_adam "
                        "have one path")

    g = parser.add_argument_group("learning-rate schedule")
    g.add_argument("--lr_scheduler", default=None, choices=SCHEDULES,
                   help="schedule after warmup (default: linear; constant for schedule-free optimizers, which take the "
                        "warmup themselves)")
    g.add_argument("--warmup_ratio", type=float, default=0.1, help="warmup as a fraction of the updates")
    g.add_argument("--num_warmup_steps", type=int, default=None, help="warmup in updates (overrides --warmup_ratio)")
    g.add_argument("--gamma", type=float, default=0.999, help="exponential schedule: lr_t = lr * gamma^t, per update")
    g.add_argument("--min_lr_ratio", type=float, default=0.0, help="cosine/cyclical floor, as a fraction of lr")
    g.add_argument("--cycle_steps", type=int, default=None, help="cyclical: updates per half cycle")
    g.add_argument("--plateau_patience", type=int, default=1, help="plateau: evaluations without improvement")
    g.add_argument("--plateau_factor", type=float, default=0.5, help="plateau: LR multiplier on a stall")

    g = parser.add_argument_group("gradient clipping")
    g.add_argument("--max_grad_norm", type=float, default=1.0, help="global L2-norm threshold; 0 disables")
    g.add_argument("--adaptive_clip", action="store_true",
                   help="ZClip threshold from the norm's running mean/std (max_grad_norm applies during its warmup)")
    g.add_argument("--max_consecutive_skipped_steps", type=int, default=20,
                   help="stop (keeping the last checkpoint) after this many updates in a row were skipped for an "
                        "inf/NaN gradient (fp16 overflow, a NaN loss)")

    g = parser.add_argument_group("training length and batches")
    g.add_argument("--per_device_train_batch_size", type=int, default=32, help="examples per process per step")
    g.add_argument("--per_device_eval_batch_size", type=int, default=64, help="examples per process per eval step")
    g.add_argument("--gradient_accumulation_steps", type=int, default=1, help="micro-batches per update")
    g.add_argument("--num_train_epochs", type=float, default=3, help="epochs (ignored if --max_train_steps is set)")
    g.add_argument("--max_train_steps", type=int, default=None, help="optimizer updates in total")
    g.add_argument("--seed", type=int, default=42, help="seed for init, data order and dropout")


def add_run_args(parser: argparse.ArgumentParser) -> None:
    # A usage error shows once, not once per process: under torchrun it goes to the launcher's error file
    if os.environ.get("TORCHELASTIC_ERROR_FILE"):
        parser.error = lambda message: exit_with(f"{parser.prog}: error: {message}", 2)
    g = parser.add_argument_group("evaluation, checkpoints, tracking")
    g.add_argument("--output_dir", required=True, help="where results.json, checkpoints and the model go")
    g.add_argument("--eval_steps", type=int, default=0, help="evaluate every N updates (0: at the end of each epoch)")
    g.add_argument("--checkpointing_steps", default=None,
                   help="save a checkpoint every N updates, or 'epoch' (default: none)")
    g.add_argument("--keep_checkpoints", type=int, default=2, help="complete checkpoints to keep (oldest go)")
    g.add_argument("--resume_from_checkpoint", default=None,
                   help="a checkpoint folder, or 'latest' (newest in --output_dir; starts fresh if none)")
    g.add_argument("--with_tracking", action="store_true", help="log metrics through accelerate trackers")
    g.add_argument("--report_to", default="tensorboard", help="accelerate tracker(s): tensorboard, wandb, all, ...")
    g.add_argument("--logging_steps", type=int, default=10, help="log loss/lr/grad-norm every N updates")
    g.add_argument("--save_model", action="store_true", help="write the final model (safetensors) to output_dir/model")
    g.add_argument("--trust_remote_code", action="store_true",
                   help="allow code from the model repository to run (off by default: it is arbitrary code)")

    g = parser.add_argument_group("model loading and activations")
    g.add_argument("--torch_dtype", choices=TORCH_DTYPES, default=None,
                   help="dtype the weights are loaded in (from_pretrained's dtype; default: transformers' own). "
                        "auto: the checkpoint's. bfloat16/float16 halve the weights' memory; for full fine-tuning "
                        "pair them with DeepSpeed's bf16/fp16 (--mixed_precision), which keeps fp32 master weights")
    g.add_argument("--attn_implementation", choices=ATTN_IMPLEMENTATIONS, default=None,
                   help="attention kernel (default: transformers' choice, sdpa where the model has it). "
                        "flash_attention_2/3 need a CUDA GPU and the flash-attn package")
    g.add_argument("--gradient_checkpointing", action="store_true",
                   help="recompute each layer's activations in the backward pass instead of keeping them: less "
                        "memory at long sequences for about one more forward pass of compute")

    g = parser.add_argument_group("LoRA (peft)")
    g.add_argument("--lora", action="store_true", help="train LoRA adapters instead of all weights")
    g.add_argument("--lora_r", type=int, default=8, help="adapter rank")
    g.add_argument("--lora_alpha", type=int, default=16, help="adapter scaling numerator (scale = alpha / r)")
    g.add_argument("--lora_dropout", type=float, default=0.1, help="dropout on the adapter input")
    g.add_argument("--lora_target_modules", nargs="+", default=None, help="module names (default: per architecture)")
    g.add_argument("--merge_lora", action="store_true",
                   help="at the end, also write <output_dir>/model_merged: the base model with the adapters folded "
                        "into its weights, loadable without peft (implies --save_model, which writes the adapters)")


# --torch_dtype's words (transformers' dtype names) and the attention kernels --attn_implementation offers.
TORCH_DTYPES = ("auto", "float32", "bfloat16", "float16")
ATTN_IMPLEMENTATIONS = ("eager", "sdpa", "flash_attention_2", "flash_attention_3")
# The package each FlashAttention kernel imports (flash-attn 2 and its Hopper build, flash-attn 3).
_FLASH_PACKAGES = {"flash_attention_2": "flash_attn", "flash_attention_3": "flash_attn_interface"}


def attn_refusal(attn_implementation: str | None) -> str | None:
    """Why this machine cannot run ``--attn_implementation``, or None. Checked before any process starts:
    transformers would otherwise try to fetch a kernel from the hub, or fail inside the first forward."""
    package = _FLASH_PACKAGES.get(attn_implementation)
    if package is None:
        return None
    import importlib.util

    import torch

    missing = [what for what, ok in (("a CUDA GPU", torch.cuda.is_available()),
                                     (f"the {package} package", importlib.util.find_spec(package) is not None))
               if not ok]
    if not missing:
        return None
    return (f"--attn_implementation {attn_implementation} needs a CUDA GPU and the {package} package; this machine "
            f"has no {' and no '.join(m.removeprefix('a ').removeprefix('the ') for m in missing)}. "
            "Use --attn_implementation sdpa (PyTorch's fused attention, any device) or eager")


def check_shared_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Conflicts and ranges a user can get wrong; parser.error prints usage and exits with status 2."""
    for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1 (got {getattr(args, name)})")
    if args.max_train_steps is not None and args.max_train_steps < 1:
        parser.error(f"--max_train_steps must be >= 1 (got {args.max_train_steps})")
    if args.max_train_steps is None and not args.num_train_epochs > 0:
        parser.error(f"--num_train_epochs must be > 0 (got {args.num_train_epochs})")
    if not 0.0 <= args.warmup_ratio < 1.0:
        parser.error(f"--warmup_ratio must be in [0, 1) (got {args.warmup_ratio})")
    if args.logging_steps < 1:
        parser.error(f"--logging_steps must be >= 1 (got {args.logging_steps})")
    if args.max_consecutive_skipped_steps < 1:
        parser.error(f"--max_consecutive_skipped_steps must be >= 1 (got {args.max_consecutive_skipped_steps})")
    if args.max_grad_norm < 0:
        parser.error(f"--max_grad_norm must be >= 0 (0 disables clipping; got {args.max_grad_norm})")
    if args.optimizer != "adaptopt":
        used = [f for f in ("no_adaptive_momentum",) if getattr(args, f)]
        used += [f for f in ("adaptive_lr", "scale_decay", "scale_init", "hypergrad_rate", "momentum_rate")
                 if getattr(args, f) is not None]
        if used:
            parser.error(f"--{', --'.join(used)} only apply to --optimizer adaptopt (got --optimizer {args.optimizer})")
    refusal = optimizer_args_refusal(args.optimizer, args.optimizer_args)
    if refusal:
        parser.error(refusal)
    refusal = impl_refusal(args.optimizer, args.optimizer_impl)
    if refusal:
        parser.error(refusal)
    if args.lr_scheduler is None:
        args.lr_scheduler = "constant" if args.optimizer in SCHEDULE_FREE else "linear"
    elif args.optimizer in SCHEDULE_FREE and args.lr_scheduler != "constant":
        parser.error(f"--optimizer {args.optimizer} replaces the LR schedule (its iterate averaging is the decay): "
                     f"drop --lr_scheduler {args.lr_scheduler} or use constant; --warmup_ratio/--num_warmup_steps "
                     "still set its warmup")
    if args.lr_scheduler == "cyclical" and not args.cycle_steps:
        parser.error("--lr_scheduler cyclical needs --cycle_steps (updates per half cycle)")
    refusal = attn_refusal(args.attn_implementation)
    if refusal:
        parser.error(refusal)
    if args.merge_lora and not args.lora:
        parser.error("--merge_lora needs --lora (it folds the trained adapters into the base weights)")
    cs = args.checkpointing_steps
    if cs is not None and cs != "epoch" and not (cs.isdigit() and int(cs) > 0):
        parser.error(f"--checkpointing_steps must be a positive integer or 'epoch' (got {cs!r})")


def optimizer_args_refusal(optimizer: str, items: list[str] | None) -> str | None:
    """Why --optimizer_args cannot be used as given (None if it can): each key must be an argument of the
    optimizer's constructor that no other flag sets and that does not pick the implementation."""
    try:
        given = parse_optimizer_args(items)
    except ValueError as err:
        return str(err)
    if not given:
        return None
    arguments = _constructor_arguments(optimizer)
    takes = set(arguments)
    by_flag: dict[str, list[str]] = {}
    for flag, hp in FLAG_HYPERPARAMETERS.items():
        by_flag.setdefault(hp, []).append(f"--{flag}")
    # the flags that set these only for some optimizers (optimizer_from_args): the others take them here
    if optimizer not in BETAS_FLAG_OPTIMIZERS:
        by_flag.pop("betas", None)
    if optimizer not in MOMENTUM_FLAG_OPTIMIZERS:
        by_flag.pop("momentum", None)
    if optimizer in SCHEDULE_FREE:
        by_flag["warmup_steps"] = ["--warmup_ratio", "--num_warmup_steps"]
    for key in given:
        if key in by_flag:
            return f"--optimizer_args {key}=...: set it with {' / '.join(by_flag[key])} instead"
        if key in IMPLEMENTATION_ARGS or key in _IMPL_ARGUMENTS:
            return f"--optimizer_args {key}=...: the implementation is picked by --optimizer_impl"
        if key not in takes:
            return (f"--optimizer_args {key}=...: {optimizer} takes no argument {key!r}; it takes "
                    f"{', '.join(sorted(takes - set(by_flag) - IMPLEMENTATION_ARGS - set(_IMPL_ARGUMENTS)))}")
        default, value = arguments[key].default, given[key]
        # a value of another kind than the default's would only fail at the first step, after the model loaded
        kinds = (bool,) if isinstance(default, bool) else (int, float) if isinstance(default, (int, float)) else (
            (tuple, list) if isinstance(default, tuple) else None)
        if kinds and (not isinstance(value, kinds) or (bool not in kinds and isinstance(value, bool))):
            return (f"--optimizer_args {key}={value!r}: {optimizer}'s {key} takes a value like its default "
                    f"{default!r}")
    return None


def optimizer_from_args(args: argparse.Namespace, model, *, clip: bool = True, device=None, warmup_steps: int = 0):
    """The optimizer the flags describe. ``clip=False`` when something else clips (DeepSpeed's engine).
    ``device``: where the optimizer steps (the model may still be on the CPU; the host under ZeRO-Offload), for
    --optimizer_impl auto.
    ``warmup_steps``: for a schedule-free optimizer, which warms up itself (``warmup_steps(args, total)``)."""
    hp = dict(lr=args.learning_rate, weight_decay=args.weight_decay, eps=args.eps)
    if args.optimizer in SCHEDULE_FREE:
        hp["warmup_steps"] = warmup_steps
    if args.optimizer in BETAS_FLAG_OPTIMIZERS and (args.beta1 is not None or args.beta2 is not None):
        b1, b2 = default_hyperparameters(args.optimizer)["betas"]
        hp["betas"] = (args.beta1 if args.beta1 is not None else b1, args.beta2 if args.beta2 is not None else b2)
    if args.optimizer in MOMENTUM_FLAG_OPTIMIZERS:
        hp["momentum"] = args.momentum
    if args.optimizer == "adaptopt":
        if args.adaptive_lr is not None:
            hp["adaptive_lr"] = None if args.adaptive_lr == "none" else args.adaptive_lr
        hp.update(adaptive_momentum=not args.no_adaptive_momentum, scale_decay=args.scale_decay,
                  scale_init=args.scale_init,
                  hypergrad_rate=args.hypergrad_rate, momentum_rate=args.momentum_rate)
    hp.update(parse_optimizer_args(args.optimizer_args))
    hp.update(impl_arguments(args.optimizer, args.optimizer_impl, device))
    return build_optimizer(args.optimizer, model, max_grad_norm=(args.max_grad_norm or None) if clip else None,
                           adaptive_clip=args.adaptive_clip and clip, **hp)


# --optimizer_impl's words. "native" is AdaptOpt's C++ kernel for CPU steps (adaptopt/native_update.py), "compiled"
# its torch.compile-d kernel (adaptopt/functional.py), "fused" torch's fused C++ kernel of a torch optimizer: which
# optimizer has which is read from its constructor's arguments (AdaptOpt's native= and compiled=, torch's fused= and
# foreach=), so a new registry entry needs no table here.
OPTIMIZER_IMPLS = ("auto", "native", "compiled", "fused", "foreach", "eager")
_IMPL_ARGUMENTS = ("native", "compiled", "fused", "foreach")


def _constructor_arguments(name: str) -> dict[str, inspect.Parameter]:
    """The arguments of optimizer ``name``'s constructor, without ``params``."""
    arguments = dict(inspect.signature(optimizer_class(name)).parameters)
    arguments.pop("params", None)
    return arguments


def _takes(name: str) -> set[str]:
    return set(_constructor_arguments(name)) & set(_IMPL_ARGUMENTS)


def impl_refusal(name: str, impl: str) -> str | None:
    """Why ``--optimizer_impl impl`` does not apply to optimizer ``name``, or None when it does."""
    takes = _takes(name)
    if impl in ("auto", "eager") or impl in takes:
        return None
    what = {"native": "adaptopt's C++ CPU update", "compiled": "adaptopt's torch.compile-d update",
            "fused": "torch's fused C++ kernel", "foreach": "torch._foreach_* ops"}[impl]
    has = [w for w in _IMPL_ARGUMENTS if w in takes]
    return (f"--optimizer_impl {impl} ({what}) does not apply to --optimizer {name}; it runs with "
            f"{', '.join(['auto', *has, 'eager'])}")


def impl_arguments(name: str, impl: str, device=None) -> dict:
    """The constructor arguments that select ``impl`` for optimizer ``name`` on ``device`` (where it steps).

    'auto' matters for fair comparisons: torch defaults to a per-tensor loop on CPU (foreach only on CUDA), while
    HF Trainer defaults to fused AdamW, so a baseline left at torch's default would be timed on its slowest path.
    Raises ValueError where torch's fused kernel does not run on ``device``."""
    takes = _takes(name)
    if impl == "eager":
        return {"compiled": False} if "compiled" in takes else {}
    if impl == "native":
        return {"native": True}
    if impl == "auto" and "native" in takes and _device_type(device) == "cpu" and _native_update_works():
        return {"native": True}
    if impl == "compiled" or (impl == "auto" and "compiled" in takes):
        return {"compiled": impl == "compiled" or _compiled_update_works(device)}
    if impl == "foreach":
        return {"foreach": True}
    from torch.optim.optimizer import _get_fused_kernels_supported_devices

    device_type = _device_type(device)
    if "fused" in takes and device_type in _get_fused_kernels_supported_devices():
        return {"fused": True}
    if impl == "fused":
        raise ValueError(f"--optimizer_impl fused: torch's fused {name} does not run on {device_type}; "
                         "use --optimizer_impl auto or eager")
    return {"foreach": True} if "foreach" in takes else {}


def _device_type(device) -> str:
    import torch

    return torch.device(device or "cpu").type


def _native_update_works() -> bool:
    from .native_update import native_update_unavailable

    reason = native_update_unavailable()
    if reason is not None:
        logger.warning(f"--optimizer_impl auto: adaptopt's native CPU update does not build here ({reason}); "
                       "trying the compiled update (same math, slower step). --optimizer_impl compiled skips this.")
    return reason is None


def _compiled_update_works(device) -> bool:
    from .functional import compiled_update_unavailable

    reason = compiled_update_unavailable(device or "cpu")
    if reason is not None:
        logger.warning(f"--optimizer_impl auto: adaptopt's compiled update does not work here ({reason}); "
                       "using the eager update (same math, slower step). --optimizer_impl eager skips this check.")
    return reason is None


def warmup_steps(args: argparse.Namespace, total_steps: int) -> int:
    """Warmup updates from --num_warmup_steps or --warmup_ratio."""
    if args.num_warmup_steps is not None:
        warmup = args.num_warmup_steps
    else:  # a ratio never takes every update (ceil would, for a 1-update run); the schedules need one after warmup
        warmup = min(math.ceil(args.warmup_ratio * total_steps), total_steps - 1)
    if warmup >= total_steps:
        raise ValueError(f"--num_warmup_steps {warmup} must be smaller than the run's {total_steps} updates "
                         "(--max_train_steps, or epochs x updates per epoch)")
    return warmup


def scheduler_from_args(args: argparse.Namespace, optimizer, total_steps: int):
    """The LR schedule of the flags. A schedule-free optimizer gets a constant one: it warms up itself."""
    warmup = 0 if args.optimizer in SCHEDULE_FREE else warmup_steps(args, total_steps)
    plateau = Plateau(mode="max", factor=args.plateau_factor, patience=args.plateau_patience) \
        if args.lr_scheduler == "plateau" else None
    return build_scheduler(optimizer, args.lr_scheduler, total_steps=total_steps, warmup_steps=warmup,
                           gamma=args.gamma, min_ratio=args.min_lr_ratio, half_cycle_steps=args.cycle_steps,
                           plateau=plateau)


def effective_lr(optimizer) -> float:
    """The LR the last update used: the scheduled lr times AdaptOpt's adaptive scale, or times the step size
    Prodigy and D-Adaptation estimated (their ``d``; their lr is a multiplier of it), or Schedule-Free's own
    warmed-up lr."""
    group = optimizer.param_groups[0]
    if "scheduled_lr" in group:  # Schedule-Free
        return group["scheduled_lr"]
    if "d" in group:  # Prodigy, D-Adaptation
        return group["lr"] * group["d"]
    return group["lr"] * (group.get("lr_scale", 1.0) if group.get("adaptive_lr") else 1.0)
