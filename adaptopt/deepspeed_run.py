"""DeepSpeed under accelerate: the few things a recipe must get right, each in one place.

A recipe calls, in this order:

1. ``fix_cpu_deepspeed_state()`` before creating its ``Accelerator``. On a machine without CUDA,
   accelerate (1.x) starts DeepSpeed's process group but records ``num_processes = 1``, because its
   backend detection only knows GPU backends. Then data is not sharded and DeepSpeed's batch check fails
   (``train_batch_size is not equal to micro_batch_per_gpu * gradient_acc_step * world_size``). We set
   the shared ``PartialState`` from ``torch.distributed`` before the Accelerator copies it.
2. ``DeepSpeedRun.from_accelerator(accelerator, max_grad_norm, adaptive_clip)`` after creating it (None
   without DeepSpeed). It fills the ``"auto"`` clipping in the DeepSpeed config with the recipe's value.
   accelerate would otherwise fill it with 1.0 whatever ``--max_grad_norm`` says. It also decides who clips:
   - **the engine**, whenever DeepSpeed wraps the optimizer (ZeRO 1-3, fp16, bf16). It is the only
     place that sees every shard's gradients at once: ZeRO-1/2 call ``optimizer.step()`` once per param
     group and ZeRO-3 once per sub-group, so a clipper inside the optimizer would see one group at a
     time. The recipe then builds its optimizer *without* clipping (``optimizer_clips`` is False), and
     adaptive clipping sets the engine's threshold before each step from the same ``GradClipper`` rule;
   - **the optimizer**, in ZeRO-0 fp32, where the engine calls our optimizer directly with full,
     averaged gradients: DeepSpeed's clipping is off and ours runs, exactly as without DeepSpeed.
3. ``run.guard(optimizer)`` before ``accelerator.prepare`` (see its docstring), and
   ``run.attach(engine, optimizer)`` after it. Under ZeRO the optimizer
   holds shards, so AdaptOpt's path statistics get a ``reduce_fn`` over the data-parallel group.
4. ``run.after_update()`` after each backward that ended an accumulation cycle. It records the pre-clip
   global norm (``engine.get_global_grad_norm()``), sets the next adaptive threshold, and returns whether
   the engine applied the step (False on an fp16 overflow): the launcher's half of
   ``adaptopt.divergence.update_applied``, whose answer the recipe gives the LR schedule. The schedule
   counts those answers, not ``optimizer.step()`` calls, of which ZeRO makes several per update.

DeepSpeed's clip is ``g / max(1, (||g|| + 1e-6) / c)``, torch's ``clip_grad_norm_`` rule; it differs from
the papers' ``g * c / ||g||`` by a factor 1 + 1e-6/||g||.
"""
from __future__ import annotations

import os

import torch

from .clip import GradClipper, attach_state


def fix_cpu_deepspeed_state() -> None:
    """Makes accelerate's process count right for DeepSpeed without CUDA (see the module docstring).

    A no-op unless this process was launched for DeepSpeed (``ACCELERATE_USE_DEEPSPEED``) on a machine
    without CUDA; on GPU clusters accelerate already gets it right.
    """
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true" or torch.cuda.is_available():
        return
    from accelerate import PartialState

    state = PartialState()  # starts DeepSpeed's process group (gloo on CPU)
    if torch.distributed.is_initialized() and state.num_processes != torch.distributed.get_world_size():
        state.num_processes = torch.distributed.get_world_size()
        state.process_index = torch.distributed.get_rank()
        state.local_process_index = int(os.environ.get("LOCAL_RANK", state.process_index))
        state.backend = torch.distributed.get_backend()


def _enabled(section: dict | None) -> bool:
    return bool(section) and str(section.get("enabled", False)).lower() == "true"


