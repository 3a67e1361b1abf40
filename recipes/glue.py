"""Fine-tune a sequence classifier on a GLUE task with AdaptOpt (or any baseline), via accelerate.

One process (CPU or one GPU):
    accelerate launch recipes/glue.py --task_name mrpc --data_dir $GLUE_DIR --output_dir runs/mrpc
N processes on one machine (DDP; on a CPU-only machine prefix ACCELERATE_USE_CPU=true):
    accelerate launch --multi_gpu --num_processes 2 recipes/glue.py --task_name mrpc ...
DeepSpeed ZeRO (ds_configs/README.md), one or several machines: the backend comes from an accelerate
config, not from this file (launch/run.py runs the same command on a CPU-only machine):
    accelerate launch --config_file launch/deepspeed_single_node.yaml \
        --deepspeed_config_file ds_configs/zero2.json --mixed_precision bf16 recipes/glue.py ...

With no --model_name_or_path, the model is the pip-shipped all-MiniLM-L6-v2 (no hub needed). Data:
--data_dir (or $GLUE_DIR) in the original GLUE TSV layout, --train_file/--validation_file (csv/json),
or --dataset_name nyu-mll/glue when online. Writes <output_dir>/results.json with the final dev metrics,
train time, samples/s and peak memory; checkpoints under <output_dir>/checkpoints.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import resource
import sys
import time
from pathlib import Path

# Runnable as a plain script from a checkout: make the repository's adaptopt importable.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from accelerate import Accelerator  # noqa: E402
from accelerate.logging import get_logger  # noqa: E402
from accelerate.utils import DataLoaderConfiguration, set_seed  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from adaptopt import cli  # noqa: E402
from adaptopt.check import ConfigError, RecipeSettings, check_launch_env  # noqa: E402
from adaptopt.checkpointing import load_progress, resolve_resume, save_checkpoint  # noqa: E402
from adaptopt.data.glue import GLUE_TASKS, GlueDataError, glue_dir_from_env, load_glue  # noqa: E402
from adaptopt.distributed import DeepSpeedRun, fix_cpu_deepspeed_state  # noqa: E402
from adaptopt.skipped import TooManySkippedUpdates, UpdateMonitor  # noqa: E402
from adaptopt.models import ModelNotFoundError, resolve_model  # noqa: E402
from adaptopt.preemption import PREEMPTED_EXIT_CODE, Preempted, PreemptionSignal  # noqa: E402

logger = get_logger(__name__)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = parser.add_argument_group("task and data")
    g.add_argument("--task_name", required=True, choices=list(GLUE_TASKS), help="GLUE task")
    g.add_argument("--data_dir", default=None, help="folder holding CoLA/, SST-2/, ... (default: $GLUE_DIR)")
    g.add_argument("--train_file", default=None, help="csv/json training file (text columns + label)")
    g.add_argument("--validation_file", default=None, help="csv/json validation file")
    g.add_argument("--dataset_name", default=None, help="hub dataset, e.g. nyu-mll/glue (needs the hub)")
    g.add_argument("--max_train_samples", type=int, default=None,
                   help="train on a random subsample of this many examples (seeded; dev stays whole)")
    g.add_argument("--max_eval_samples", type=int, default=None, help="evaluate on the first N dev examples")
    g.add_argument("--max_length", type=int, default=128, help="tokens per example after truncation")
    g.add_argument("--pad_to_max_length", action="store_true", help="pad to --max_length instead of per batch")
    g = parser.add_argument_group("model")
    g.add_argument("--model_name_or_path", default=None,
                   help="AutoModelForSequenceClassification name or path (default: embedded all-MiniLM-L6-v2)")
    g.add_argument("--ignore_mismatched_sizes", action="store_true",
                   help="replace a checkpoint's classifier head of another size (e.g. fine-tuned on another task)")
    cli.add_optimization_args(parser)
    cli.add_run_args(parser)
    args = parser.parse_args(argv)

    cli.check_shared_args(parser, args)
    sources = [s for s in ("data_dir", "train_file", "dataset_name") if getattr(args, s)]
    if args.validation_file and "train_file" not in sources:
        sources.append("validation_file")
    if len(sources) > 1 and set(sources) != {"train_file", "validation_file"}:
        parser.error(f"give one data source, not several: got --{' and --'.join(sources)}")
    if not sources:
        args.data_dir = glue_dir_from_env()
        if args.data_dir is None:
            parser.error("no data: pass --data_dir (or set GLUE_DIR) to the folder holding CoLA/, SST-2/, ..., "
                         "or --train_file/--validation_file, or --dataset_name nyu-mll/glue")
    if args.train_file and not args.validation_file:
        parser.error("--train_file needs --validation_file (the dev metrics are the result)")
    return args


def load_data(args):
    """The task's DatasetDict, with a seeded training subsample if asked. Raises GlueDataError."""
    raw = load_glue(args.task_name, data_dir=args.data_dir, train_file=args.train_file,
                    validation_file=args.validation_file, hub_name=args.dataset_name)
    if "train" not in raw:
        raise GlueDataError(
            f"{args.task_name}: the data has no training split (e.g. QNLI here ships only dev.tsv): "
            "pass a --train_file or a --data_dir whose task folder has train.tsv"
        )
    if args.max_train_samples is not None and args.max_train_samples < len(raw["train"]):
        raw["train"] = raw["train"].shuffle(seed=args.seed).select(range(args.max_train_samples))
    if args.max_eval_samples is not None:
        for split in GLUE_TASKS[args.task_name].validation_splits:
            raw[split] = raw[split].select(range(min(args.max_eval_samples, len(raw[split]))))
    return raw


