"""Fine-tune an encoder-decoder (T5, BART: any AutoModelForSeq2SeqLM) text-to-text with AdaptOpt (or any
baseline), via accelerate, and score what it generates.

GLUE as T5 is fine-tuned on it: the input is T5's text ("mrpc sentence1: ... sentence2: ..."), the target the
label's name ("equivalent" / "not_equivalent"; STS-B: the score rounded to 0.2, "3.8"); evaluation generates,
maps each answer back to a label and reports the task's official GLUE metric (adaptopt/data/text2text.py):
    accelerate launch recipes/seq2seq.py --model_name_or_path google-t5/t5-small --task_name mrpc \\
        --data_dir $GLUE_DIR --learning_rate 3e-4 --output_dir runs/t5-mrpc
Any source/target pairs (.jsonl, one {"source": ..., "target": ...} object per line), scored by SQuAD's exact
match and F1 of the generated text against the target:
    accelerate launch recipes/seq2seq.py --model_name_or_path google-t5/t5-small --train_file train.jsonl \\
        --validation_file valid.jsonl --source_prefix "question: " --output_dir runs/pairs
N processes on one machine (DDP; on a CPU-only machine prefix ACCELERATE_USE_CPU=true):
    accelerate launch --multi_gpu --num_processes 2 recipes/seq2seq.py ...
DeepSpeed ZeRO (ds_configs/README.md), one or several machines (launch/run.py also works without a GPU); under
ZeRO-3 every rank takes part in each generation step (synced_gpus), as its shard of the weights is needed:
    accelerate launch --config_file launch/deepspeed_single_node.yaml \\
        --deepspeed_config_file ds_configs/zero3.json --mixed_precision bf16 recipes/seq2seq.py ...

Generation is greedy (--num_beams 1; more is beam search), at most --generation_max_length new tokens: for GLUE
the longest label's encoding, so an answer that does not stop after a label is invalid. A GLUE answer that is
no label is counted (invalid_answers in results.json) and scored as wrong. Writes <output_dir>/results.json
(the metrics, train time, samples/s, the memory report), <output_dir>/predictions_<split>.jsonl (each
example's generated text and target, rewritten at every evaluation) and checkpoints under
<output_dir>/checkpoints; --save_model writes the model (the adapters with --lora) to <output_dir>/model.
T5 is known to overflow in fp16: train it in bf16 or fp32.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# Runnable as a plain script from a checkout: make the repository's adaptopt importable.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from accelerate.logging import get_logger  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

import adaptopt.metrics  # noqa: E402
from adaptopt import cli  # noqa: E402
from adaptopt.data.glue import GLUE_TASKS, GlueDataError, check_glue_source, load_glue  # noqa: E402
from adaptopt.data.text2text import (STSB_TARGETS, AnswerMap, Text2TextDataError, glue_as_text2text,  # noqa: E402
                                     load_pairs, round_trip)
from adaptopt.data.length_grouping import add_group_by_length_args, groups_by_length, training_order  # noqa: E402
from adaptopt.models import ModelNotFoundError, load_kwargs, model_label, resolve_model  # noqa: E402
from adaptopt.preemption import PreemptionSignal  # noqa: E402
from adaptopt.training import RecipeRun, check_run_inputs, run_main  # noqa: E402

logger = get_logger(__name__)
SQUAD_METRIC = str(Path(adaptopt.metrics.__file__).with_name("squad_metric.py"))  # an offline `evaluate` module
PAIRS_TARGET_LENGTH = 128  # default --max_target_length for source/target pairs (HF run_summarization's)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = parser.add_argument_group("task and data")
    g.add_argument("--task_name", default=None, choices=list(GLUE_TASKS),
                   help="a GLUE task, written as T5 writes it; without it: --train_file/--validation_file pairs")
    g.add_argument("--data_dir", default=None, help="GLUE: folder holding CoLA/, SST-2/, ... (default: $GLUE_DIR)")
    g.add_argument("--train_file", default=None,
                   help="with --task_name: a GLUE csv/json file (text columns + label); without: .jsonl pairs")
    g.add_argument("--validation_file", default=None, help="the evaluation file, in the same format")
    g.add_argument("--dataset_name", default=None, help="GLUE from the hub, e.g. nyu-mll/glue (needs the hub)")
    g.add_argument("--source_column", default="source", help="pairs: the JSON field holding the input text")
    g.add_argument("--target_column", default="target", help="pairs: the JSON field holding the text to generate")
    g.add_argument("--source_prefix", default="",
                   help='pairs: text put before every source, e.g. "summarize: " (GLUE sources carry the task name)')
    g.add_argument("--max_train_samples", type=int, default=None,
                   help="train on a random subsample of this many examples (seeded; evaluation stays whole)")
    g.add_argument("--max_eval_samples", type=int, default=None, help="evaluate on the first N examples")
    g.add_argument("--max_source_length", type=int, default=512, help="input tokens after truncation (T5's 512)")
    add_group_by_length_args(g, default=False)  # off until a dev metric with grouping is checked for this recipe
    g.add_argument("--max_target_length", type=int, default=None,
                   help=f"pairs: target tokens after truncation (default {PAIRS_TARGET_LENGTH}); GLUE targets are "
                        "label names, never cut")
    g = parser.add_argument_group("generation")
    g.add_argument("--num_beams", type=int, default=1, help="1: greedy decoding; more: beam search of this width")
    g.add_argument("--generation_max_length", type=int, default=None,
                   help="new tokens at most (default: GLUE, the longest label's encoding; pairs, "
                        "--max_target_length)")
    g = parser.add_argument_group("model")
    g.add_argument("--model_name_or_path", default=None,
                   help="AutoModelForSeq2SeqLM folder or hub name (google-t5/t5-small, facebook/bart-base, ...)")
    g.add_argument("--tokenizer_name", default=None, help="tokenizer folder or hub name (default: the model's)")
    cli.add_optimization_args(parser)
    cli.add_run_args(parser)
    args = parser.parse_args(argv)

    cli.check_shared_args(parser, args)
    if not args.model_name_or_path:
        parser.error("--model_name_or_path is required: an encoder-decoder folder or hub name (e.g. "
                     "google-t5/t5-small); no text-to-text model ships with the package")
    for name in ("num_beams", "max_source_length", "max_target_length", "generation_max_length"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1 (got {getattr(args, name)})")
    if args.task_name:
        _check_glue_sources(parser, args)
    else:
        given = [f"--{f}" for f in ("data_dir", "dataset_name") if getattr(args, f)]
        if given:
            parser.error(f"{' and '.join(given)}: GLUE data, which needs --task_name; without a task the data are "
                         "--train_file/--validation_file .jsonl pairs")
        if not (args.train_file and args.validation_file):
            parser.error("no data: pass --task_name (a GLUE task, data from --data_dir or $GLUE_DIR), or "
                         "--train_file and --validation_file (.jsonl, one {\"source\": ..., \"target\": ...} per line)")
        args.max_target_length = args.max_target_length or PAIRS_TARGET_LENGTH
    return args


def _check_glue_sources(parser, args) -> None:
    if args.source_prefix:
        parser.error("--source_prefix is for --train_file pairs; GLUE sources start with T5's task name")
    if args.max_target_length is not None:
        parser.error("--max_target_length is for --train_file pairs; GLUE targets are label names, never cut")
    check_glue_source(parser, args)


def resolve_model_and_tokenizer(args):
    """(what to pass to from_pretrained, the tokenizer). Raises ModelNotFoundError unless the model is an
    encoder-decoder whose vocabulary holds every token of the tokenizer, and the tokenizer pads."""
    from transformers import AutoConfig, AutoTokenizer

    model_path = resolve_model(args.model_name_or_path)
    config = AutoConfig.from_pretrained(model_path, trust_remote_code=args.trust_remote_code)
    if not config.is_encoder_decoder:
        raise ModelNotFoundError(f"{args.model_name_or_path} is a {config.model_type} model, not an encoder-decoder: "
                                 "this recipe trains AutoModelForSeq2SeqLM models (T5, BART, ...); train decoder-only "
                                 "models with recipes/clm.py")
    name = args.tokenizer_name
    tokenizer_path = (name if Path(name).expanduser().is_dir() else resolve_model(name)) if name else model_path
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path, trust_remote_code=args.trust_remote_code)
    if tokenizer.pad_token_id is None:
        raise ModelNotFoundError(f"the tokenizer of {tokenizer_path} has no padding token; pass a --tokenizer_name "
                                 "that has one")
    if len(tokenizer) > config.vocab_size:
        raise ModelNotFoundError(f"the tokenizer has {len(tokenizer)} tokens but the model's vocabulary only "
                                 f"{config.vocab_size}: pass the tokenizer the model was trained with")
    return model_path, tokenizer


def load_data(args):
    """DatasetDict of source, target, idx (and label for GLUE), with a seeded training subsample if asked."""
    if args.task_name:
        raw = load_glue(args.task_name, data_dir=args.data_dir, train_file=args.train_file,
                        validation_file=args.validation_file, hub_name=args.dataset_name)
        if "train" not in raw:
            raise GlueDataError(f"{args.task_name}: the data has no training split (e.g. QNLI here ships only "
                                "dev.tsv): pass a --train_file or a --data_dir whose task folder has train.tsv")
        raw = glue_as_text2text(args.task_name, raw)
    else:
        raw = load_pairs(args.train_file, args.validation_file, source_column=args.source_column,
                         target_column=args.target_column, source_prefix=args.source_prefix)
    if args.max_train_samples is not None and args.max_train_samples < len(raw["train"]):
        raw["train"] = raw["train"].shuffle(seed=args.seed).select(range(args.max_train_samples))
    if args.max_eval_samples is not None:
        for split in eval_splits(args):
            raw[split] = raw[split].select(range(min(args.max_eval_samples, len(raw[split]))))
    return raw


def eval_splits(args) -> tuple[str, ...]:
    return GLUE_TASKS[args.task_name].validation_splits if args.task_name else ("validation",)


def target_length(args, tokenizer) -> int:
    """Target tokens: for GLUE the longest label's encoding (special tokens included), else --max_target_length."""
    if not args.task_name:
        return args.max_target_length
    task = GLUE_TASKS[args.task_name]
    words = STSB_TARGETS if task.is_regression else task.label_names
    return max(len(tokenizer(text_target=w)["input_ids"]) for w in words)


