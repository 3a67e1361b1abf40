"""Training throughput of recipes/glue.py against HF transformers' own Trainer, measured in one run.

Both fine-tune the same model (default: the embedded all-MiniLM-L6-v2) on the same SST-2 training
subsample with the same batch size, sequence handling (truncate to --max_length, dynamic padding per
batch), precision (fp32), seed and number of optimizer updates, in one process on this machine. Each runs
at its defaults: the Trainer with its default optimizer (optim="adamw_torch_fused": torch's fused AdamW)
and batches drawn uniformly at random (group_by_length=False); the recipe with adaptopt (--optimizer_impl
auto: the native C++ update on the CPU, the compiled update on a GPU) and batches grouped by length
(--group_by_length, its default). Other recipe rows: adamw (auto gives it the Trainer's fused kernel),
adaptopt's eager update (--optimizer_impl eager), and the default with random batches
(--no_group_by_length), which separates what grouping gives from the rest. Throughput is training samples
per second of wall time in the training loop (evaluation and checkpointing excluded for both).

The update's one-time build (the native kernel's, or the compiled update's compilation; both cached on
disk) happens while the recipe sets up, in its check that it works, before the loop. So the script also times that
check in a fresh process and reports "recipe_adaptopt + compile": the default recipe with that time
counted as training time.

Run to run, one configuration moves by about 10% on these machines, so the script runs all of them
--rounds times, interleaved (Trainer, recipe variants, Trainer, ...), and reports the median and range.

    HF_HUB_OFFLINE=1 python benchmarks/glue_throughput.py --data_dir ../shared/data/glue --steps 200 --rounds 3

The last line states the recipe's default samples/s (adaptopt, no optimizer flags) as a ratio to the
Trainer's, on the medians: in the training loop, and counting the compile before it.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from adaptopt.launch import launcher_args, run_recipe  # noqa: E402


def hf_trainer_samples_per_second(args) -> float:
    import torch
    from transformers import (AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, Trainer,
                              TrainingArguments)

    from adaptopt.data.glue import load_glue
    from adaptopt.models import resolve_model

    path = resolve_model(args.model_name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    train = load_glue("sst2", data_dir=args.data_dir)["train"].shuffle(seed=args.seed).select(range(args.train_samples))
    train = train.map(lambda b: tokenizer(b["sentence"], truncation=True, max_length=args.max_length), batched=True,
                      remove_columns=["sentence", "idx"])
    torch.manual_seed(args.seed)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    with tempfile.TemporaryDirectory() as out:
        targs = TrainingArguments(
            output_dir=out, per_device_train_batch_size=args.batch_size, max_steps=args.steps,
            learning_rate=5e-5, warmup_steps=math.ceil(0.1 * args.steps), lr_scheduler_type="linear", max_grad_norm=1.0, seed=args.seed,
            use_cpu=not torch.cuda.is_available(), report_to=[], save_strategy="no", eval_strategy="no", logging_steps=10**9,
            dataloader_num_workers=0, disable_tqdm=True,
        )
        trainer = Trainer(model=model, args=targs, train_dataset=train, data_collator=DataCollatorWithPadding(tokenizer))
        start = time.perf_counter()
        trainer.train()
        elapsed = time.perf_counter() - start
    return args.steps * args.batch_size / elapsed


def recipe_samples_per_second(args, optimizer: str, extra: list[str]) -> float:
    import torch

    with tempfile.TemporaryDirectory() as out:
        recipe_args = ["--task_name", "sst2", "--data_dir", args.data_dir, "--output_dir", out,
                       "--optimizer", optimizer, "--max_train_samples", str(args.train_samples),
                       "--max_train_steps", str(args.steps), "--per_device_train_batch_size", str(args.batch_size),
                       "--max_length", str(args.max_length), "--seed", str(args.seed), "--max_eval_samples", "64",
                       "--logging_steps", "50", *extra]
        if args.model_name_or_path:
            recipe_args += ["--model_name_or_path", args.model_name_or_path]
        # the Trainer above ran with torch's default thread count: the recipe gets the same
        run_recipe(launcher_args(), REPO / "recipes" / "glue.py", recipe_args, threads=torch.get_num_threads(),
                   env=dict(HF_HUB_OFFLINE="1"))
        return json.loads((Path(out) / "results.json").read_text())["train_samples_per_second"]


def compile_probe_seconds(threads: int) -> float:
    """Wall time of the recipe's choice of adaptopt's update (--optimizer_impl auto) in a fresh process, with
    the caches warm as in the recipe runs: on the CPU it loads (or builds) the native kernel, on a GPU it
    compiles the compiled update's graph, which the first update then reuses. The recipe does this while it
    sets up (cli.impl_arguments), before its training loop, so the script also reports the recipe with this
    time added to its loop."""
    code = ("import time, torch; torch.set_num_threads(%d); from adaptopt import cli; "
            "device = 'cuda' if torch.cuda.is_available() else 'cpu'; "
            "t = time.perf_counter(); chosen = cli.impl_arguments('adaptopt', 'auto', device); "
            "print(time.perf_counter() - t if any(chosen.values()) else 'eager')" % threads)
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    last = proc.stdout.strip().splitlines()[-1]
    try:
        return float(last)
    except ValueError:  # neither the native nor the compiled update runs here
        raise RuntimeError("neither adaptopt's native nor its compiled update runs on this machine: the recipe would "
                           "use its eager update, which this benchmark's recipe_adaptopt row does not describe") from None


# name -> (recipe --optimizer, extra recipe arguments)
VARIANTS = {"recipe_adamw": ("adamw", []), "recipe_adaptopt": ("adaptopt", []),
            "recipe_adaptopt_eager": ("adaptopt", ["--optimizer_impl", "eager"]),
            "recipe_adaptopt_random_batches": ("adaptopt", ["--no_group_by_length"])}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", default=os.environ.get("GLUE_DIR"), help="GLUE TSV root (default $GLUE_DIR)")
    parser.add_argument("--model_name_or_path", default=None, help="default: embedded all-MiniLM-L6-v2")
    parser.add_argument("--steps", type=int, default=150, help="optimizer updates per run")
    parser.add_argument("--train_samples", type=int, default=8000, help="SST-2 training subsample")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--max_length", type=int, default=128)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved repetitions of every configuration")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS),
                        help="recipe configurations to time against the Trainer (default: all)")
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    args = parser.parse_args()
    if not args.data_dir:
        parser.error("pass --data_dir or set GLUE_DIR")

    if "recipe_adaptopt" not in args.variants:
        parser.error("--variants must include recipe_adaptopt: the last line is its ratio to the Trainer")
    variants = {name: VARIANTS[name] for name in args.variants}
    import torch

    runs: dict[str, list[float]] = {name: [] for name in ["hf_trainer_adamw", *variants]}
    probe_s, samples = [], args.steps * args.batch_size
    for round_ in range(args.rounds):  # interleaved, so a slow spell of the machine hits every configuration
        print(f"round {round_ + 1}/{args.rounds}", flush=True)
        runs["hf_trainer_adamw"].append(hf_trainer_samples_per_second(args))
        for name, (optimizer, extra) in variants.items():
            runs[name].append(recipe_samples_per_second(args, optimizer, extra))
        probe_s.append(compile_probe_seconds(torch.get_num_threads()))
    # The default recipe as if its setup compile were part of its training loop, round by round.
    runs["recipe_adaptopt + compile"] = [samples / (samples / sps + p) for sps, p in zip(runs["recipe_adaptopt"], probe_s)]
    figures = {name: statistics.median(values) for name, values in runs.items()}
    anchor = figures["hf_trainer_adamw"]

    print(f"SST-2, {args.steps} updates x batch {args.batch_size}, max_length {args.max_length}, fp32, 1 process, "
          f"{torch.get_num_threads()} threads; median of {args.rounds} interleaved rounds")
    for name, value in figures.items():
        spread = f"{min(runs[name]):.1f}-{max(runs[name]):.1f}"
        print(f"{name:>30}: {value:6.1f} samples/s  (range {spread:>11})  {value / anchor:.2f}x HF Trainer")
    print(f"(recipe_adaptopt + compile: its choice of update (native kernel load or build, or compile), "
          f"{statistics.median(probe_s):.1f} s in a fresh process, counted as training time; the recipe runs it "
          "before its loop)")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(vars(args), median=figures, runs=runs, probe_s=probe_s), indent=2))
    print(f"recipes/glue.py (its defaults: adaptopt, --optimizer_impl auto, --group_by_length) / HF Trainer "
          f"(its defaults: fused AdamW, random batches) = "
          f"{figures['recipe_adaptopt'] / anchor:.2f}x in the training loop, "
          f"{figures['recipe_adaptopt + compile'] / anchor:.2f}x counting the compile before it")

if __name__ == "__main__":
    main()
