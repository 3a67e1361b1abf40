"""LoRA vs full fine-tuning of all-MiniLM-L6-v2 on a GLUE task, through the real recipe: dev metric,
trainable parameters, memory and time.

    python benchmarks/lora_glue.py --output_dir runs/lora_glue              # MRPC, 3 epochs each: ~25 min, 2 cores
    python benchmarks/lora_glue.py --output_dir /tmp/t --max_train_steps 3      # a smoke test

For each mode, one process runs

    accelerate launch --num_cpu_threads_per_process 2 --num_processes 1 recipes/glue.py --task_name mrpc \\
        --data_dir $GLUE_DIR --optimizer adaptopt \\
        --learning_rate LR [--lora --lora_r 8] --seed 42 --output_dir <output_dir>/<mode>

with the embedded all-MiniLM-L6-v2 (22.7M parameters). LoRA (adaptopt/lora.py): rank 8 on the attention
query/key/value of the 6 layers, plus the new classification head, which trains fully; the rest is frozen.
The learning rates differ, as they do in practice: 2e-5 for full fine-tuning (the recipe's AdaptOpt default),
5e-4 for LoRA (adapters start from zero and need larger steps; peft's examples use 1e-4 to 1e-3). Everything
else is the recipe's default and identical (batch 32, 3 epochs, linear schedule with 10% warmup, clipping 1.0).
Reported from each run's results.json: the dev metrics, trainable parameters, the memory report at the end
(optimizer state, gradients; peak process memory = ru_maxrss), train time and samples/s.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing: the repository's adaptopt

from adaptopt.launch import launcher_args, run_recipe  # noqa: E402

MIB = 2**20


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", required=True, help="one folder per mode and the summary go here")
    parser.add_argument("--task_name", default="mrpc", help="GLUE task (default %(default)s)")
    default_glue = os.environ.get("GLUE_DIR") or str(REPO.parent / "shared" / "data" / "glue")
    parser.add_argument("--data_dir", default=default_glue,
                        help="GLUE folder (default: $GLUE_DIR or ../shared/data/glue)")
    parser.add_argument("--optimizer", default="adaptopt", help="registry name for both modes (default %(default)s)")
    parser.add_argument("--full_learning_rate", type=float, default=2e-5, help="peak LR, full fine-tuning")
    parser.add_argument("--lora_learning_rate", type=float, default=5e-4, help="peak LR, LoRA")
    parser.add_argument("--lora_r", type=int, default=8, help="adapter rank (default %(default)s)")
    parser.add_argument("--num_train_epochs", type=float, default=3, help="epochs per mode (default %(default)s)")
    parser.add_argument("--max_train_steps", type=int, default=None, help="updates per mode (overrides epochs)")
    parser.add_argument("--seed", type=int, default=42, help="seed for both modes")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for the one training process")
    return parser.parse_args(argv)


def run_mode(args, mode: str) -> dict:
    out = Path(args.output_dir) / mode
    out.mkdir(parents=True, exist_ok=True)
    lr = args.lora_learning_rate if mode == "lora" else args.full_learning_rate
    recipe_args = ["--task_name", args.task_name, "--data_dir", args.data_dir, "--optimizer", args.optimizer,
                   "--learning_rate", str(lr), "--num_train_epochs", str(args.num_train_epochs),
                   "--seed", str(args.seed), "--output_dir", str(out)]
    if args.max_train_steps:
        recipe_args += ["--max_train_steps", str(args.max_train_steps)]
    if mode == "lora":
        recipe_args += ["--lora", "--lora_r", str(args.lora_r)]
    env = dict(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    run_recipe(launcher_args(), REPO / "recipes" / "glue.py", recipe_args, threads=args.threads, env=env,
               log=out / "launch.log")  # raises RecipeFailed with the log's last lines
    results = json.loads((out / "results.json").read_text())
    results["learning_rate"] = lr
    return results


def main(argv=None) -> None:
    args = parse_args(argv)
    runs = {}
    for mode in ("full", "lora"):
        print(f"[{time.strftime('%H:%M:%S')}] {mode} ...", flush=True)
        runs[mode] = run_mode(args, mode)
    metrics = [k for k in ("accuracy", "f1", "matthews_correlation", "pearson", "spearmanr") if k in runs["full"]]
    print(f"\nall-MiniLM-L6-v2 on {args.task_name}, optimizer {args.optimizer}, seed {args.seed}, "
          f"{runs['full']['completed_steps']} updates of {runs['full']['total_batch_size']} examples")
    print(f"{'mode':<5} {'lr':>7} " + " ".join(f"{m:>9}" for m in metrics) +
          f" {'trainable':>11} {'of':>11} {'state MiB':>10} {'grads MiB':>10} {'peak MiB':>9} {'train s':>8}"
          f" {'samples/s':>10}")
    for mode, r in runs.items():
        end = r["memory"]["end"]
        print(f"{mode:<5} {r['learning_rate']:>7.0e} " + " ".join(f"{r[m]:>9.4f}" for m in metrics) +
              f" {r['trainable_parameters']:>11,} {r['parameters']:>11,} {end['optimizer_state_bytes'] / MIB:>10.2f} "
              f"{end['gradient_bytes'] / MIB:>10.2f} {r['peak_memory_mb']:>9.0f} {r['train_time_s']:>8.0f} "
              f"{r['train_samples_per_second']:>10.1f}")
    (Path(args.output_dir) / "lora_glue.json").write_text(json.dumps(dict(settings=vars(args), runs=runs), indent=2))


if __name__ == "__main__":
    main()