def build_dataloaders(args, raw, tokenizer, max_target: int):
    from transformers import DataCollatorForSeq2Seq

    def tokenize(batch):
        out = tokenizer(batch["source"], max_length=args.max_source_length, truncation=True,
                        return_token_type_ids=False)  # T5 and BART take no token types; BERT tokenizers make them
        out["labels"] = tokenizer(text_target=batch["target"], max_length=max_target, truncation=True,
                                  return_token_type_ids=False, return_attention_mask=False)["input_ids"]
        return out

    tokenized = raw.map(tokenize, batched=True, desc="tokenizing",
                        remove_columns=[c for c in raw["train"].column_names if c != "idx"])
    # labels padded with -100 (no loss); the model shifts them right into its decoder inputs itself
    collate = DataCollatorForSeq2Seq(tokenizer, pad_to_multiple_of=8 if args.mixed_precision != "no" else None)
    # The loader's own generator keeps the global RNG (restored on resume) free for dropout: glue.py says why.
    train_set = tokenized["train"].remove_columns("idx")  # grouped by source length (the encoder's share)
    train = DataLoader(train_set, collate_fn=collate, batch_size=args.per_device_train_batch_size,
                       generator=torch.Generator().manual_seed(args.seed), **training_order(args, train_set))
    # idx comes back with each generated answer: it proves coverage and finds the reference
    evals = {split: DataLoader(tokenized[split].remove_columns("labels"), collate_fn=collate,
                               batch_size=args.per_device_eval_batch_size) for split in eval_splits(args)}
    return train, evals