def build_dataloaders(args, raw, tokenizer):
    task = GLUE_TASKS[args.task_name]
    padding = "max_length" if args.pad_to_max_length else False

    def tokenize(batch):
        texts = [batch[c] for c in task.text_columns]
        out = tokenizer(*texts, padding=padding, max_length=args.max_length, truncation=True)
        out["labels"] = batch["label"]
        return out

    keep = {"idx"}  # evaluation gathers idx to prove every dev example is seen exactly once
    tokenized = raw.map(tokenize, batched=True,
                        remove_columns=[c for c in raw["train"].column_names if c not in keep],
                        desc="tokenizing")
    from transformers import DataCollatorWithPadding, default_data_collator

    if args.pad_to_max_length:
        collate = default_data_collator
    else:  # dynamic padding; multiples of 8 let tensor cores work under fp16/bf16
        collate = DataCollatorWithPadding(tokenizer, pad_to_multiple_of=8 if args.mixed_precision != "no" else None)
    # The loader's own generator: creating an iterator draws a seed from it, and drawing from the global
    # RNG instead would shift every later dropout mask of a resumed run (it restores the global RNG).
    train = DataLoader(tokenized["train"].remove_columns("idx"), shuffle=True, collate_fn=collate,
                       batch_size=args.per_device_train_batch_size,
                       generator=torch.Generator().manual_seed(args.seed))
    evals = {split: DataLoader(tokenized[split], collate_fn=collate, batch_size=args.per_device_eval_batch_size)
             for split in task.validation_splits}
    return train, evals


def evaluate_split(accelerator, model, dataloader, metric, task, split):
    """Exact dev metrics under sharding: gather_for_metrics drops the padding duplicates of the last batch."""
    model.eval()
    predictions, references, seen = [], [], []
    for batch in dataloader:
        idx = batch.pop("idx")
        with torch.no_grad():
            logits = model(**batch).logits
        preds = logits.squeeze(-1) if task.is_regression else logits.argmax(dim=-1)
        preds, refs, idx = accelerator.gather_for_metrics((preds, batch["labels"], idx))
        predictions.append(preds.float().cpu() if task.is_regression else preds.cpu())
        references.append(refs.cpu())
        seen.append(idx.cpu())
    model.train()
    seen = torch.cat(seen)
    expected = len(dataloader.dataset)
    # Every dev example exactly once, on every world size: otherwise the metric is not the dev metric.
    if len(seen) != expected or len(torch.unique(seen)) != expected:
        raise RuntimeError(f"{split}: evaluated {len(seen)} rows ({len(torch.unique(seen))} distinct) of {expected}")
    result = metric.compute(predictions=torch.cat(predictions).tolist(), references=torch.cat(references).tolist())
    return {k: float(v) for k, v in result.items()}


