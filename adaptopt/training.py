"""The training loop every recipe shares: accelerator and DeepSpeed set-up, optimizer and schedule
from the shared flags, LoRA, exact resume, skipped-update and preemption handling, logging, tracking,
evaluation hooks and results.json.

A recipe (recipes/glue.py, squad.py, clm.py) owns only what is specific to it: its flags, data,
model class, and how to evaluate. Everything listed above is written once, here, so a fix or a new
feature reaches every recipe at once. Usage::

    run = RecipeRun(args, project="glue")
    model = run.training_model(model, "SEQ_CLS")
    model, evals = run.prepare(model, train_dl, eval_dls)
    run.resume(checkpoint)
    results = run.fit(evaluate=lambda: {...}, primary_metric="accuracy")
    run.finish(run.summary(results, task="mrpc", ...), tokenizer)

``fit`` reads as its parts: the batches of each epoch (``_epoch_batches``), one batch's forward, backward and
step (``_train_step``), one update's bookkeeping (``_finish_update``: applied or skipped, decided once), and
what runs every so many updates (``_after_update``: log, checkpoint, evaluation, preemption). The loss sums
live in ``LossTotals`` and the training time in ``TrainClock``.
"""
from __future__ import annotations

import atexit
import json
import logging
import math
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DataLoaderConfiguration, set_seed
from tqdm.auto import tqdm

from . import cli
from .checkpointing import (WRITE_FAILED_EXIT_CODE, CheckpointWriteError, ResumeWorldError, check_resume_world,
                            checkpoint_estimate, folder_bytes, load_progress, resolve_resume, resume_position,
                            save_checkpoint, space_warning)
from .config_check import ConfigError, RecipeSettings, check_launch_env
from .deepspeed_run import DeepSpeedRun, fix_cpu_deepspeed_state
from .divergence import DivergenceMonitor, TooManySkippedUpdates, update_applied
from .launch import exit_with
from .memory import MemoryTracker, PrivatePeak, format_report, freed_memory_returned, numel, peak_memory_mb
from .models import ModelNotFoundError
from .optim import AdaptOpt
from .preemption import PREEMPTED_EXIT_CODE, Preempted, PreemptionSignal
from .registry import SCHEDULE_FREE, run_hyperparameters
from .zero_resume import optimizer_shards

logger = get_logger(__name__)


def parameter_counts(model) -> tuple[int, int]:
    """(total, trainable) parameter counts (full sizes also when ZeRO-3 partitioned the model at load)."""
    return (sum(numel(p) for p in model.parameters()),
            sum(numel(p) for p in model.parameters() if p.requires_grad))


class TrainClock:
    """Seconds spent training. Evaluations and checkpoints run with it paused, so that results.json's
    train_time_s and samples/s measure the training steps alone."""

    def __init__(self):
        self.seconds, self._since = 0.0, None

    def start(self) -> None:
        self._since = time.perf_counter()

    def stop(self) -> None:
        if self._since is not None:
            self.seconds += time.perf_counter() - self._since
            self._since = None

    @contextmanager
    def paused(self):
        self.stop()
        try:
            yield
        finally:
            self.start()