def generate_split(accelerator, model, dataloader, tokenizer, generation: dict, split: str) -> list[str]:
    """The generated text of every example of the split, in idx order, under any number of processes.

    Each rank generates its shard; the token rows are padded to one width across ranks so they can be
    gathered, and gather_for_metrics drops the duplicates that pad the last batch."""
    texts, seen = [], []
    generator = accelerator.unwrap_model(model)  # DDP and DeepSpeed engines have no generate()
    for batch in dataloader:
        idx = batch.pop("idx")
        tokens = generator.generate(**batch, **generation)
        tokens = accelerator.pad_across_processes(tokens, dim=1, pad_index=tokenizer.pad_token_id)
        tokens, idx = accelerator.gather_for_metrics((tokens, idx))
        texts += tokenizer.batch_decode(tokens, skip_special_tokens=True)
        seen.append(idx.cpu())
    seen = torch.cat(seen)
    expected = len(dataloader.dataset)
    # Every example exactly once, on every world size: otherwise the metric is not the split's.
    if len(seen) != expected or len(torch.unique(seen)) != expected:
        raise RuntimeError(f"{split}: generated for {len(seen)} rows ({len(torch.unique(seen))} distinct) "
                           f"of {expected}")
    order = torch.argsort(seen).tolist()
    return [texts[i] for i in order]


