"""Fine-tune the embedded all-MiniLM-L6-v2 on real GLUE tasks with recipes/glue.py and tabulate the
dev metrics, updates, wall time and samples/s, with the exact command of every run.

    HF_HUB_OFFLINE=1 python benchmarks/glue_dev.py --data_dir ../shared/data/glue --out runs/glue_dev

Each task runs once (seed 42, batch 32, max_length 128, --epochs epochs (3 by default), fp32, one
process with --threads CPU threads, 1 by default, as every run in docs/results.md had) through adaptopt.launch;
finished tasks (results.json present) are not rerun, so the script can be restarted after an interruption.
Prints a Markdown table to paste into docs/results.md, with the exact command of every run.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing: the repository's adaptopt

from adaptopt.launch import command_line, launcher_args, recipe_command, results_of  # noqa: E402

# task -> the metric the issue sets a target on, that target, and extra recipe arguments
TASKS = {
    "sst2": dict(metric="accuracy", target=0.89, extra=["--max_train_samples", "20000"]),
    "mrpc": dict(metric="f1", target=0.87, extra=[]),
    "stsb": dict(metric="pearson", target=0.86, extra=[]),
    "rte": dict(metric="accuracy", target=0.63, extra=[]),
    "cola": dict(metric="matthews_correlation", target=0.35, extra=[]),
}


def recipe_args(task: str, args, out: Path) -> list[str]:
    return ["--task_name", task, "--data_dir", args.data_dir, "--output_dir", str(out), "--optimizer", args.optimizer,
            "--seed", "42", "--per_device_train_batch_size", "32", "--max_length", "128",
            "--num_train_epochs", str(args.epochs),
            "--no_group_by_length",  # random batches, as docs/results.md's figures were measured (the recipe groups now)
            *(["--learning_rate", str(args.learning_rate)] if args.learning_rate else []),
            *TASKS[task]["extra"], *args.extra]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", default=os.environ.get("GLUE_DIR"), help="GLUE TSV root (default $GLUE_DIR)")
    parser.add_argument("--out", default="runs/glue_dev", help="one sub-folder per task")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--optimizer", default="adaptopt")
    parser.add_argument("--epochs", type=int, default=3, help="training epochs per task")
    parser.add_argument("--learning_rate", type=float, default=None, help="default: the optimizer's default")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads of the training process")
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more recipe arguments")
    args = parser.parse_args()
    if not args.data_dir:
        parser.error("pass --data_dir or set GLUE_DIR")

    rows = []
    for task in args.tasks:
        out = Path(args.out) / task
        launch = (launcher_args(), "recipes/glue.py", recipe_args(task, args, out))
        shown = command_line(recipe_command(*launch, threads=args.threads)[0])
        r = results_of(*launch, out, threads=args.threads, env=dict(HF_HUB_OFFLINE="1"), cwd=REPO,
                       log=Path(args.out) / f"{task}.log")
        spec = TASKS[task]
        value = r[spec["metric"]]
        others = ", ".join(f"{k} {r[k] * 100:.1f}" for k in ("accuracy", "f1", "spearmanr") if k in r and k != spec["metric"])
        rows.append(f"| {task} | {spec['metric']} **{value * 100:.1f}** ({others}) | {spec['target'] * 100:.0f} | "
                    f"{'yes' if value >= spec['target'] else 'no'} | {r['train_samples']} | {r['completed_steps']} | "
                    f"{r['train_time_s'] / 60:.1f} | {r['train_samples_per_second']:.1f} | `{shown}` |")
    print("| task | dev metric (others) | target | met | train examples | updates | train min | samples/s | command |")
    print("|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
