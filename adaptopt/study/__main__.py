"""python -m adaptopt.study --config studies/glue.yaml: run an optimizer study, then write its report.

    python -m adaptopt.study --config studies/glue.yaml                 # run what is missing, then report
    python -m adaptopt.study --config studies/glue.yaml --plan          # the grid and its status, no runs
    python -m adaptopt.study --config studies/glue.yaml --jobs 2        # 2 runs at a time (cores split)
    python -m adaptopt.study --config studies/glue.yaml --tasks mrpc    # run only MRPC's runs (report: all)
    python -m adaptopt.study --config studies/glue.yaml --runs '*-adamw-*' '*-adaptopt-lr2e-05-*'   # by run name
    python -m adaptopt.study --config studies/glue.yaml --shard 0/2    # runs 0, 2, 4, ... of the grid (another
    python -m adaptopt.study --config studies/glue.yaml --shard 1/2    #   runner, core or node takes the others)
    python -m adaptopt.study --config studies/glue.yaml --report_only   # tables, plots, report.md from what exists
    python -m adaptopt.study --config studies/glue.yaml --report_only --publish docs/study_glue.md   # + a copy for docs/

Writes into the study's output_dir: runs/<run>/ per run, summary.json (every number), plots/*.png,
report.md. Stopping it (Ctrl-C) at any time is safe: the next invocation skips finished runs.
Inside a SLURM job array, --shard defaults to the array task (SLURM_ARRAY_TASK_ID of SLURM_ARRAY_TASK_COUNT),
so every task runs its own part of the grid in the shared folder (slurm/study.sbatch).
Exit status: 0 when every selected run of this shard finished, 1 when some failed or were cut off, 2 for a
bad study file or flag.
"""
from __future__ import annotations

import argparse
import fnmatch
import json
import math
import os
import re
import shlex
import shutil
import signal
import sys
from collections import Counter
from pathlib import Path

