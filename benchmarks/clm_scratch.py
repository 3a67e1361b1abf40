"""Train a small GPT-2-style model from scratch with AdaptOpt and with AdamW for the same updates, on real
English text, and compare validation perplexity.

    python benchmarks/clm_scratch.py --output_dir runs/clm_scratch        # about 6-8 minutes per optimizer on 2 cores
    python benchmarks/clm_scratch.py --output_dir /tmp/t --max_train_steps 3 --max_eval_samples 16   # a smoke test

Text: the paragraphs ("contexts") of SQuAD v1.1 in ../shared/data/squad (--squad_dir): those of
test-v1.1-part.json train (24 articles, 1,154 paragraphs) and those of dev-v1.1-part.json validate (the
other 24 articles, 913 paragraphs: no article is in both). The script writes them to
<output_dir>/data/{train,valid}.jsonl and runs, for each optimizer, the real recipe:

    accelerate launch --num_cpu_threads_per_process 2 --num_processes 1 recipes/clm.py \\
        --config_name gpt2-mini --train_file train.jsonl --validation_file valid.jsonl --block_size 128 \\
        --optimizer {adaptopt,adamw} --learning_rate 1e-3 --max_train_steps 300 ...

Model: recipes/clm.py's preset gpt2-mini (4 layers, 256 wide, 4 heads), random init from --seed, with the
embedded all-MiniLM-L6-v2 WordPiece tokenizer (uncased, 30,522 tokens: about 11M parameters, most of them
the tied embedding). Both optimizers get the same peak learning rate, linear schedule with 10% warmup,
clipping at 1.0, batch, data order and initial weights; only the update rule differs. Perplexity is
exp(mean next-token loss) over every token of the validation blocks (the recipe's exact evaluation).
Prints a table and writes <output_dir>/clm_scratch.json; each run's results.json and train_log.jsonl
(loss and LR every --logging_steps updates, perplexity every --eval_steps) stay in <output_dir>/<optimizer>.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing: the repository's adaptopt

from adaptopt.launch import launcher_args, run_recipe  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", required=True, help="data, one folder per optimizer, and the summary go here")
    parser.add_argument("--squad_dir", default=str(REPO.parent / "shared" / "data" / "squad"),
                        help="folder holding test-v1.1-part.json and dev-v1.1-part.json (default %(default)s)")
    parser.add_argument("--optimizers", nargs="+", default=["adaptopt", "adamw"], help="registry names to compare")
    parser.add_argument("--config_name", default="gpt2-mini", help="recipes/clm.py preset or config.json")
    parser.add_argument("--block_size", type=int, default=128, help="tokens per block (default %(default)s)")
    parser.add_argument("--per_device_train_batch_size", type=int, default=16, help="blocks per update")
    parser.add_argument("--max_train_steps", type=int, default=300, help="updates per optimizer (default %(default)s)")
    parser.add_argument("--learning_rate", type=float, default=1e-3, help="peak LR for every optimizer")
    parser.add_argument("--eval_steps", type=int, default=100, help="validation perplexity every N updates")
    parser.add_argument("--max_eval_samples", type=int, default=None, help="validate on the first N blocks only")
    parser.add_argument("--logging_steps", type=int, default=10, help="train loss logged every N updates")
    parser.add_argument("--seed", type=int, default=42, help="init, data order and dropout (same for all)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for the one training process")
    return parser.parse_args(argv)


def write_contexts(squad_dir: Path, out: Path) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for source, name in (("test-v1.1-part.json", "train.jsonl"), ("dev-v1.1-part.json", "valid.jsonl")):
        data = json.loads((squad_dir / source).read_text())["data"]
        contexts = [p["context"] for article in data for p in article["paragraphs"]]
        (out / name).write_text("".join(json.dumps({"text": c}) + "\n" for c in contexts))
        paths.append(out / name)
    return paths[0], paths[1]


def run_optimizer(args, optimizer: str, train: Path, valid: Path) -> dict:
    out = Path(args.output_dir) / optimizer
    recipe_args = ["--config_name", args.config_name, "--train_file", str(train), "--validation_file", str(valid),
                   "--block_size", str(args.block_size), "--optimizer", optimizer,
                   "--learning_rate", str(args.learning_rate), "--max_train_steps", str(args.max_train_steps),
                   "--per_device_train_batch_size", str(args.per_device_train_batch_size),
                   "--eval_steps", str(args.eval_steps), "--logging_steps", str(args.logging_steps),
                   "--seed", str(args.seed), "--output_dir", str(out)]
    if args.max_eval_samples:
        recipe_args += ["--max_eval_samples", str(args.max_eval_samples)]
    env = dict(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    run_recipe(launcher_args(), REPO / "recipes" / "clm.py", recipe_args, threads=args.threads, env=env,
               log=out / "launch.log")  # raises RecipeFailed with the log's last lines
    results = json.loads((out / "results.json").read_text())
    results["wall_s"] = time.perf_counter() - start
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    results["perplexity_curve"] = {row["step"]: row["eval/perplexity"] for row in log if "eval/perplexity" in row}
    return results


def main(argv=None) -> None:
    args = parse_args(argv)
    squad = Path(args.squad_dir)
    if not (squad / "dev-v1.1-part.json").is_file():
        raise SystemExit(f"SQuAD files not found in {squad}: pass --squad_dir")
    train, valid = write_contexts(squad, Path(args.output_dir) / "data")
    runs = {}
    for optimizer in args.optimizers:
        print(f"[{time.strftime('%H:%M:%S')}] {optimizer}: {args.max_train_steps} updates ...", flush=True)
        runs[optimizer] = run_optimizer(args, optimizer, train, valid)
    first = next(iter(runs.values()))
    print(f"\n{args.config_name}: {first['parameters']:,} parameters, {first['train_blocks']} training and "
          f"{first['eval_blocks']} validation blocks of {first['block_size']} tokens; {args.max_train_steps} updates "
          f"of {first['total_batch_size']} blocks, peak LR {args.learning_rate}, seed {args.seed}")
    print(f"{'optimizer':<10} {'val ppl':>9} {'val loss':>9} {'token acc':>10} {'train loss':>11} {'train s':>8}  "
          "perplexity at updates")
    for name, r in runs.items():
        curve = ", ".join(f"{step}: {ppl:.1f}" for step, ppl in r["perplexity_curve"].items())
        print(f"{name:<10} {r['perplexity']:>9.2f} {r['eval_loss']:>9.4f} {r['token_accuracy']:>10.4f} "
              f"{r['train_loss']:>11.4f} {r['train_time_s']:>8.0f}  {curve}")
    (Path(args.output_dir) / "clm_scratch.json").write_text(json.dumps(dict(settings=vars(args), runs=runs), indent=2))


if __name__ == "__main__":
    main()