class LossTotals:
    """The training loss, summed for the two figures that report it.

    - ``window_mean()``: this rank's mean since the last call, the ``train/loss`` of each log line.
    - ``epoch_total()``: (sum, count) over the current epoch's batches on every rank, for results.json's
      train_loss. A run resumed mid-epoch starts from the checkpoint's sum over all ranks (``restored``) and
      adds this rank's batches since. That sum is kept in float64, where a sum of float32 losses is exact
      unless they span many orders of magnitude, so the different order of the additions leaves the figure
      as the uninterrupted run's. (MPS has no float64.)

    The sums stay tensors: reading one (a device sync) happens only when a figure is written."""

    def __init__(self, device: torch.device):
        self.device = device
        self.epoch_dtype = torch.float32 if device.type == "mps" else torch.float64
        self.window_sum, self.window_count = 0.0, 0
        self.start_epoch()

    def start_epoch(self, restored: tuple[float, int] = (0.0, 0)) -> None:
        self.epoch_sum, self.epoch_count, self.restored = 0.0, 0, restored

    def add(self, loss: torch.Tensor) -> None:
        self.window_sum, self.window_count = self.window_sum + loss.detach().float(), self.window_count + 1
        self.epoch_sum = self.epoch_sum + loss.detach().to(self.epoch_dtype)
        self.epoch_count += 1

    def window_mean(self) -> float:
        mean = float(self.window_sum) / self.window_count
        self.window_sum, self.window_count = 0.0, 0
        return mean

    def epoch_total(self, accelerator) -> tuple[float, int]:
        """Every rank must call it (a reduce)."""
        local = torch.zeros(2, dtype=self.epoch_dtype, device=self.device)
        local[0], local[1] = self.epoch_sum, self.epoch_count
        total = accelerator.reduce(local, reduction="sum").tolist()
        return self.restored[0] + total[0], self.restored[1] + round(total[1])