class DeepSpeedRun:
    """Clipping ownership, shard-aware statistics and the engine's applied-or-skipped verdict, for one
    DeepSpeed run."""

    def __init__(self, ds_config: dict, max_grad_norm: float | None, adaptive_clip: bool):
        self.config = ds_config
        self.stage = int(ds_config.get("zero_optimization", {}).get("stage", 0))
        wrapped = self.stage > 0 or _enabled(ds_config.get("fp16")) or _enabled(ds_config.get("bf16"))
        self.optimizer_clips = not wrapped
        # The engine must not clip when the optimizer does, and must clip at the recipe's value otherwise.
        # A number written in the file was checked against the recipe's by adaptopt.config_check already.
        self.config["gradient_clipping"] = 0.0 if self.optimizer_clips else float(max_grad_norm or 0.0)
        self.clipper = GradClipper(max_grad_norm, adaptive=adaptive_clip) if wrapped else None
        # ZeRO-Offload steps the optimizer on the host, on DeepSpeed's flat fp32 partitions, whatever the device
        offload = (ds_config.get("zero_optimization", {}).get("offload_optimizer") or {}).get("device", "none")
        self.optimizer_on_host = self.stage > 0 and offload == "cpu"
        self.engine = None

    @classmethod
    def from_accelerator(cls, accelerator, max_grad_norm: float | None, adaptive_clip: bool) -> "DeepSpeedRun | None":
        plugin = getattr(accelerator.state, "deepspeed_plugin", None)
        if plugin is None:
            return None
        return cls(plugin.deepspeed_config, max_grad_norm, adaptive_clip)

    def guard(self, optimizer: torch.optim.Optimizer) -> None:
        """Call before ``accelerator.prepare``/``deepspeed.initialize`` with the recipe's optimizer.

        DeepSpeed's fp16/bf16 ZeRO-0 wrappers "initialise optimizer states" by calling ``step()`` once
        with zero gradients. That is not an update: it would count a step for Adam's bias correction and
        apply weight decay. Until ``attach``, a pre-hook drops the gradients, so the call updates nothing
        (torch optimizers and AdaptOpt skip parameters without a gradient). The recipe's ScheduledLR must
        count applied updates (``count_updates_externally()``) before this call can happen.
        """
        refusal = _refusal(type(optimizer).__name__, wrapped=not self.optimizer_clips)
        if refusal:
            raise ValueError(refusal)
        if self.stage > 0 and isinstance(optimizer, torch.optim.Adagrad):
            raise ValueError(
                "adagrad cannot run under DeepSpeed ZeRO-1/2/3: DeepSpeed replaces a client torch.optim.Adagrad "
                "with a new one over a single param group (deepspeed/runtime/zero/stage_1_and_2.py, "
                "initialize_optimizer_states), which drops the weight-decay groups and fails with an IndexError "
                "on the first step. Use a ZeRO-0 config (ds_configs/zero0.json) or another --optimizer."
            )

        def drop_grads(opt, args, kwargs):
            for group in opt.param_groups:
                for p in group["params"]:
                    p.grad = None

        self._init_guard = optimizer.register_step_pre_hook(drop_grads)

    def attach(self, engine, optimizer: torch.optim.Optimizer) -> None:
        """``optimizer``: the torch optimizer the recipe built (DeepSpeed's client optimizer)."""
        if getattr(self, "_init_guard", None) is not None:
            self._init_guard.remove()
            self._init_guard = None
        self.engine, self.optimizer = engine, optimizer
        if self.stage > 0 and hasattr(optimizer, "reduce_fn"):
            optimizer.reduce_fn = _all_reduce_fn(engine)
        if self.clipper is not None:
            attach_state(optimizer, self.clipper)  # checkpointed inside DeepSpeed's optimizer state
            self._set_threshold()

    def after_load(self) -> None:
        """After ``accelerator.load_state``: DeepSpeed restores its own clip value; ours wins."""
        if self.clipper is not None:
            self._set_threshold()

    def after_update(self) -> bool:
        """Book-keeping after the engine's step at an accumulation boundary. Returns False if the engine
        skipped the step (an fp16 overflow); a step our own optimizer skipped (ZeRO-0 fp32, where it clips)
        the engine does not see: ``adaptopt.divergence.update_applied`` combines the two."""
        if self.clipper is not None:
            norm = self.engine.get_global_grad_norm()  # pre-clip, unscaled; inf on an fp16 overflow
            if norm is not None:
                self.clipper.factor_for_norm(float(norm))
            self._set_threshold()
        return bool(self.engine.was_step_applied())

    @property
    def grad_clipper(self) -> GradClipper | None:
        """The clipper whose figures (last_norm, nonfinite_steps) the recipe logs."""
        return self.clipper if self.clipper is not None else getattr(self.optimizer, "grad_clipper", None)

    def _set_threshold(self) -> None:
        threshold = self.clipper.threshold()
        # every DeepSpeed optimizer wrapper (ZeRO 1-3, FP16, BF16) reads clip_grad at each step
        self.engine.optimizer.clip_grad = float(threshold) if threshold is not None else 0.0


# Learning-rate-free peers that DeepSpeed would run wrongly once it wraps the optimizer (ZeRO 1-3, or its
# fp16/bf16 optimizers, which hand step() fp32 master copies, partitioned over ranks for bf16 and ZeRO), and
# why. Refused before training rather than run silently wrong; tests/test_deepspeed.py holds them to the
# single-process run where they are allowed (ZeRO-0 fp32).
_WRAPPED_REFUSALS = {
    ("Prodigy", "DAdaptAdam"): (
        "estimates its step size d from sums over the parameters one step() call sees, and all-reduces them only "
        "under torch FSDP (its fsdp_in_use switch, which also needs CUDA). Once DeepSpeed wraps the optimizer, a "
        "call sees one param group (ZeRO-3: one sub-group) of this rank's slice, so every rank and group would "
        "step with its own d"),
    ("AdamWScheduleFree",): (
        "keeps two iterates and swaps them in the optimizer's parameters (optimizer.eval()/train()). Once "
        "DeepSpeed wraps the optimizer those are fp32 master copies that DeepSpeed copies into the model only "
        "inside step(), so evaluation and checkpoints would see the training iterate instead of the average"),
}


def _refusal(class_name: str, wrapped: bool) -> str | None:
    """Why ``class_name`` cannot run under this DeepSpeed config, or None."""
    for names, why in _WRAPPED_REFUSALS.items():
        if wrapped and class_name in names:
            return (f"{class_name} cannot run under DeepSpeed ZeRO 1-3 or DeepSpeed's fp16/bf16: it {why}. Use a "
                    "ZeRO-0 fp32 config (ds_configs/zero0.json with fp16 and bf16 off) or plain DDP "
                    "(launch/ddp_single_node.yaml), or --optimizer adaptopt, whose learned step size is shard-aware.")
    return None


def _all_reduce_fn(engine):
    """Sums a float64 CPU tensor over the data-parallel group, on the device the backend needs."""
    import deepspeed.comm as dist
    from deepspeed.accelerator import get_accelerator

    group = getattr(engine, "seq_data_parallel_group", None)
    device = torch.device(get_accelerator().current_device_name())

    def reduce(t: torch.Tensor) -> torch.Tensor:
        moved = t.to(device)
        dist.all_reduce(moved, group=group)
        return moved.to(t.device)

    return reduce