def peak_memory_mb(accelerator) -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated(accelerator.device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def train(args, raw, model_path: str, checkpoint: Path | None, preemption: PreemptionSignal | None = None) -> dict:
    fix_cpu_deepspeed_state()
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        log_with=args.report_to if args.with_tracking else None,
        project_dir=args.output_dir,
        # Data order is a function of (seed, epoch): what lets a resumed run see the same batches.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    args.mixed_precision = accelerator.mixed_precision
    # Under DeepSpeed: who clips, and the JSON's "auto" clipping set to ours (adaptopt/distributed.py).
    ds_run = DeepSpeedRun.from_accelerator(accelerator, args.max_grad_norm or None, args.adaptive_clip)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S", level=logging.INFO)
    if not accelerator.is_local_main_process:  # one copy of library chatter, not one per rank
        import datasets
        import transformers

        datasets.utils.logging.set_verbosity_error()
        transformers.utils.logging.set_verbosity_error()
    logger.info(accelerator.state, main_process_only=False)
    set_seed(args.seed)
    task = GLUE_TASKS[args.task_name]

    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    logger.info(f"model: {model_path}")
    tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=args.trust_remote_code)
    model = AutoModelForSequenceClassification.from_pretrained(
        model_path, num_labels=task.num_labels, trust_remote_code=args.trust_remote_code,
        problem_type="regression" if task.is_regression else "single_label_classification",
        ignore_mismatched_sizes=args.ignore_mismatched_sizes,
    )
    if args.lora:
        from adaptopt.lora import apply_lora

        model = apply_lora(model, "SEQ_CLS", r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout,
                           target_modules=args.lora_target_modules)
    n_total = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    logger.info(f"parameters: {n_total:,} total, {n_train:,} trainable")

    train_dl, eval_dls = build_dataloaders(args, raw, tokenizer)

    optimizer = cli.optimizer_from_args(args, model, clip=ds_run is None or ds_run.optimizer_clips)
    base_optimizer = optimizer  # the torch optimizer itself: prepare() wraps it (in DeepSpeed's wrapper too)
    # Updates per epoch as each process will see them after prepare() shards the data.
    updates_per_epoch = math.ceil(math.ceil(len(train_dl) / accelerator.num_processes) / args.gradient_accumulation_steps)
    if args.max_train_steps is None:
        args.max_train_steps = math.ceil(args.num_train_epochs * updates_per_epoch)
    num_epochs = math.ceil(args.max_train_steps / updates_per_epoch)
    scheduler = cli.scheduler_from_args(args, optimizer, args.max_train_steps)

    base_scheduler = scheduler
    if ds_run is not None:
        ds_run.guard(base_optimizer, base_scheduler)
    model, optimizer, train_dl, scheduler, *eval_list = accelerator.prepare(
        model, optimizer, train_dl, scheduler, *eval_dls.values())
    eval_dls = dict(zip(eval_dls, eval_list))
    if ds_run is not None:
        ds_run.attach(model, base_optimizer)
        logger.info(f"DeepSpeed ZeRO-{ds_run.stage}, clipping by the "
                    f"{'optimizer' if ds_run.optimizer_clips else 'DeepSpeed engine'}")

    import evaluate

    from adaptopt.metrics import glue_metric_path

    metrics = {split: evaluate.load(glue_metric_path(), config_name=_metric_config(task, split)) for split in eval_dls}
    if args.with_tracking:
        accelerator.init_trackers("glue", {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))})

    completed_steps, start_epoch, batches_done = 0, 0, 0
    if checkpoint is not None:
        accelerator.load_state(str(checkpoint))
        if ds_run is not None:
            ds_run.after_load()
        progress = load_progress(checkpoint)
        completed_steps, start_epoch, batches_done = (progress["completed_steps"], progress["epoch"],
                                                      progress["batches_in_epoch"])
        logger.info(f"resumed from {checkpoint}: update {completed_steps}, epoch {start_epoch}, batch {batches_done}")

    total_batch = args.per_device_train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    logger.info(f"{len(raw['train'])} training examples, {num_epochs} epochs, {args.max_train_steps} updates "
                f"of {total_batch} examples; optimizer {args.optimizer}, schedule {args.lr_scheduler}")
    clipper = ds_run.grad_clipper if ds_run is not None else getattr(base_optimizer, "grad_clipper", None)
    monitor = UpdateMonitor(args.max_consecutive_skipped_steps)
    checkpoint_every = None if args.checkpointing_steps in (None, "epoch") else int(args.checkpointing_steps)

    def save(epoch, batches_in_epoch):
        path = save_checkpoint(accelerator, args.output_dir, dict(
            completed_steps=completed_steps, epoch=epoch, batches_in_epoch=batches_in_epoch), args.keep_checkpoints)
        logger.info(f"checkpoint: {path}")

    def run_eval(epoch):
        results = {}
        for split, dl in eval_dls.items():
            prefix = "" if len(eval_dls) == 1 else f"{split}_"
            for k, v in evaluate_split(accelerator, model, dl, metrics[split], task, split).items():
                results[prefix + k] = v
        logger.info(f"eval at update {completed_steps} (epoch {epoch}): {results}")
        scheduler.scheduler.observe(results[_primary_metric(task, eval_dls)])
        if args.with_tracking:
            accelerator.log({f"eval/{k}": v for k, v in results.items()}, step=completed_steps)
        return results

    progress_bar = tqdm(range(args.max_train_steps), initial=completed_steps, disable=not accelerator.is_local_main_process)
    model.train()
    train_time, samples_seen, loss_sum, loss_count, results = 0.0, 0, 0.0, 0, {}
    last_train_loss = None  # mean loss over the last logging window (exact-resume tests compare it)
    tick = time.perf_counter()
    for epoch in range(start_epoch, num_epochs):
        train_dl.set_epoch(epoch)
        skip = batches_done if epoch == start_epoch else 0
        active = accelerator.skip_first_batches(train_dl, skip) if skip else train_dl
        active.set_epoch(epoch)  # the skipping loader must replay this epoch's order, not epoch 0's
        batch_in_epoch = skip
        for batch in active:
            with accelerator.accumulate(model):
                loss = model(**batch).loss
                accelerator.backward(loss)  # under DeepSpeed the engine also steps here, at a boundary
                if ds_run is not None and accelerator.sync_gradients:
                    ds_applied = ds_run.after_update()  # before scheduler.step(): it counts applied updates
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            batch_in_epoch += 1
            samples_seen += batch["labels"].shape[0] * accelerator.num_processes
            # a tensor sum: reading it (a device sync) happens only when a log line is written
            loss_sum, loss_count = loss_sum + loss.detach().float(), loss_count + 1
            if not accelerator.sync_gradients:
                continue
            # Raises after too many skipped updates in a row, before this update could be checkpointed.
            monitor.update(applied=ds_applied if ds_run is not None else
                           not (optimizer.step_was_skipped or (clipper is not None and not clipper.last_finite)))
            completed_steps += 1
            progress_bar.update(1)
            if completed_steps % args.logging_steps == 0 or completed_steps == args.max_train_steps:
                stats = {"train/loss": float(loss_sum) / loss_count, "train/lr": cli.effective_lr(base_optimizer)}
                if clipper is not None:
                    stats.update({"train/grad_norm": clipper.last_norm, "train/skipped_updates": monitor.skipped})
                if args.optimizer == "adaptopt":
                    group = base_optimizer.param_groups[0]
                    stats.update({"train/lr_scale": group["lr_scale"], "train/beta1": base_optimizer.current_beta1(group)})
                progress_bar.set_postfix(loss=f"{stats['train/loss']:.4f}", lr=f"{stats['train/lr']:.2e}")
                if args.with_tracking:
                    accelerator.log(stats, step=completed_steps)
                last_train_loss = stats["train/loss"]
                loss_sum, loss_count = 0.0, 0
            if checkpoint_every and completed_steps % checkpoint_every == 0:
                train_time += time.perf_counter() - tick
                save(epoch, batch_in_epoch)
                tick = time.perf_counter()
            if args.eval_steps and completed_steps % args.eval_steps == 0 and completed_steps < args.max_train_steps:
                train_time += time.perf_counter() - tick
                results = run_eval(epoch)
                tick = time.perf_counter()
            # SLURM's warning signal (adaptopt/preemption.py): all ranks save after this same update and stop
            if preemption is not None and completed_steps < args.max_train_steps \
                    and preemption.requested_everywhere(accelerator):
                if not (checkpoint_every and completed_steps % checkpoint_every == 0):  # (not saved just now)
                    save(epoch, batch_in_epoch)
                raise Preempted(completed_steps)
            if completed_steps >= args.max_train_steps:
                break
        train_time += time.perf_counter() - tick
        if not args.eval_steps or completed_steps >= args.max_train_steps:
            results = run_eval(epoch)
        if args.checkpointing_steps == "epoch" and completed_steps < args.max_train_steps:
            save(epoch + 1, 0)
        tick = time.perf_counter()
        if completed_steps >= args.max_train_steps:
            break
    progress_bar.close()

    summary = dict(
        task=args.task_name, optimizer=args.optimizer, model=model_path, seed=args.seed,
        **results,
        completed_steps=completed_steps, train_loss=last_train_loss,
        train_time_s=train_time,
        # samples/s over the updates this process ran (a resumed run counts only its own part)
        train_samples_per_second=samples_seen / train_time if train_time > 0 else None,
        train_samples=len(raw["train"]), eval_samples={s: len(dl.dataset) for s, dl in eval_dls.items()},
        total_batch_size=total_batch, num_processes=accelerator.num_processes,
        mixed_precision=accelerator.mixed_precision, peak_memory_mb=peak_memory_mb(accelerator),
        parameters=n_total, trainable_parameters=n_train,
        skipped_updates=monitor.skipped,
        resumed_from=str(checkpoint) if checkpoint else None,
    )
    if args.with_tracking:
        accelerator.end_training()
    if accelerator.is_main_process:
        Path(args.output_dir).mkdir(parents=True, exist_ok=True)
        (Path(args.output_dir) / "results.json").write_text(json.dumps(summary, indent=2))
        logger.info(f"results: {json.dumps(summary)}")
    if args.save_model:
        accelerator.wait_for_everyone()
        unwrapped = accelerator.unwrap_model(model)
        unwrapped.save_pretrained(os.path.join(args.output_dir, "model"), is_main_process=accelerator.is_main_process,
                                  save_function=accelerator.save, safe_serialization=True)
        if accelerator.is_main_process:
            tokenizer.save_pretrained(os.path.join(args.output_dir, "model"))
    return summary