class RecipeRun:
    """One training run of a recipe, from the accelerator to results.json."""

    def __init__(self, args, project: str):
        self.args = args
        self.project = project
        fix_cpu_deepspeed_state()
        self.accelerator = Accelerator(
            gradient_accumulation_steps=args.gradient_accumulation_steps,
            log_with=args.report_to if args.with_tracking else None,
            project_dir=args.output_dir,
            # Data order is a function of (seed, epoch): what lets a resumed run see the same batches.
            dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        )
        args.mixed_precision = self.accelerator.mixed_precision
        # Under DeepSpeed: who clips, and the JSON's "auto" clipping set to ours (adaptopt/deepspeed_run.py).
        self.ds_run = DeepSpeedRun.from_accelerator(self.accelerator, args.max_grad_norm or None, args.adaptive_clip)
        logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
                            level=logging.INFO)
        if not self.accelerator.is_local_main_process:  # one copy of library chatter, not one per rank
            import datasets
            import transformers

            datasets.utils.logging.set_verbosity_error()
            transformers.utils.logging.set_verbosity_error()
        logger.info(self.accelerator.state, main_process_only=False)
        set_seed(args.seed)
        self.completed_steps, self.start_epoch, self.batches_done = 0, 0, 0
        self.checkpoint: Path | None = None
        self.samples_seen, self.last_train_loss, self.final_train_loss = 0, None, None
        self.clock = TrainClock()
        self.losses = LossTotals(self.accelerator.device)
        self.monitor = DivergenceMonitor(args.max_consecutive_skipped_steps)

    # -- building -------------------------------------------------------------------------------------
    @contextmanager
    def model_loading(self):
        """Wraps the recipe's ``from_pretrained``/``from_config``; records each rank's peak memory before it
        (results.json's peak_memory_before_load_mb_per_rank; peak_memory_at_start_mb_per_rank is the peak once
        prepare() has placed the model, which is where a lazily mapped checkpoint is first read), and each rank's
        private memory from here to there (private_memory_*_load_mb_per_rank: the resident figures include the
        page cache of a mapped checkpoint; adaptopt/memory.py).

        Under a ZeRO-3 config, transformers builds or loads the model inside ``deepspeed.zero.Init`` (partitioned
        loading: each rank allocates only its share, and only rank 0 reads a checkpoint's values) whenever the
        DeepSpeed config accelerate registers with it (``HfDeepSpeedConfig``) is present. accelerate 1.15
        registers it whatever its ``zero3_init_flag`` says, so ``--zero3_init_flag false`` (``accelerate
        launch``'s flag) is honoured here: the registration is lifted for the load and restored after it, since
        saving and generation under ZeRO-3 need it. DeepSpeed then partitions the whole model at prepare(). While
        loading, freed temporaries go back to the system (adaptopt.memory.freed_memory_returned)."""
        plugin = getattr(self.accelerator.state, "deepspeed_plugin", None)
        whole = plugin is not None and plugin.hf_ds_config.is_zero3() and not plugin.zero3_init_flag
        self.memory_before_load = round(peak_memory_mb(), 1)
        self.private_load = PrivatePeak().start()  # stopped once prepare() has placed the model
        if whole:
            from transformers.integrations.deepspeed import unset_hf_deepspeed_config

            unset_hf_deepspeed_config()
        try:
            with freed_memory_returned():  # the load's temporaries go back to the system (adaptopt/memory.py)
                yield
        finally:
            if whole:
                plugin.set_deepspeed_weakref()

    def training_model(self, model, task_type: str):
        """The model as it trains: activation checkpointing (--gradient_checkpointing), then LoRA adapters
        (--lora), in that order so that peft wraps a base model that already recomputes its layers. Logs
        parameter counts."""
        # DeepSpeed marks the parameters zero.Init built or loaded partitioned (model_loading)
        self.loaded_partitioned = any(hasattr(p, "ds_id") for p in model.parameters())
        if self.args.gradient_checkpointing:
            from .models import enable_activation_checkpointing

            enable_activation_checkpointing(model)
        return self.apply_lora(model, task_type)

    def apply_lora(self, model, task_type: str):
        """Wraps the model in LoRA adapters when --lora is given; logs parameter counts either way."""
        if self.args.lora:
            from .lora import apply_lora

            model = apply_lora(model, task_type, r=self.args.lora_r, alpha=self.args.lora_alpha,
                               dropout=self.args.lora_dropout, target_modules=self.args.lora_target_modules)
        self.n_total, self.n_train = parameter_counts(model)
        logger.info(f"parameters: {self.n_total:,} total, {self.n_train:,} trainable")
        return model

    def prepare(self, model, train_dl, eval_dls: dict):
        """Builds optimizer and schedule from the flags and runs accelerator.prepare on everything.

        Returns the prepared model and the prepared evaluation loaders (same keys)."""
        args, acc, ds_run = self.args, self.accelerator, self.ds_run
        if not hasattr(self, "n_total"):
            self.n_total, self.n_train = parameter_counts(model)
        # Updates per epoch as each process will see them after prepare() shards the data.
        self.updates_per_epoch = math.ceil(math.ceil(len(train_dl) / acc.num_processes)
                                           / args.gradient_accumulation_steps)
        if args.max_train_steps is None:
            args.max_train_steps = math.ceil(args.num_train_epochs * self.updates_per_epoch)
        self.num_epochs = math.ceil(args.max_train_steps / self.updates_per_epoch)
        optimizer = cli.optimizer_from_args(args, model, clip=ds_run is None or ds_run.optimizer_clips,
                                             device="cpu" if ds_run and ds_run.optimizer_on_host else acc.device,
                                             warmup_steps=cli.warmup_steps(args, args.max_train_steps))
        self.base_optimizer = optimizer  # the torch optimizer itself: prepare() wraps it (DeepSpeed's wrapper too)
        if args.lora:
            from .lora import check_optimizer_params

            check_optimizer_params(optimizer, model)
        scheduler = cli.scheduler_from_args(args, optimizer, args.max_train_steps)
        # The schedule follows the one applied-or-skipped decision per update (_finish_update), not step() calls:
        # set before prepare(), where DeepSpeed's fp16/bf16 wrappers call step() once to initialise.
        scheduler.count_updates_externally()
        self.lr_schedule = scheduler  # prepare() wraps it too
        if ds_run is not None:
            ds_run.guard(optimizer)
        self.train_examples = len(train_dl.dataset)
        self.model, self.optimizer, self.train_dl, self.scheduler, *eval_list = acc.prepare(
            model, optimizer, train_dl, scheduler, *eval_dls.values())
        if ds_run is not None:
            ds_run.attach(self.model, optimizer)
            logger.info(f"DeepSpeed ZeRO-{ds_run.stage}, clipping by the "
                        f"{'optimizer' if ds_run.optimizer_clips else 'DeepSpeed engine'}")
        self.clipper = ds_run.grad_clipper if ds_run is not None else getattr(optimizer, "grad_clipper", None)
        self.memory = MemoryTracker(self.model, optimizer)  # adaptopt/memory.py: what the figures mean
        self.memory_start = self.memory.report()
        private_load = getattr(self, "private_load", None)
        if private_load is not None:
            private_load.stop()
        logger.info(f"memory at start: {format_report(self.memory_start)}")
        self.total_batch = args.per_device_train_batch_size * acc.num_processes * args.gradient_accumulation_steps
        if args.with_tracking:
            acc.init_trackers(self.project, {k: v for k, v in vars(args).items()
                                             if isinstance(v, (int, float, str, bool))})
        return self.model, dict(zip(eval_dls, eval_list))

    def resume(self, checkpoint: Path | None) -> None:
        """Restores model, optimizer, schedule, RNG and data position from a complete checkpoint."""
        self.checkpoint = checkpoint
        if checkpoint is None:
            return
        progress = load_progress(checkpoint)
        written_by = progress.get("num_processes", self.accelerator.num_processes)
        shards = checkpoint / "pytorch_model"
        if self.ds_run is not None and written_by != self.accelerator.num_processes and optimizer_shards(shards):
            self._load_resharded(checkpoint, written_by)
        else:
            self.accelerator.load_state(str(checkpoint))
        if self.ds_run is not None:
            self.ds_run.after_load()
        # Another number of processes continues after the same examples (adaptopt/checkpointing.py)
        batches = resume_position(progress, self.accelerator.num_processes)
        self.completed_steps, self.start_epoch, self.batches_done = progress["completed_steps"], progress["epoch"], batches
        if written_by != self.accelerator.num_processes:
            # accelerate's micro-batch count in the epoch, which places the accumulation boundaries, was restored as
            # the writing processes counted (and not at all on a process beyond them)
            self.accelerator.step = batches
            logger.info(f"checkpoint written by {written_by} processes, resumed by {self.accelerator.num_processes}: "
                        f"each skips {batches} batches of epoch {self.start_epoch}")
        # (a checkpoint written before these were saved restarts the sum: train_loss then covers the batches
        # after the resume)
        self.losses.start_epoch(restored=(progress.get("epoch_loss_sum", 0.0), progress.get("epoch_loss_count", 0)))
        logger.info(f"resumed from {checkpoint}: update {self.completed_steps}, epoch {self.start_epoch}, "
                    f"batch {self.batches_done}")

    def _load_resharded(self, checkpoint: Path, written_by: int) -> None:
        """A ZeRO checkpoint of another number of processes: the model through DeepSpeed, the optimizer state
        joined from every shard and cut into this run's partitions (adaptopt/zero_resume.py)."""
        from .zero_resume import consolidate, load_resharded

        acc = self.accelerator
        logger.info(f"{checkpoint}: ZeRO optimizer state of {written_by} processes, resharded for "
                    f"{acc.num_processes} (every rank reads all {written_by} shards)")
        whole = consolidate(checkpoint / "pytorch_model", progress=lambda shards: tqdm(
            shards, desc="reading ZeRO shards", disable=not acc.is_local_main_process))
        acc.load_state(str(checkpoint), load_optimizer_states=False)  # the model, schedule, RNG, sampler
        load_resharded(self.ds_run.engine, whole)

    # -- training -------------------------------------------------------------------------------------
    def fit(self, evaluate: Callable[[], dict], primary_metric: str | None = None,
            preemption: PreemptionSignal | None = None) -> dict:
        """Trains for args.max_train_steps updates; returns the last evaluation's results.

        ``evaluate()`` runs on every rank (with the model in eval mode and no grad) and returns the
        metrics; it is called every --eval_steps updates, or at the end of each epoch.
        Raises TooManySkippedUpdates and Preempted (main() turns them into exit codes)."""
        args = self.args
        logger.info(f"{self.train_examples} training examples, {self.num_epochs} epochs, {args.max_train_steps} "
                    f"updates of {self.total_batch} examples; optimizer {args.optimizer}, schedule {args.lr_scheduler}")
        self.checkpoint_every = None if args.checkpointing_steps in (None, "epoch") else int(args.checkpointing_steps)
        if args.checkpointing_steps is not None:
            self._check_space(checkpoint_estimate(self.model), measured=False)
        self.progress_bar = tqdm(range(args.max_train_steps), initial=self.completed_steps,
                                 disable=not self.accelerator.is_local_main_process)
        self.model.train()
        self._optimizer_mode("train")
        self.results = {}  # the last evaluation's (_evaluate)
        self.clock.start()
        for epoch in range(self.start_epoch, self.num_epochs):
            for batches_in_epoch, batch in self._epoch_batches(epoch):
                if not self._train_step(batch):
                    continue  # inside an accumulation cycle
                self._after_update(epoch, batches_in_epoch, evaluate, primary_metric, preemption)
                if self._done():
                    break
            self.clock.stop()
            if not args.eval_steps or self._done():
                self._evaluate(evaluate, primary_metric, epoch)
            if args.checkpointing_steps == "epoch" and not self._done():
                self._save(epoch + 1, 0)
            if self._done():
                break
            self.clock.start()
        self.progress_bar.close()
        self._optimizer_mode("eval")  # the model that is saved and reported is the averaged one
        loss_sum, loss_count = self.losses.epoch_total(self.accelerator)
        self.final_train_loss = loss_sum / loss_count if loss_count else self.last_train_loss
        return self.results

    def _done(self) -> bool:
        return self.completed_steps >= self.args.max_train_steps

    def _every(self, updates: int | None) -> bool:
        """True at every ``updates``-th update (never for None or 0)."""
        return bool(updates) and self.completed_steps % updates == 0

    def _epoch_batches(self, epoch: int):
        """(batches of the epoch done once this one is, batch) for the epoch's batches. A resumed epoch starts
        after the batches its checkpoint had done, with the loss sum the checkpoint restored."""
        self.train_dl.set_epoch(epoch)
        skip = self.batches_done if epoch == self.start_epoch else 0
        if not skip:
            self.losses.start_epoch()
        active = self.accelerator.skip_first_batches(self.train_dl, skip) if skip else self.train_dl
        active.set_epoch(epoch)  # the skipping loader must replay this epoch's order, not epoch 0's
        return enumerate(active, start=skip + 1)

    def _train_step(self, batch: dict) -> bool:
        """Forward, backward and optimizer step on one batch; True when the batch ended an update (the last
        micro-batch of an accumulation cycle)."""
        acc = self.accelerator
        with acc.accumulate(self.model):
            loss = self.model(**batch).loss
            acc.backward(loss)  # under DeepSpeed the engine also steps here, at a boundary
            self.optimizer.step()
            if acc.sync_gradients:
                self._finish_update()  # before scheduler.step(), which sets the next update's LR
            self.scheduler.step()
            self.optimizer.zero_grad()
        self.samples_seen += batch["input_ids"].shape[0] * acc.num_processes
        self.losses.add(loss)
        return acc.sync_gradients

    def _finish_update(self) -> None:
        """One update's bookkeeping. Whether it was applied is decided here, once (adaptopt/divergence.py), from
        DeepSpeed's engine or accelerate's GradScaler and from the optimizer's own clipper; the LR schedule, the
        divergence monitor and the logs' train/skipped_updates all read this one answer."""
        step_ran = self.ds_run.after_update() if self.ds_run is not None else not self.optimizer.step_was_skipped
        applied = update_applied(step_ran, self.base_optimizer)
        if applied:
            self.lr_schedule.record_update()
        # Raises after too many skipped updates in a row, before this update could be checkpointed.
        self.monitor.update(applied)
        self.completed_steps += 1
        self.progress_bar.update(1)

    def _after_update(self, epoch: int, batches_in_epoch: int, evaluate: Callable[[], dict],
                      primary_metric: str | None, preemption: PreemptionSignal | None) -> None:
        """What runs every so many updates: the log line, a checkpoint, an evaluation, and the stop that
        SLURM's warning signal asks for."""
        args = self.args
        if self._every(args.logging_steps) or self._done():
            self._log_train(self.losses.window_mean())
        saved = self._every(self.checkpoint_every)
        if saved:
            with self.clock.paused():
                self._save(epoch, batches_in_epoch)
        if self._every(args.eval_steps) and not self._done():
            with self.clock.paused():
                self._evaluate(evaluate, primary_metric, epoch)
        # SLURM's warning signal (adaptopt/preemption.py): all ranks save after this same update and stop
        if preemption is not None and not self._done() and preemption.requested_everywhere(self.accelerator):
            if not saved:
                self._save(epoch, batches_in_epoch)
            raise Preempted(self.completed_steps)

    def _optimizer_mode(self, mode: str) -> None:
        """Schedule-Free keeps two iterates: the parameters must hold the averaged one ("eval") whenever the
        model is evaluated or saved, and the one gradients are taken at ("train") while training. The other
        optimizers have no modes."""
        if self.args.optimizer in SCHEDULE_FREE:
            getattr(self.base_optimizer, mode)()

    def _save(self, epoch: int, batches_in_epoch: int) -> None:
        loss_sum, loss_count = self.losses.epoch_total(self.accelerator)
        self._optimizer_mode("eval")
        path = save_checkpoint(self.accelerator, self.args.output_dir, dict(
            completed_steps=self.completed_steps, epoch=epoch, batches_in_epoch=batches_in_epoch,
            num_processes=self.accelerator.num_processes,
            epoch_loss_sum=loss_sum, epoch_loss_count=loss_count), self.args.keep_checkpoints)
        self._optimizer_mode("train")
        logger.info(f"checkpoint: {path}")
        self._check_space(folder_bytes(path), measured=True)

    def _check_space(self, checkpoint_bytes: int, measured: bool) -> None:
        """Warns, before training and after each checkpoint, when the disk cannot hold the next checkpoint."""
        if self.accelerator.is_main_process:
            warning = space_warning(self.args.output_dir, checkpoint_bytes, self.args.keep_checkpoints,
                                    measured=measured)
            if warning:
                logger.warning(warning)

    def _evaluate(self, evaluate: Callable[[], dict], primary_metric: str | None, epoch: int) -> None:
        self.model.eval()
        self._optimizer_mode("eval")
        with torch.no_grad():
            self.results = results = evaluate()
        self._optimizer_mode("train")
        self.model.train()
        logger.info(f"eval at update {self.completed_steps} (epoch {epoch}): {results}")
        if primary_metric is not None:  # the plateau schedule reacts to it (others ignore it)
            self.lr_schedule.observe(results[primary_metric])
        if self.args.with_tracking:
            self.accelerator.log({f"eval/{k}": v for k, v in results.items()}, step=self.completed_steps)
        self._append_log({f"eval/{k}": v for k, v in results.items()})

    def _append_log(self, record: dict) -> None:
        """<output_dir>/train_log.jsonl: one line per log or eval, with no tracker needed (the study's
        loss and LR plots read it). A resumed run appends; a step logged twice keeps its last line."""
        if self.accelerator.is_main_process:
            Path(self.args.output_dir).mkdir(parents=True, exist_ok=True)
            with open(Path(self.args.output_dir) / "train_log.jsonl", "a") as f:
                f.write(json.dumps({"step": self.completed_steps, **record}) + "\n")

    def _log_train(self, mean_loss: float) -> None:
        stats = {"train/loss": mean_loss, "train/lr": cli.effective_lr(self.base_optimizer)}
        if self.clipper is not None:
            stats.update({"train/grad_norm": self.clipper.last_norm, "train/skipped_updates": self.monitor.skipped})
        group = self.base_optimizer.param_groups[0]
        if isinstance(self.base_optimizer, AdaptOpt):
            stats.update({"train/lr_scale": group["lr_scale"], "train/beta1": self.base_optimizer.current_beta1(group)})
        elif "d" in group:  # Prodigy, D-Adaptation: the step size they estimated
            stats["train/d"] = group["d"]
        self.progress_bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{stats['train/lr']:.2e}")
        if self.args.with_tracking:
            self.accelerator.log(stats, step=self.completed_steps)
        self._append_log(stats)
        self.last_train_loss = mean_loss  # mean over the last logging window (exact-resume tests compare it)

    # -- results --------------------------------------------------------------------------------------
    def summary(self, results: dict, **fields) -> dict:
        """results.json: the recipe's fields, the final metrics, then what every recipe reports."""
        acc = self.accelerator
        memory_end = self.memory.report()
        logger.info(f"memory at end: {format_report(memory_end)}")
        # every rank's peaks (a gather: every rank calls summary), since ZeRO and rank 0's saving make them differ
        private = getattr(self, "private_load", None)
        private = (private.start_mb, private.peak_mb) if private is not None and private.start_mb is not None else (
            float("nan"), float("nan"))
        peaks = acc.gather(torch.tensor([[peak_memory_mb(acc.device), getattr(self, "memory_before_load", 0.0),
                                          self.memory_start["peak_memory_mb"], *private]],
                                        dtype=torch.float32, device=acc.device)).cpu().tolist()
        return dict(
            **fields, optimizer=self.args.optimizer, seed=self.args.seed,
            **results,
            # what the optimizer ran with, defaults included: a library default changed later stays visible
            optimizer_hyperparameters=run_hyperparameters(self.base_optimizer),
            completed_steps=self.completed_steps,
            # mean over the last epoch's batches on every rank, not over the last logging window, which at the
            # end of an epoch can be one short batch
            train_loss=self.final_train_loss,
            train_time_s=self.clock.seconds,
            # samples/s over the updates this process ran (a resumed run counts only its own part)
            train_samples_per_second=self.samples_seen / self.clock.seconds if self.clock.seconds > 0 else None,
            train_samples=self.train_examples,
            total_batch_size=self.total_batch, num_processes=acc.num_processes,
            mixed_precision=acc.mixed_precision, peak_memory_mb=peak_memory_mb(acc.device),
            peak_memory_mb_per_rank=[round(p[0], 1) for p in peaks],
            peak_memory_before_load_mb_per_rank=[round(p[1], 1) for p in peaks],
            peak_memory_at_start_mb_per_rank=[round(p[2], 1) for p in peaks],
            # private (anonymous) resident memory right before loading and its peak until prepare() placed the
            # model: what loading holds of its own, without a mapped checkpoint's shared page cache
            private_memory_before_load_mb_per_rank=[None if math.isnan(p[3]) else round(p[3], 1) for p in peaks],
            private_memory_peak_load_mb_per_rank=[None if math.isnan(p[4]) else round(p[4], 1) for p in peaks],
            loaded_partitioned=getattr(self, "loaded_partitioned", False),
            torch_dtype=self.args.torch_dtype, attn_implementation=self.args.attn_implementation,
            gradient_checkpointing=self.args.gradient_checkpointing,
            parameters=self.n_total, trainable_parameters=self.n_train,
            skipped_updates=self.monitor.skipped,
            resumed_from=str(self.checkpoint) if self.checkpoint else None,
            memory=dict(start=self.memory_start, end=memory_end),  # this rank's; adaptopt/memory.py
        )

    def finish(self, summary: dict, tokenizer=None) -> dict:
        """Ends tracking, writes results.json and (with --save_model or --merge_lora) the model as safetensors."""
        args, acc = self.args, self.accelerator
        if args.with_tracking:
            acc.end_training()
        if acc.is_main_process:
            Path(args.output_dir).mkdir(parents=True, exist_ok=True)
            (Path(args.output_dir) / "results.json").write_text(json.dumps(summary, indent=2))
            logger.info(f"results: {json.dumps(summary)}")
        if args.save_model or args.merge_lora:
            self.save_model(os.path.join(args.output_dir, "model"), tokenizer)
        return summary

    def save_model(self, path: str, tokenizer=None) -> None:
        """Every rank calls this (ZeRO-3 gathers the sharded weights); rank 0 writes.

        With --merge_lora, ``<path>_merged`` also gets the base model with the adapters folded in."""
        acc = self.accelerator
        acc.wait_for_everyone()
        unwrapped = acc.unwrap_model(self.model)
        state_dict = acc.get_state_dict(self.model)  # a collective: complete on rank 0 (None elsewhere) under ZeRO-3
        if acc.is_main_process:  # the others' state_dict is None under ZeRO-3: peft would read their empty shards
            unwrapped.save_pretrained(path, save_function=acc.save, state_dict=state_dict, safe_serialization=True)
            paths = [path]
            if self.args.merge_lora:
                from .lora import merged_model

                paths.append(f"{path}_merged")
                merged_model(unwrapped, state_dict).save_pretrained(paths[-1], safe_serialization=True)
            if tokenizer is not None:
                for p in paths:
                    tokenizer.save_pretrained(p)
        acc.wait_for_everyone()  # no rank exits (tearing down the process group) while rank 0 still writes