def score_split(texts, rows, metric, answers: AnswerMap | None, tokenizer) -> tuple[dict, list[dict]]:
    """(metrics, one record per example for predictions_<split>.jsonl) of a split's generated texts, in idx order.

    GLUE (``answers`` given): the official GLUE metric and the number of invalid answers. Pairs: SQuAD's
    exact match and F1, against the target as the tokenizer writes it back (an uncased tokenizer cannot
    generate capitals)."""
    ids, targets = list(rows["idx"]), list(rows["target"])
    records = [dict(idx=i, prediction=t, target=target) for i, t, target in zip(ids, texts, targets, strict=True)]
    if answers is not None:
        labels = list(rows["label"])
        predictions, invalid = answers.score(texts, labels)
        result = metric.compute(predictions=predictions, references=labels)
        for record in records:
            record["valid"] = answers.label(record["prediction"]) is not None
        return {**{k: float(v) for k, v in result.items()}, "invalid_answers": invalid}, records
    result = metric.compute(
        predictions=[{"id": str(i), "prediction_text": t} for i, t in zip(ids, texts)],
        references=[{"id": str(i), "answers": {"text": [round_trip(tokenizer, t)], "answer_start": [0]}}
                    for i, t in zip(ids, targets)])
    return {k: float(v) for k, v in result.items()}, records


def train(args, raw, tokenizer, answers: AnswerMap | None, model_path: str, checkpoint: Path | None,
          preemption: PreemptionSignal | None = None) -> dict:
    run = RecipeRun(args, project="seq2seq")
    acc = run.accelerator

    from transformers import AutoModelForSeq2SeqLM

    logger.info(f"model: {model_path}")
    with run.model_loading():
        model = AutoModelForSeq2SeqLM.from_pretrained(model_path, trust_remote_code=args.trust_remote_code,
                                                      **load_kwargs(args))
    model = run.training_model(model, "SEQ_2_SEQ_LM")
    max_target = target_length(args, tokenizer)
    train_dl, eval_dls = build_dataloaders(args, raw, tokenizer, max_target)
    model, eval_dls = run.prepare(model, train_dl, eval_dls)

    import evaluate

    task = GLUE_TASKS.get(args.task_name)
    if task:
        from adaptopt.metrics import glue_metric_path

        metrics = {s: evaluate.load(glue_metric_path(), config_name=_metric_config(task, s)) for s in eval_dls}
    else:
        metrics = {s: evaluate.load(SQUAD_METRIC) for s in eval_dls}
    generation = dict(
        num_beams=args.num_beams, do_sample=False,
        max_new_tokens=args.generation_max_length or max_target,
        # ZeRO-3: each forward gathers every rank's shard, so a rank whose answers ended early keeps stepping
        synced_gpus=run.ds_run is not None and run.ds_run.stage == 3 and acc.num_processes > 1,
    )
    logger.info(f"generation: {generation}")

    def run_eval():
        results = {}
        for split, dl in eval_dls.items():
            texts = generate_split(acc, model, dl, tokenizer, generation, split)
            scores, records = score_split(texts, raw[split], metrics[split], answers, tokenizer)
            prefix = "" if len(eval_dls) == 1 else f"{split}_"
            results.update({prefix + k: v for k, v in scores.items()})
            if acc.is_main_process:
                Path(args.output_dir).mkdir(parents=True, exist_ok=True)
                with open(Path(args.output_dir) / f"predictions_{split}.jsonl", "w") as f:
                    f.writelines(json.dumps(r) + "\n" for r in records)
        return results

    run.resume(checkpoint)
    primary = task.metrics[0] if task else "exact_match"
    results = run.fit(run_eval, primary if len(eval_dls) == 1 else f"{next(iter(eval_dls))}_{primary}", preemption)
    summary = run.summary(results, task=args.task_name or "text2text", model=model_label(args.model_name_or_path),
                          eval_samples={s: len(dl.dataset) for s, dl in eval_dls.items()},
                          num_beams=args.num_beams, generation_max_length=generation["max_new_tokens"],
                          group_by_length=groups_by_length(args))
    return run.finish(summary, tokenizer)


def _metric_config(task, split: str) -> str:
    if task.name == "mnli":
        return "mnli_mismatched" if split.endswith("mismatched") else "mnli_matched"
    return task.name


def main(argv=None) -> dict:
    def setup():
        # Everything a user can get wrong is checked here, on every rank, before any process group exists.
        args = parse_args(argv)
        model_path, tokenizer = resolve_model_and_tokenizer(args)
        raw = load_data(args)
        # raises if the tokenizer writes two labels back as one text
        answers = AnswerMap(GLUE_TASKS[args.task_name], tokenizer) if args.task_name else None
        return args, raw, tokenizer, answers, model_path, check_run_inputs(args)

    return run_main(setup, train, input_errors=(GlueDataError, Text2TextDataError))


if __name__ == "__main__":
    main()