def _metric_config(task, split: str) -> str:
    if task.name == "mnli":
        return "mnli_mismatched" if split.endswith("mismatched") else "mnli_matched"
    return task.name


def _primary_metric(task, eval_dls) -> str:
    prefix = "" if len(eval_dls) == 1 else f"{next(iter(eval_dls))}_"
    return prefix + task.metrics[0]


def main(argv=None) -> dict:
    preemption = PreemptionSignal.install()  # before the slow start-up: a signal during it counts too
    args = parse_args(argv)
    # Inputs are checked on every rank before any process group exists, so a bad path or a malformed
    # file stops all ranks with the same message instead of leaving some waiting at a barrier.
    try:
        model_path = resolve_model(args.model_name_or_path)
        raw = load_data(args)
        checkpoint = resolve_resume(args.resume_from_checkpoint, args.output_dir) if args.resume_from_checkpoint else None
        check_launch_env(RecipeSettings(args.per_device_train_batch_size, args.gradient_accumulation_steps,
                                        args.max_grad_norm or None))
    except (GlueDataError, ModelNotFoundError, FileNotFoundError, ConfigError) as err:
        # A user's input, not our bug: one clear line instead of a stack trace.
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    try:
        return train(args, raw, model_path, checkpoint, preemption)
    except TooManySkippedUpdates as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(3)
    except Preempted as err:  # the checkpoint is complete; a requeued job resumes with --resume_from_checkpoint latest
        print(f"preempted: {err}", file=sys.stderr)
        sys.exit(PREEMPTED_EXIT_CODE)


if __name__ == "__main__":
    main()
