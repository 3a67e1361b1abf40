"""Fine-tune an extractive question-answering model on SQuAD v1.1 or v2.0 with AdaptOpt (or a baseline), via accelerate.

One process (CPU or one GPU), on the SQuAD files here (../shared/data/squad: the official dev set in
two halves by article, one to train on and one to evaluate on; see its README):
    accelerate launch recipes/squad.py --train_file ../shared/data/squad/test-v1.1-part.json \
        --validation_file ../shared/data/squad/dev-v1.1-part.json --output_dir runs/squad
N processes on one machine (DDP; on a CPU-only machine prefix ACCELERATE_USE_CPU=true):
    accelerate launch --multi_gpu --num_processes 2 recipes/squad.py ...
DeepSpeed ZeRO (ds_configs/README.md), one or several machines: the backend comes from an accelerate
config, not from this file (launch/run.py runs the same command on a CPU-only machine):
    accelerate launch --config_file launch/deepspeed_single_node.yaml \
        --deepspeed_config_file ds_configs/zero2.json --mixed_precision bf16 recipes/squad.py ...

With no --model_name_or_path, the model is the pip-shipped all-MiniLM-L6-v2 with a new span head (no
hub needed). Data: official SQuAD v1.1 JSON files (or flat json/jsonl rows in the HF ``squad``
schema), or --dataset_name rajpurkar/squad when online. Contexts longer than --max_seq_length are
read in overlapping windows (adaptopt/data/squad.py). Writes <output_dir>/results.json (SQuAD exact
match and F1 in percent, as the official script reports them, train time, samples/s, peak memory),
<output_dir>/predictions.json ({question id: answer}, the input of the official evaluate-v1.1.py)
and checkpoints under <output_dir>/checkpoints.

SQuAD v2.0 (unanswerable questions) with --version_2_with_negative. The flag is set by itself when
--train_file or --validation_file is an official-layout file that says "version": "v2.0" or marks a
question "is_impossible": true; flat json/jsonl rows (where an empty answers list means unanswerable)
and hub datasets (--dataset_name rajpurkar/squad_v2) need it given. Unanswerable questions are
labelled at the [CLS] token of every window; a question's answer is "" (no answer) when its null
score (the lowest [CLS] start + end logit over its windows) beats the best span's score by more than
--null_score_diff_threshold, as HF's run_qa_no_trainer.py does. results.json then holds the official
evaluate-v2.0.py figures, with its "exact" named exact_match as for v1.1: exact_match, f1, total and
HasAns_exact/_f1/_total (answerable questions), NoAns_exact/_f1/_total (unanswerable ones), each group
only when it has questions; predictions.json is the input of the official evaluate-v2.0.py.
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
from adaptopt.data.squad import (SquadDataError, best_answers, check_tokenizer, eval_features,  # noqa: E402
                                 is_squad_v2_file, load_squad, train_features)
from adaptopt.data.length_grouping import add_group_by_length_args, groups_by_length, training_order  # noqa: E402
from adaptopt.models import load_kwargs, model_label, resolve_model  # noqa: E402
from adaptopt.preemption import PreemptionSignal  # noqa: E402
from adaptopt.training import RecipeRun, check_run_inputs, run_main  # noqa: E402

logger = get_logger(__name__)
SQUAD_METRIC = str(Path(adaptopt.metrics.__file__).with_name("squad_metric.py"))  # an offline `evaluate` module


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = parser.add_argument_group("data")
    g.add_argument("--train_file", default=None, help="SQuAD v1.1 or v2.0 JSON (or flat json/jsonl) to train on")
    g.add_argument("--validation_file", default=None,
                   help="SQuAD v1.1 or v2.0 JSON (or flat json/jsonl) to evaluate on")
    g.add_argument("--dataset_name", default=None, help="hub dataset with train/validation, e.g. rajpurkar/squad")
    g.add_argument("--version_2_with_negative", action="store_true",
                   help="SQuAD v2.0: questions may be unanswerable (no answers), and the model may answer nothing. "
                        "Set by itself when --train_file or --validation_file is an official-layout SQuAD file "
                        "with \"version\": \"v2.0\" or an \"is_impossible\": true question; flat json/jsonl "
                        "rows and --dataset_name (e.g. rajpurkar/squad_v2) need it given")
    g.add_argument("--max_train_samples", type=int, default=None,
                   help="train on a random subsample of this many questions (seeded; evaluation stays whole)")
    g.add_argument("--max_eval_samples", type=int, default=None, help="evaluate on the first N questions")
    g.add_argument("--max_seq_length", type=int, default=384, help="tokens per window (question + context)")
    g.add_argument("--doc_stride", type=int, default=128, help="tokens two windows of one context overlap by")
    g.add_argument("--max_question_length", type=int, default=64,
                   help="longer questions are cut to this many tokens (BERT's max_query_length)")
    g.add_argument("--pad_to_max_length", action="store_true", help="pad to --max_seq_length instead of per batch")
    # off until SQuAD's dev F1 with grouping is checked (random windows pad to about 1.9x their tokens, grouped 1.08x)
    add_group_by_length_args(g, default=False)
    g = parser.add_argument_group("answers")
    g.add_argument("--n_best_size", type=int, default=20, help="start and end candidates per window")
    g.add_argument("--max_answer_length", type=int, default=30, help="longest answer, in tokens")
    g.add_argument("--null_score_diff_threshold", type=float, default=0.0,
                   help="SQuAD v2.0: answer nothing when the null score (the lowest [CLS] start + end logit over "
                        "a question's windows) exceeds the best span's start + end logit by more than this")
    g = parser.add_argument_group("model")
    g.add_argument("--model_name_or_path", default=None,
                   help="AutoModelForQuestionAnswering name or path (default: embedded all-MiniLM-L6-v2)")
    cli.add_optimization_args(parser)
    cli.add_run_args(parser)
    args = parser.parse_args(argv)

    cli.check_shared_args(parser, args)
    if args.dataset_name and (args.train_file or args.validation_file):
        parser.error("give one data source: --dataset_name, or --train_file and --validation_file")
    if not args.dataset_name and not (args.train_file and args.validation_file):
        parser.error("no data: pass --train_file and --validation_file (SQuAD v1.1 or v2.0 JSON, e.g. "
                     "../shared/data/squad/test-v1.1-part.json and dev-v1.1-part.json), or --dataset_name")
    for name in ("max_seq_length", "doc_stride", "max_question_length", "n_best_size", "max_answer_length"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1 (got {getattr(args, name)})")
    if args.doc_stride >= args.max_seq_length:
        parser.error(f"--doc_stride ({args.doc_stride}) must be smaller than --max_seq_length ({args.max_seq_length})")
    if not args.version_2_with_negative:  # official-layout v2.0 files say so themselves
        args.version_2_with_negative = any(is_squad_v2_file(f) for f in (args.train_file, args.validation_file) if f)
    return args


def load_data(args):
    """The train and validation questions, with a seeded training subsample if asked. Raises SquadDataError."""
    raw = load_squad(args.train_file, args.validation_file, hub_name=args.dataset_name,
                     version_2_with_negative=args.version_2_with_negative)
    for split in ("train", "validation"):
        if split not in raw:
            raise SquadDataError(f"{args.dataset_name}: no {split!r} split (it has {', '.join(raw)})")
    if args.max_train_samples is not None and args.max_train_samples < len(raw["train"]):
        raw["train"] = raw["train"].shuffle(seed=args.seed).select(range(args.max_train_samples))
    if args.max_eval_samples is not None:
        raw["validation"] = raw["validation"].select(range(min(args.max_eval_samples, len(raw["validation"]))))
    return raw


def build_dataloaders(args, raw, tokenizer):
    """Training windows with answer labels; evaluation windows (kept whole for decoding) and their loader."""
    window = dict(max_length=args.max_seq_length, stride=args.doc_stride, max_question_length=args.max_question_length,
                  padding="max_length" if args.pad_to_max_length else False)
    columns = raw["train"].column_names
    train_windows = raw["train"].map(lambda b: train_features(b, tokenizer, **window), batched=True,
                                     remove_columns=columns, desc="training windows")
    eval_windows = raw["validation"].map(lambda b, i: eval_features(b, tokenizer, indices=i, **window), batched=True,
                                         with_indices=True, remove_columns=columns, desc="evaluation windows")
    # feature_idx lets evaluation check that every window is scored once, and put logits back in order.
    eval_windows = eval_windows.add_column("feature_idx", list(range(len(eval_windows))))
    from transformers import DataCollatorWithPadding, default_data_collator

    if args.pad_to_max_length:
        collate = default_data_collator
    else:  # dynamic padding; multiples of 8 let tensor cores work under fp16/bf16
        collate = DataCollatorWithPadding(tokenizer, pad_to_multiple_of=8 if args.mixed_precision != "no" else None)
    # The loader's own generator: drawing its seed from the global RNG instead would shift every later
    # dropout mask of a resumed run (it restores the global RNG).
    train = DataLoader(train_windows, collate_fn=collate, batch_size=args.per_device_train_batch_size,
                       generator=torch.Generator().manual_seed(args.seed), **training_order(args, train_windows))
    model_inputs = [c for c in tokenizer.model_input_names if c in eval_windows.column_names]
    evaluation = DataLoader(eval_windows.select_columns([*model_inputs, "feature_idx"]), collate_fn=collate,
                            batch_size=args.per_device_eval_batch_size)
    return train, eval_windows, evaluation


def window_logits(accelerator, model, dataloader) -> tuple[list, list]:
    """Start and end logits of every evaluation window, from all ranks, put in window order by feature_idx
    (whatever order the loader's sharding gathers them in).

    gather_for_metrics drops the padding duplicates of the last batch; every window must come back once."""
    n = len(dataloader.dataset)
    starts, ends, seen = [None] * n, [None] * n, []
    for batch in dataloader:
        idx = batch.pop("feature_idx")
        out = model(**batch)
        # With dynamic padding each rank's batch has its own length: pad to the longest before gathering.
        # Padding is cut off again in decoding (best_answers reads only a window's own tokens).
        logits = [accelerator.pad_across_processes(t.float(), dim=1, pad_index=-1e4)
                  for t in (out.start_logits, out.end_logits)]
        start, end, idx = accelerator.gather_for_metrics((*logits, idx))
        for i, s, e in zip(idx.tolist(), start.cpu().numpy(), end.cpu().numpy()):
            starts[i], ends[i] = s, e
        seen.append(idx.cpu())
    seen = torch.cat(seen)
    if len(seen) != n or len(torch.unique(seen)) != n:
        raise RuntimeError(f"evaluated {len(seen)} windows ({len(torch.unique(seen))} distinct) of {n}")
    return starts, ends


def train(args, raw, model_path: str, checkpoint: Path | None, preemption: PreemptionSignal | None = None) -> dict:
    run = RecipeRun(args, project="squad")

    from transformers import AutoModelForQuestionAnswering, AutoTokenizer

    logger.info(f"model: {model_path}")
    tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=args.trust_remote_code)
    with run.model_loading():
        model = AutoModelForQuestionAnswering.from_pretrained(model_path, trust_remote_code=args.trust_remote_code,
                                                              **load_kwargs(args))
    model = run.training_model(model, "QUESTION_ANS")
    train_dl, eval_windows, eval_dl = build_dataloaders(args, raw, tokenizer)
    logger.info(f"{len(raw['train'])} training questions -> {len(train_dl.dataset)} windows; "
                f"{len(raw['validation'])} evaluation questions -> {len(eval_windows)} windows")
    model, eval_dls = run.prepare(model, train_dl, {"validation": eval_dl})

    import evaluate

    v2 = args.version_2_with_negative
    if v2:
        unanswerable = {split: sum(not a["text"] for a in raw[split]["answers"]) for split in ("train", "validation")}
        logger.info(f"SQuAD v2.0: {unanswerable['train']} training and {unanswerable['validation']} evaluation "
                    f"questions unanswerable; null score threshold {args.null_score_diff_threshold}")
    metric = evaluate.load(SQUAD_METRIC, config_name="squad_v2") if v2 else evaluate.load(SQUAD_METRIC)
    references = [{"id": r["id"], "answers": r["answers"]} for r in raw["validation"]]
    predictions: dict[str, str] = {}

    def run_eval():
        starts, ends = window_logits(run.accelerator, model, eval_dls["validation"])
        predictions.clear()
        predictions.update(best_answers(raw["validation"], eval_windows, starts, ends,
                                        n_best=args.n_best_size, max_answer_length=args.max_answer_length,
                                        version_2_with_negative=v2,
                                        null_score_diff_threshold=args.null_score_diff_threshold))
        scores = metric.compute(predictions=[{"id": k, "prediction_text": v} for k, v in predictions.items()],
                                references=references)
        if v2:  # the official v2.0 "exact" under the v1.1 name, so that downstream tools read one name
            scores = {"exact_match": scores.pop("exact"), **scores}
        return scores

    run.resume(checkpoint)
    results = run.fit(run_eval, "f1", preemption)
    if run.accelerator.is_main_process:  # the answers behind the final metrics, for the official script
        Path(args.output_dir).mkdir(parents=True, exist_ok=True)
        Path(args.output_dir, "predictions.json").write_text(json.dumps(predictions, indent=1))
    fields = dict(task="squad_v1.1", model=model_label(args.model_name_or_path), eval_samples=len(raw["validation"]),
                  eval_windows=len(eval_windows), train_questions=len(raw["train"]),
                  max_seq_length=args.max_seq_length, doc_stride=args.doc_stride, group_by_length=groups_by_length(args))
    if v2:
        fields.update(task="squad_v2.0", null_score_diff_threshold=args.null_score_diff_threshold)
    summary = run.summary(results, **fields)
    return run.finish(summary, tokenizer)


def main(argv=None) -> dict:
    def setup():
        args = parse_args(argv)
        model_path = resolve_model(args.model_name_or_path)
        check_tokenizer(model_path, args.max_seq_length, args.doc_stride, args.trust_remote_code)
        return args, load_data(args), model_path, check_run_inputs(args)

    return run_main(setup, train, input_errors=(SquadDataError,))


if __name__ == "__main__":
    main()
