"""The training loop every recipe shares: accelerator and DeepSpeed set-up, optimizer and schedule
from the shared flags, LoRA, exact resume, skipped-update and preemption handling, logging, tracking,
evaluation hooks and results.json.

A recipe (recipes/glue.py, squad.py, clm.py) owns only what is specific to it: its flags, data,
model class, and how to evaluate. Everything listed above is written once, here, so a fix or a new
feature reaches every recipe at once. Usage::

    run = RecipeRun(args, project="glue")
    model = run.apply_lora(model, "SEQ_CLS")
    model, evals = run.prepare(model, train_dl, eval_dls)
    run.resume(checkpoint)
    results = run.fit(evaluate=lambda: {...}, primary_metric="accuracy")
    run.finish(run.summary(results, task="mrpc", ...), tokenizer)
"""
from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DataLoaderConfiguration, set_seed
from tqdm.auto import tqdm

from . import cli
from .checkpointing import load_progress, resolve_resume, save_checkpoint
from .config_check import ConfigError, RecipeSettings, check_launch_env
from .deepspeed_run import DeepSpeedRun, fix_cpu_deepspeed_state
from .divergence import DivergenceMonitor, TooManySkippedUpdates
from .memory import MemoryTracker, format_report, numel, peak_memory_mb
from .models import ModelNotFoundError
from .preemption import PREEMPTED_EXIT_CODE, Preempted, PreemptionSignal
from .registry import SCHEDULE_FREE, run_hyperparameters

logger = get_logger(__name__)


