"""adaptopt: fine-tune transformers with an adaptive optimizer (Adam moments, adaptive learning rate,
adaptive momentum, gradient clipping), the baselines it is compared with, and LR schedules.

The core needs only torch; recipe support (data, metrics, DeepSpeed, peft) lives in submodules that
import their dependencies where used.
"""
from .clip import GradClipper, clip_grad_norm_, global_grad_norm
from .optim import AdaptOpt
from .registry import build_optimizer, optimizer_names, param_groups
from .schedules import SCHEDULES, Plateau, ScheduledLR, build_schedule, build_scheduler

__version__ = "0.1.0"

__all__ = [
    "AdaptOpt",
    "GradClipper",
    "Plateau",
    "SCHEDULES",
    "ScheduledLR",
    "build_optimizer",
    "build_schedule",
    "build_scheduler",
    "clip_grad_norm_",
    "global_grad_norm",
    "optimizer_names",
    "param_groups",
]
