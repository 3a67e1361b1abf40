"""Fine-tune the embedded all-MiniLM-L6-v2 on real SQuAD v1.1 questions with recipes/squad.py, once per
optimizer, and tabulate exact match, F1 (per epoch and final), updates, train time and samples/s, with
the exact command of every run.

    HF_HUB_OFFLINE=1 python benchmarks/squad_dev.py --squad_dir ../shared/data/squad --out runs/squad_dev

The data here is the official SQuAD v1.1 dev set split by article (../shared/data/squad/README): the
model trains on test-v1.1-part.json (5609 questions) and is scored on dev-v1.1-part.json (4961). The
official training set (87.6k questions) is not available, so the scores are those of a model trained on
6% of it and are not comparable with published SQuAD numbers.

Each optimizer runs once (seed 42, batch 32, 384-token windows with a stride of 128, 2 epochs, fp32, one
process with all cores unless --threads says otherwise) through adaptopt.launch; finished runs (results.json
present) are not rerun, so the script can be restarted after an interruption. Prints a Markdown table to paste
into docs/results.md.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing: the repository's adaptopt

from adaptopt.launch import command_line, launcher_args, recipe_command, results_of  # noqa: E402


def recipe_args(optimizer: str, args, out: Path) -> list[str]:
    return ["--train_file", str(Path(args.squad_dir) / "test-v1.1-part.json"),
            "--validation_file", str(Path(args.squad_dir) / "dev-v1.1-part.json"),
            "--output_dir", str(out), "--optimizer", optimizer, "--seed", "42", "--per_device_train_batch_size", "32",
            "--max_seq_length", str(args.max_seq_length), "--doc_stride", str(args.doc_stride),
            "--num_train_epochs", str(args.epochs), "--learning_rate", str(args.learning_rate), *args.extra]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--squad_dir", default=os.environ.get("SQUAD_DIR", str(REPO.parent / "shared/data/squad")),
                        help="folder with test-v1.1-part.json and dev-v1.1-part.json (default $SQUAD_DIR)")
    parser.add_argument("--out", default="runs/squad_dev", help="one sub-folder per optimizer")
    parser.add_argument("--optimizers", nargs="+", default=["adaptopt", "adamw"])
    parser.add_argument("--learning_rate", type=float, default=1e-4,
                        help="the same for every optimizer (1e-4: the GLUE runs' choice for this model; not swept)")
    parser.add_argument("--epochs", type=float, default=2)
    parser.add_argument("--max_seq_length", type=int, default=384)
    parser.add_argument("--doc_stride", type=int, default=128)
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads of the training process (default: all cores, adaptopt.launch's policy)")
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more recipe arguments")
    args = parser.parse_args()
    if not (Path(args.squad_dir) / "dev-v1.1-part.json").is_file():
        parser.error(f"no dev-v1.1-part.json in {args.squad_dir}: pass --squad_dir or set SQUAD_DIR")

    rows = []
    for optimizer in args.optimizers:
        out = Path(args.out) / optimizer
        launch = (launcher_args(), "recipes/squad.py", recipe_args(optimizer, args, out))
        shown = command_line(recipe_command(*launch, threads=args.threads)[0])
        r = results_of(*launch, out, threads=args.threads, env=dict(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1"),
                       cwd=REPO, log=Path(args.out) / f"{optimizer}.log")
        log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
        per_epoch = " / ".join(f"{e['eval/f1']:.1f}" for e in log if "eval/f1" in e)
        rows.append(f"| {optimizer} | **{r['exact_match']:.1f}** | **{r['f1']:.1f}** | {per_epoch} | "
                    f"{r['train_questions']} ({r['train_samples']} windows) | {r['completed_steps']} | "
                    f"{r['train_time_s'] / 60:.1f} | {r['train_samples_per_second']:.1f} | "
                    f"{r['peak_memory_mb'] / 1024:.1f} GB | `{shown}` |")
    print("| optimizer | EM | F1 | F1 per evaluation | train questions | updates | train min | windows/s | peak RSS "
          "| command |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