def parameter_counts(model) -> tuple[int, int]:
    """(total, trainable) parameter counts (full sizes also when ZeRO-3 partitioned the model at load)."""
    return (sum(numel(p) for p in model.parameters()),
            sum(numel(p) for p in model.parameters() if p.requires_grad))


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
        self.train_time, self.samples_seen, self.last_train_loss = 0.0, 0, None
        # The loss over the current epoch's batches, for results.json's train_loss: the last epoch's mean over
        # every rank's batches. A run resumed mid-epoch starts from the checkpoint's sum over all ranks
        # (epoch_loss_restored) and adds this rank's batches since (epoch_loss_sum). That sum is kept in float64,
        # where a sum of float32 losses is exact unless they span many orders of magnitude, so the different order
        # of the additions leaves the figure as the uninterrupted run's. (MPS has no float64.)
        self.epoch_loss_sum, self.epoch_loss_count, self.epoch_loss_restored = 0.0, 0, (0.0, 0)
        self.loss_sum_dtype = torch.float32 if self.accelerator.device.type == "mps" else torch.float64
        self.final_train_loss: float | None = None
        self.monitor = DivergenceMonitor(args.max_consecutive_skipped_steps)

    # -- building -------------------------------------------------------------------------------------
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
                                             device=acc.device,
                                             warmup_steps=cli.warmup_steps(args, args.max_train_steps))
        self.base_optimizer = optimizer  # the torch optimizer itself: prepare() wraps it (DeepSpeed's wrapper too)
        if args.lora:
            from .lora import check_optimizer_params

            check_optimizer_params(optimizer, model)
        scheduler = cli.scheduler_from_args(args, optimizer, args.max_train_steps)
        if ds_run is not None:
            ds_run.guard(optimizer, scheduler)
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
        self.accelerator.load_state(str(checkpoint))
        if self.ds_run is not None:
            self.ds_run.after_load()
        progress = load_progress(checkpoint)
        self.completed_steps, self.start_epoch, self.batches_done = (
            progress["completed_steps"], progress["epoch"], progress["batches_in_epoch"])
        # (a checkpoint written before these were saved restarts the sum: train_loss then covers the batches
        # after the resume)
        self.epoch_loss_restored = (progress.get("epoch_loss_sum", 0.0), progress.get("epoch_loss_count", 0))
        logger.info(f"resumed from {checkpoint}: update {self.completed_steps}, epoch {self.start_epoch}, "
                    f"batch {self.batches_done}")

    # -- training -------------------------------------------------------------------------------------
    def _epoch_loss(self) -> tuple[float, int]:
        """(sum, count) of the loss over the current epoch's batches on every rank. Every rank must call it."""
        local = torch.zeros(2, dtype=self.loss_sum_dtype, device=self.accelerator.device)
        local[0], local[1] = self.epoch_loss_sum, self.epoch_loss_count
        total = self.accelerator.reduce(local, reduction="sum").tolist()
        return self.epoch_loss_restored[0] + total[0], self.epoch_loss_restored[1] + round(total[1])

    def _optimizer_mode(self, mode: str) -> None:
        """Schedule-Free keeps two iterates: the parameters must hold the averaged one ("eval") whenever the
        model is evaluated or saved, and the one gradients are taken at ("train") while training. The other
        optimizers have no modes."""
        if self.args.optimizer in SCHEDULE_FREE:
            getattr(self.base_optimizer, mode)()

    def _save(self, epoch: int, batches_in_epoch: int) -> None:
        loss_sum, loss_count = self._epoch_loss()
        self._optimizer_mode("eval")
        path = save_checkpoint(self.accelerator, self.args.output_dir, dict(
            completed_steps=self.completed_steps, epoch=epoch, batches_in_epoch=batches_in_epoch,
            epoch_loss_sum=loss_sum, epoch_loss_count=loss_count), self.args.keep_checkpoints)
        self._optimizer_mode("train")
        logger.info(f"checkpoint: {path}")

    def _evaluate(self, evaluate: Callable[[], dict], primary_metric: str | None, epoch: int) -> dict:
        self.model.eval()
        self._optimizer_mode("eval")
        with torch.no_grad():
            results = evaluate()
        self._optimizer_mode("train")
        self.model.train()
        logger.info(f"eval at update {self.completed_steps} (epoch {epoch}): {results}")
        if primary_metric is not None:  # the plateau schedule reacts to it (others ignore it)
            self.scheduler.scheduler.observe(results[primary_metric])
        if self.args.with_tracking:
            self.accelerator.log({f"eval/{k}": v for k, v in results.items()}, step=self.completed_steps)
        self._append_log({f"eval/{k}": v for k, v in results.items()})
        return results

    def _append_log(self, record: dict) -> None:
        """<output_dir>/train_log.jsonl: one line per log or eval, with no tracker needed (the study's
        loss and LR plots read it). A resumed run appends; a step logged twice keeps its last line."""
        if self.accelerator.is_main_process:
            Path(self.args.output_dir).mkdir(parents=True, exist_ok=True)
            with open(Path(self.args.output_dir) / "train_log.jsonl", "a") as f:
                f.write(json.dumps({"step": self.completed_steps, **record}) + "\n")

    def fit(self, evaluate: Callable[[], dict], primary_metric: str | None = None,
            preemption: PreemptionSignal | None = None) -> dict:
        """Trains for args.max_train_steps updates; returns the last evaluation's results.

        ``evaluate()`` runs on every rank (with the model in eval mode and no grad) and returns the
        metrics; it is called every --eval_steps updates, or at the end of each epoch.
        Raises TooManySkippedUpdates and Preempted (main() turns them into exit codes)."""
        args, acc, ds_run, model = self.args, self.accelerator, self.ds_run, self.model
        optimizer, scheduler, clipper, monitor = self.optimizer, self.scheduler, self.clipper, self.monitor
        logger.info(f"{self.train_examples} training examples, {self.num_epochs} epochs, {args.max_train_steps} "
                    f"updates of {self.total_batch} examples; optimizer {args.optimizer}, schedule {args.lr_scheduler}")
        checkpoint_every = None if args.checkpointing_steps in (None, "epoch") else int(args.checkpointing_steps)
        progress_bar = tqdm(range(args.max_train_steps), initial=self.completed_steps,
                            disable=not acc.is_local_main_process)
        model.train()
        self._optimizer_mode("train")
        loss_sum, loss_count, results = 0.0, 0, {}
        tick = time.perf_counter()
        for epoch in range(self.start_epoch, self.num_epochs):
            self.train_dl.set_epoch(epoch)
            skip = self.batches_done if epoch == self.start_epoch else 0
            if not skip:  # a new epoch; a resumed one goes on from the sum restored from its checkpoint
                self.epoch_loss_sum, self.epoch_loss_count, self.epoch_loss_restored = 0.0, 0, (0.0, 0)
            active = acc.skip_first_batches(self.train_dl, skip) if skip else self.train_dl
            active.set_epoch(epoch)  # the skipping loader must replay this epoch's order, not epoch 0's
            batch_in_epoch = skip
            for batch in active:
                with acc.accumulate(model):
                    loss = model(**batch).loss
                    acc.backward(loss)  # under DeepSpeed the engine also steps here, at a boundary
                    if ds_run is not None and acc.sync_gradients:
                        ds_applied = ds_run.after_update()  # before scheduler.step(): it counts applied updates
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad()
                batch_in_epoch += 1
                self.samples_seen += batch["input_ids"].shape[0] * acc.num_processes
                # a tensor sum: reading it (a device sync) happens only when a log line is written
                loss_sum, loss_count = loss_sum + loss.detach().float(), loss_count + 1
                self.epoch_loss_sum = self.epoch_loss_sum + loss.detach().to(self.loss_sum_dtype)
                self.epoch_loss_count += 1
                if not acc.sync_gradients:
                    continue
                # Raises after too many skipped updates in a row, before this update could be checkpointed.
                monitor.update(applied=ds_applied if ds_run is not None else not (
                    optimizer.step_was_skipped or (clipper is not None and not clipper.last_finite)))
                self.completed_steps += 1
                progress_bar.update(1)
                done = self.completed_steps >= args.max_train_steps
                if self.completed_steps % args.logging_steps == 0 or done:
                    self._log_train(float(loss_sum) / loss_count, progress_bar)
                    loss_sum, loss_count = 0.0, 0
                if checkpoint_every and self.completed_steps % checkpoint_every == 0:
                    self.train_time += time.perf_counter() - tick
                    self._save(epoch, batch_in_epoch)
                    tick = time.perf_counter()
                if args.eval_steps and self.completed_steps % args.eval_steps == 0 and not done:
                    self.train_time += time.perf_counter() - tick
                    results = self._evaluate(evaluate, primary_metric, epoch)
                    tick = time.perf_counter()
                # SLURM's warning signal (adaptopt/preemption.py): all ranks save after this same update and stop
                if preemption is not None and not done and preemption.requested_everywhere(acc):
                    if not (checkpoint_every and self.completed_steps % checkpoint_every == 0):  # not saved just now
                        self._save(epoch, batch_in_epoch)
                    raise Preempted(self.completed_steps)
                if done:
                    break
            self.train_time += time.perf_counter() - tick
            done = self.completed_steps >= args.max_train_steps
            if not args.eval_steps or done:
                results = self._evaluate(evaluate, primary_metric, epoch)
            if args.checkpointing_steps == "epoch" and not done:
                self._save(epoch + 1, 0)
            tick = time.perf_counter()
            if done:
                break
        progress_bar.close()
        self._optimizer_mode("eval")  # the model that is saved and reported is the averaged one
        loss_sum, loss_count = self._epoch_loss()
        self.final_train_loss = loss_sum / loss_count if loss_count else self.last_train_loss
        return results

    def _log_train(self, mean_loss: float, progress_bar) -> None:
        stats = {"train/loss": mean_loss, "train/lr": cli.effective_lr(self.base_optimizer)}
        if self.clipper is not None:
            stats.update({"train/grad_norm": self.clipper.last_norm, "train/skipped_updates": self.monitor.skipped})
        group = self.base_optimizer.param_groups[0]
        if self.args.optimizer == "adaptopt":
            stats.update({"train/lr_scale": group["lr_scale"], "train/beta1": self.base_optimizer.current_beta1(group)})
        elif "d" in group:  # Prodigy, D-Adaptation: the step size they estimated
            stats["train/d"] = group["d"]
        progress_bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{stats['train/lr']:.2e}")
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
        return dict(
            **fields, optimizer=self.args.optimizer, seed=self.args.seed,
            **results,
            # what the optimizer ran with, defaults included: a library default changed later stays visible
            optimizer_hyperparameters=run_hyperparameters(self.base_optimizer),
            completed_steps=self.completed_steps,
            # mean over the last epoch's batches on every rank, not over the last logging window, which at the
            # end of an epoch can be one short batch
            train_loss=self.final_train_loss,
            train_time_s=self.train_time,
            # samples/s over the updates this process ran (a resumed run counts only its own part)
            train_samples_per_second=self.samples_seen / self.train_time if self.train_time > 0 else None,
            train_samples=self.train_examples,
            total_batch_size=self.total_batch, num_processes=acc.num_processes,
            mixed_precision=acc.mixed_precision, peak_memory_mb=peak_memory_mb(acc.device),
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
    check_launch_env(RecipeSettings(args.per_device_train_batch_size, args.gradient_accumulation_steps,
                                    args.max_grad_norm or None))
    return checkpoint


def run_main(setup: Callable[[], tuple], train: Callable[..., dict], input_errors: tuple = ()) -> dict:
    """A recipe's main(): exit codes a scheduler and a user can act on.

    ``setup()`` parses and checks everything that can be checked on every rank before any process
    group exists (so a bad path stops all ranks with the same message instead of leaving some waiting
    at a barrier) and returns the arguments for ``train(*inputs, preemption)``.
    Exit 2: bad input (one clear line, no stack trace); 3: too many skipped updates; 75: preempted after
    a complete checkpoint (a requeued job resumes with --resume_from_checkpoint latest)."""
    preemption = PreemptionSignal.install()  # before the slow start-up: a signal during it counts too
    try:
        inputs = setup()
    except (*input_errors, ModelNotFoundError, FileNotFoundError, ConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    try:
        return train(*inputs, preemption)
    except input_errors as err:  # bad input that shows only once the model is loaded: same line, same code
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except TooManySkippedUpdates as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(3)
    except Preempted as err:
        print(f"preempted: {err}", file=sys.stderr)
        sys.exit(PREEMPTED_EXIT_CODE)