def check_run_inputs(args) -> Path | None:
    """Checks that need no process group (resume folder, launch config vs flags); returns the checkpoint.

    Raises FileNotFoundError / ConfigError, which run_main turns into a one-line error."""
    checkpoint = resolve_resume(args.resume_from_checkpoint, args.output_dir) if args.resume_from_checkpoint else None
    if checkpoint is not None:  # torchrun and accelerate set these before the recipe starts
        check_resume_world(checkpoint, int(os.environ.get("WORLD_SIZE", "1")),
                           deepspeed=os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true")
    check_launch_env(RecipeSettings(args.per_device_train_batch_size, args.gradient_accumulation_steps,
                                    args.max_grad_norm or None))
    return checkpoint


def end_process_group() -> None:
    """Destroys the default process group, if one exists, while the interpreter is still whole.

    A process that exits with a gloo group alive can abort in interpreter finalization ("terminate called
    without an active exception", SIGABRT, exit 134 instead of the recipe's own 0, 2, 3, 74 or 75): gloo's
    worker threads still hold work whose tensors reach back into Python (pytorch/pytorch#190489). Run at exit,
    so every way out of a recipe (success, ``exit_with``, an uncaught error) ends the group first."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def run_main(setup: Callable[[], tuple], train: Callable[..., dict], input_errors: tuple = ()) -> dict:
    """A recipe's main(): exit codes a scheduler and a user can act on.

    ``setup()`` parses and checks everything that can be checked on every rank before any process
    group exists (so a bad path stops all ranks with the same message instead of leaving some waiting
    at a barrier) and returns the arguments for ``train(*inputs, preemption)``.
    Exit 2: bad input (one clear line, no stack trace); 3: too many skipped updates; 74: a checkpoint could not
    be written (disk full, I/O error; the earlier checkpoints are intact); 75: preempted after a complete
    checkpoint (a requeued job resumes with --resume_from_checkpoint latest).
    The line is shown once however many processes stop with it (adaptopt/launch.py: exit_with)."""
    preemption = PreemptionSignal.install()  # before the slow start-up: a signal during it counts too
    atexit.register(end_process_group)  # a second registration (another run in this process) finds no group: no-op
    try:
        inputs = setup()
    except (*input_errors, ModelNotFoundError, FileNotFoundError, ConfigError, ResumeWorldError) as err:
        exit_with(f"error: {err}", 2)
    try:
        return train(*inputs, preemption)
    except input_errors as err:  # bad input that shows only once the model is loaded: same line, same code
        exit_with(f"error: {err}", 2)
    except TooManySkippedUpdates as err:
        exit_with(f"error: {err}", 3)
    except Preempted as err:
        exit_with(f"preempted: {err}", PREEMPTED_EXIT_CODE)
    except CheckpointWriteError as err:
        exit_with(f"error: {err}", WRITE_FAILED_EXIT_CODE)
