"""Does grouping batches by length (recipes/glue.py's default) change the dev metric? A study's runs, which drew
their batches at random, against the same runs with grouped batches, seed by seed.

The grouped runs are the study file's own runs (its protocol, flag for flag, from the study file: one source of
truth) without the ``--no_group_by_length`` the file pins, launched as the study launches them (one CPU process).
The random-batch runs are the study's finished runs, read from its results folder. The script prints each seed's
metric, mean ± std (ddof 1) per arm, the difference and Welch's two-sided t-test. A grouped run that finished
before (its results.json exists under --out) is read, not run again.

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python benchmarks/grouping_dev.py --run sst2-adamw-lr5e-05 --seeds 1 2 3

(studies/glue.yaml's SST-2 AdamW run at lr 5e-5: 3 epochs of the 5,000-example subsample, batch 32, max length
128, linear schedule with 10% warmup, clipping at 1.0; about 15 min per seed on one thread.)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from adaptopt.launch import command_line, recipe_command, results_of  # noqa: E402
from adaptopt.study.config import load_study  # noqa: E402
from adaptopt.study.runner import RESTATED_DEFAULTS, find_run, read_results  # noqa: E402
from adaptopt.study.stats import describe, welch  # noqa: E402

SWITCH = "--no_group_by_length"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", default="studies/glue.yaml", help="the study file whose runs are compared")
    parser.add_argument("--results", default=None,
                        help="the study's results folder (its runs; default: the study file's output_dir)")
    parser.add_argument("--run", default="sst2-adamw-lr5e-05", help="a run name of the study, without -seedN")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--metric", default="accuracy", help="the results.json key compared")
    parser.add_argument("--out", default="runs/grouping_dev", help="where the grouped runs write (one folder each)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads of each run (the study's: 1)")
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    args = parser.parse_args()

    study = load_study(REPO / args.study, REPO / args.results if args.results else None)
    if not study.output_dir.is_absolute():  # the study file's output_dir is relative to the repository
        study = load_study(REPO / args.study, REPO / study.output_dir)
    args.results = str(study.output_dir.relative_to(REPO) if study.output_dir.is_relative_to(REPO) else study.output_dir)
    specs = {s.name: s for s in study.runs()}
    random_, grouped = [], []
    for seed in args.seeds:
        name = f"{args.run}-seed{seed}"
        if name not in specs:
            parser.error(f"{args.study} has no run {name} (python -m adaptopt.study --config {args.study} --plan "
                         "lists them)")
        spec = specs[name]
        if SWITCH not in spec.recipe_args() or SWITCH not in RESTATED_DEFAULTS:
            parser.error(f"{name}: the study file does not pin {SWITCH}, so its runs are not the random-batch arm")
        baseline = read_results(find_run(study, spec))
        if baseline is None:
            parser.error(f"{name} has not finished in {args.results}: run the study first")
        out = Path(args.out) / name
        recipe_args = [a for a in spec.launch_args() if a != SWITCH] + ["--output_dir", str(out)]
        launch = (study.launcher, study.recipe, recipe_args)
        print(f"grouped {name}: {command_line(recipe_command(*launch, threads=args.threads)[0])}", flush=True)
        result = results_of(*launch, out, threads=args.threads, env=dict(HF_HUB_OFFLINE="1"), cwd=REPO,
                            log=Path(args.out) / f"{name}.log")
        if result.get("group_by_length") is not True:
            raise SystemExit(f"{out}/results.json does not record group_by_length: true; remove it and rerun")
        random_.append(baseline[args.metric])
        grouped.append(result[args.metric])
        print(f"seed {seed}: random batches {baseline[args.metric]:.4f}, grouped {result[args.metric]:.4f} "
              f"(samples/s {baseline['train_samples_per_second']:.1f} -> {result['train_samples_per_second']:.1f}, "
              "other load differs)", flush=True)

    a, b, test = describe(grouped), describe(random_), welch(grouped, random_)
    print(f"{args.run}, {args.metric}, seeds {args.seeds}:")
    print(f"  random batches (the study's runs): {b['mean']:.4f} ± {b['std']:.4f}")
    print(f"  grouped by length:                 {a['mean']:.4f} ± {a['std']:.4f}")
    if test is not None:
        print(f"  grouped - random = {test['diff'] * 100:+.2f} points, Welch t = {test['t']:.2f}, p = {test['p']:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(vars(args), grouped=a, random=b, welch=test), indent=2))


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
