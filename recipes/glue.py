"""Fine-tune a sequence classifier on a GLUE task with AdaptOpt (or any baseline), via accelerate.

One process (CPU or one GPU):
    accelerate launch recipes/glue.py --task_name mrpc --data_dir $GLUE_DIR --output_dir runs/mrpc
N processes on one machine (DDP; on a CPU-only machine prefix ACCELERATE_USE_CPU=true):
    accelerate launch --multi_gpu --num_processes 2 recipes/glue.py --task_name mrpc ...
DeepSpeed ZeRO (ds_configs/README.md), one or several machines: the backend comes from an accelerate
config, not from this file (launch/run.py runs the same command on a CPU-only machine):
    accelerate launch --config_file launch/deepspeed_single_node.yaml \\
        --deepspeed_config_file ds_configs/zero2.json --mixed_precision bf16 recipes/glue.py ...

With no --model_name_or_path, the model is the pip-shipped all-MiniLM-L6-v2 (no hub needed). Data:
--data_dir (or $GLUE_DIR) in the original GLUE TSV layout, --train_file/--validation_file (csv/json),
or --dataset_name nyu-mll/glue when online. Writes <output_dir>/results.json with the final dev metrics,
the last epoch's mean training loss, train time, samples/s and peak memory; checkpoints under
<output_dir>/checkpoints.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

# Runnable as a plain script from a checkout: make the repository's adaptopt importable.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from accelerate.logging import get_logger  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from adaptopt import cli  # noqa: E402
from adaptopt.data.glue import GLUE_TASKS, GlueDataError, check_glue_source, load_glue  # noqa: E402
from adaptopt.data.length_grouping import add_group_by_length_args, groups_by_length, training_order  # noqa: E402
from adaptopt.models import load_kwargs, model_label, resolve_model  # noqa: E402
from adaptopt.pooling import POOLINGS, PoolingError, apply_classifier_pooling  # noqa: E402
from adaptopt.preemption import PreemptionSignal  # noqa: E402
from adaptopt.training import RecipeRun, check_run_inputs, run_main  # noqa: E402

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
    add_group_by_length_args(g, default=True)
    g = parser.add_argument_group("model")
    g.add_argument("--model_name_or_path", default=None,
                   help="AutoModelForSequenceClassification name or path (default: embedded all-MiniLM-L6-v2)")
    g.add_argument("--ignore_mismatched_sizes", action="store_true",
                   help="replace a checkpoint's classifier head of another size (e.g. fine-tuned on another task)")
    g.add_argument("--classifier_pooling", choices=POOLINGS, default=None,
                   help="what the classifier reads: cls (the [CLS] pooler, transformers' default) or mean (masked "
                        "mean of the token states, how all-MiniLM-L6-v2 was trained; BERT-style models). "
                        "Default: the model config's classifier_pooling, else cls")
    cli.add_optimization_args(parser)
    cli.add_run_args(parser)
    args = parser.parse_args(argv)

    cli.check_shared_args(parser, args)
    check_glue_source(parser, args)
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
    train_set = tokenized["train"].remove_columns("idx")
    # The loader's own generator: creating an iterator draws a seed from it, and drawing from the global
    # RNG instead would shift every later dropout mask of a resumed run (it restores the global RNG).
    train = DataLoader(train_set, collate_fn=collate, batch_size=args.per_device_train_batch_size,
                       generator=torch.Generator().manual_seed(args.seed), **training_order(args, train_set))
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


def train(args, raw, model_path: str, checkpoint: Path | None, preemption: PreemptionSignal | None = None) -> dict:
    run = RecipeRun(args, project="glue")
    task = GLUE_TASKS[args.task_name]

    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    logger.info(f"model: {model_path}")
    tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=args.trust_remote_code)
    with run.model_loading():
        model = AutoModelForSequenceClassification.from_pretrained(
            model_path, num_labels=task.num_labels, trust_remote_code=args.trust_remote_code,
            problem_type="regression" if task.is_regression else "single_label_classification",
            ignore_mismatched_sizes=args.ignore_mismatched_sizes, **load_kwargs(args),
        )
    model = apply_classifier_pooling(model, args.classifier_pooling)
    logger.info(f"classifier pooling: {model.config.classifier_pooling}")
    model = run.training_model(model, "SEQ_CLS")
    train_dl, eval_dls = build_dataloaders(args, raw, tokenizer)
    model, eval_dls = run.prepare(model, train_dl, eval_dls)

    import evaluate

    from adaptopt.metrics import glue_metric_path

    metrics = {split: evaluate.load(glue_metric_path(), config_name=_metric_config(task, split)) for split in eval_dls}

    def run_eval():
        results = {}
        for split, dl in eval_dls.items():
            prefix = "" if len(eval_dls) == 1 else f"{split}_"
            for k, v in evaluate_split(run.accelerator, model, dl, metrics[split], task, split).items():
                results[prefix + k] = v
        return results

    run.resume(checkpoint)
    results = run.fit(run_eval, _primary_metric(task, eval_dls), preemption)
    summary = run.summary(results, task=args.task_name, model=model_label(args.model_name_or_path),
                          group_by_length=groups_by_length(args),
                          eval_samples={s: len(dl.dataset) for s, dl in eval_dls.items()})
    return run.finish(summary, tokenizer)


def _metric_config(task, split: str) -> str:
    if task.name == "mnli":
        return "mnli_mismatched" if split.endswith("mismatched") else "mnli_matched"
    return task.name


def _primary_metric(task, eval_dls) -> str:
    prefix = "" if len(eval_dls) == 1 else f"{next(iter(eval_dls))}_"
    return prefix + task.metrics[0]


def main(argv=None) -> dict:
    def setup():
        args = parse_args(argv)
        return args, load_data(args), resolve_model(args.model_name_or_path), check_run_inputs(args)

    return run_main(setup, train, input_errors=(GlueDataError, PoolingError))


if __name__ == "__main__":
    main()