from .aggregate import summarize
from .config import FULL, Study, StudyConfigError, load_study
from .files import write_atomically
from .plots import write_plots
from .records import load_records
from .report import write_report
from .runner import (FAILED, FINISHED, Runner, check_unchanged, find_run, portable_command, portable_path,
                     run_dir, run_status)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m adaptopt.study", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="the study file (YAML), e.g. studies/glue.yaml")
    parser.add_argument("--output_dir", default=None,
                        help="where runs and the report go (default: the study file's output_dir)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="runs at a time; each gets OMP_NUM_THREADS = cores // (jobs x processes per run)")
    parser.add_argument("--tasks", nargs="+", default=None, help="run only these tasks' runs (the report covers all)")
    parser.add_argument("--runs", nargs="+", default=None, metavar="PATTERN",
                        help="run only runs whose name (see --plan; e.g. mrpc-adamw-lr5e-05-seed2) matches one of "
                             "these shell patterns, e.g. '*-adamw-*' (quote them); combines with --tasks")
    parser.add_argument("--shard", default=None, metavar="I/N",
                        help="run only the runs whose index in the grid (see --plan) is I modulo N, so N runners share "
                             "a study without coordinating (default inside a SLURM job array: its task id and count)")
    parser.add_argument("--skip_failed", action="store_true", help="do not retry runs that failed before")
    parser.add_argument("--timeout", type=float, default=None, help="seconds after which a run is killed (failed)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--plan", action="store_true",
                      help="print the grid, each run's status and a command; run nothing")
    mode.add_argument("--report_only", action="store_true", help="aggregate, plot and report without running")
    parser.add_argument("--publish", default=None, metavar="PATH.md",
                        help="also write the report to PATH.md, its plots to PATH_plots/ (e.g. docs/study.md)")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs must be >= 1 (got {args.jobs})")
    if args.timeout is not None and args.timeout <= 0:
        parser.error(f"--timeout must be > 0 seconds (got {args.timeout})")
    args.shard = parse_shard(args.shard, os.environ, parser.error)
    return args


def parse_shard(text: str | None, environ, error) -> tuple[int, int] | None:
    """``I/N`` -> (I, N); without one, a SLURM job array's task (id - min, count); else None (the whole grid)."""
    if text is None:
        task, count = environ.get("SLURM_ARRAY_TASK_ID"), environ.get("SLURM_ARRAY_TASK_COUNT")
        if task is None or count is None:
            return None
        text = f"{int(task) - int(environ.get('SLURM_ARRAY_TASK_MIN', '0'))}/{count}"
    match = re.fullmatch(r"(\d+)/(\d+)", text.strip())
    if not match or not 0 <= int(match[1]) < int(match[2]):
        error(f"--shard must be I/N with 0 <= I < N, e.g. 0/2 (got {text!r})")
    return int(match[1]), int(match[2])


def select(study: Study, specs, tasks: list[str] | None, patterns: list[str] | None,
           shard: tuple[int, int] | None = None) -> list:
    """The runs of ``specs`` that --tasks, --runs and --shard leave, in plan order. A task not in the study, or a
    pattern that matches no run of it, is an error (a typo would otherwise run nothing and exit 0). The shard is
    taken on the whole grid's order, so it does not depend on what has finished or on the other filters."""
    unknown = sorted(set(tasks or []) - set(study.tasks))
    if unknown:
        raise StudyConfigError(f"--tasks {unknown} are not in the study (its tasks: {', '.join(study.tasks)})")
    for pattern in patterns or []:
        if not any(fnmatch.fnmatchcase(s.name, pattern) for s in specs):
            raise StudyConfigError(f"--runs {pattern!r} matches no run of the study (--plan lists their names, "
                                   f"e.g. {specs[0].name})")
    return [s for i, s in enumerate(specs) if (tasks is None or s.task in tasks)
            and (patterns is None or any(fnmatch.fnmatchcase(s.name, p) for p in patterns))
            and (shard is None or i % shard[1] == shard[0])]


def canonical_command(study: Study, args: argparse.Namespace) -> list[str]:
    """The command that (re)produces this study, for the report."""
    cmd = ["python", "-m", "adaptopt.study", "--config", portable_path(study.config_path),
           "--output_dir", portable_path(study.output_dir)]
    return cmd + (["--jobs", str(args.jobs)] if args.jobs > 1 else [])


def print_plan(study: Study, specs, selected) -> None:
    kinds = Counter()
    for spec in specs:
        kind = ("ablation" if spec.variant != FULL else
                "main" if spec.optimizer in study.optimizers and spec.learning_rate == study.default_lr(spec.optimizer)
                else "lr sweep")
        kinds[spec.task, kind] += 1
    status = Counter(run_status(find_run(study, s)) for s in specs)
    print(f"study {study.config_path} -> {study.output_dir}")
    print(f"{len(specs)} runs: " + ", ".join(f"{n} {s}" for s, n in sorted(status.items())))
    for task in study.tasks:
        parts = ", ".join(f"{kinds[task, k]} {k}" for k in ("main", "lr sweep", "ablation") if kinds[task, k])
        print(f"  {task}: {parts}")
    print("optimizers (study LR): " + ", ".join(f"{o} ({study.default_lr(o):g})" for o in study.optimizers))
    if study.lr_sweep:
        sweeps = (f"{o}: {', '.join(f'{lr:g}' for lr in lrs)}" for o, lrs in study.lr_sweep.items())
        print("lr sweep: " + "; ".join(sweeps))
    if study.ablation:
        print(f"ablation of {study.ablation_optimizer}: {', '.join(study.ablation)}")
    print(f"seeds: {study.seeds}")
    reused = sum(find_run(study, s) != run_dir(study, s) for s in specs)
    if reused:
        print(f"{reused} of the finished runs are reused from {', '.join(map(str, study.reuse))}")
    todo = [s for s in selected if run_status(find_run(study, s)) != FINISHED]
    if len(selected) < len(specs):
        print(f"selected by --tasks/--runs/--shard: {len(selected)} runs, {len(todo)} not finished")
    if todo:
        print("next run:\n  " + shlex.join(portable_command(study, todo[0], run_dir(study, todo[0]))))


def report(study: Study, specs, args) -> dict:
    records = load_records(study, specs)
    summary = summarize(study, records)
    plots = write_plots(summary, study.output_dir / "plots")
    first = next((r for r in records if r.info and r.info.get("command")), None)
    example = portable_command(study, first.spec, run_dir(study, first.spec)) if first else None
    path = write_report(study, summary, plots, study.output_dir / "report.md", canonical_command(study, args),
                        example)
    write_atomically(study.output_dir / "summary.json", json.dumps(_no_nan(summary), indent=1))
    runs = summary["runs"]
    print(f"report: {path} ({runs['finished']} finished, {runs['failed']} failed, {runs['pending']} not run)")
    if args.publish:  # e.g. docs/study.md + docs/study_plots/*.png, with links that work from there
        dest = Path(args.publish)
        plot_dir = dest.parent / f"{dest.stem}_plots"
        plot_dir.mkdir(parents=True, exist_ok=True)
        copies = {name: Path(shutil.copy2(p, plot_dir / p.name)) for name, p in plots.items()}
        write_report(study, summary, copies, dest, canonical_command(study, args), example)
        print(f"published: {dest} and {plot_dir}/")
    return summary


def _no_nan(x):
    """NaN (an undefined std or test) as JSON null, so any JSON reader can load summary.json."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _no_nan(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_no_nan(v) for v in x]
    return x


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        study = load_study(args.config, args.output_dir)
        specs = study.runs()
        selected = select(study, specs, args.tasks, args.runs, args.shard)
        if args.plan:
            print_plan(study, specs, selected)
            try:
                check_unchanged(study, specs)
            except StudyConfigError as err:  # the plan is still worth reading; running would stop here
                print(f"warning: {err}", file=sys.stderr)
            return 0
        check_unchanged(study, specs)
    except StudyConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    if not args.report_only:
        study.output_dir.mkdir(parents=True, exist_ok=True)
        write_atomically(study.output_dir / "study.yaml", study.text)  # the file as it was when these runs ran
        # SIGTERM (a scheduler, `kill`) stops the runs in flight like Ctrl-C does, instead of orphaning them.
        signal.signal(signal.SIGTERM, _raise_interrupt)
        # SIGINT too, explicitly: a runner started in the background of a script (`nohup ... &`) inherits an
        # ignored SIGINT, Python then keeps ignoring it, and `kill -INT` would leave the study running.
        signal.signal(signal.SIGINT, _raise_interrupt)
        try:
            Runner(study, jobs=args.jobs, timeout=args.timeout).run(selected, retry_failed=not args.skip_failed)
        except KeyboardInterrupt:
            print("interrupted: runs in flight were stopped; run the same command again to resume", file=sys.stderr)
            return 130
    report(study, specs, args)
    failed = [s.name for s in selected if run_status(find_run(study, s)) == FAILED]
    missing = [s.name for s in selected if run_status(find_run(study, s)) not in (FINISHED, FAILED)]
    if failed:
        print(f"{len(failed)} run(s) failed: {', '.join(failed[:5])}{' ...' if len(failed) > 5 else ''}",
              file=sys.stderr)
    return 1 if failed or (missing and not args.report_only) else 0


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
