"""What one run left on disk: its results.json, its train_log.jsonl and the runner's run.json."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from .config import RunSpec, Study
from .runner import FINISHED, find_run, read_run_info, run_status

# The train loss the study compares: the last epoch's mean, computed from each run's train_log.jsonl
# (final_train_loss below), the same figure for every run whatever its results.json holds (a recipe may report
# the mean over the last logging window, which can be one update on the epoch's short last batch).
FINAL_TRAIN_LOSS = "final_train_loss"

# Correlations that are undefined (NaN in results.json: scipy's Pearson/Spearman of a run that predicted one
# constant value) count as 0, no correlation: what scikit-learn already reports for Matthews' correlation in
# that case (CoLA), and the no-skill value, so one failed seed marks its group as failed instead of turning
# every mean, ANOVA and Tukey test of its task into NaN.
CORRELATIONS = frozenset({"pearson", "spearmanr", "matthews_correlation"})


@dataclass
class RunRecord:
    spec: RunSpec
    directory: Path
    status: str  # finished | failed | pending
    results: dict | None
    info: dict | None  # run.json

    def value(self, key: str) -> float | None:
        """A number from results.json (None when the run has no such number, e.g. it failed; 0.0 for an
        undefined correlation, see CORRELATIONS), or FINAL_TRAIN_LOSS, which is computed from train_log.jsonl."""
        if key == FINAL_TRAIN_LOSS:
            return self._final_train_loss if self.status == FINISHED else None
        v = (self.results or {}).get(key)
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            return None
        return 0.0 if key in CORRELATIONS and math.isnan(v) else float(v)

    def train_log(self) -> tuple[dict[int, dict], dict[int, dict]]:
        return read_train_log(self.directory / "train_log.jsonl")

    @cached_property
    def _final_train_loss(self) -> float | None:
        return final_train_loss(*self.train_log())


def final_train_loss(train: dict[int, dict], evals: dict[int, dict]) -> float | None:
    """Mean training loss per update over the updates after the second-to-last evaluation, up to the last
    one: the last epoch when the recipe evaluates once per epoch (the study's case), the whole run when it
    evaluated once. Each logged loss is the mean over the updates since the previous log line, so it
    counts once per update of its window; a window that straddles the start of that span counts only for
    its updates inside it. None without an evaluation or without logged training loss in the span."""
    if not evals or not train:
        return None
    eval_steps = sorted(evals)
    start, end = (eval_steps[-2] if len(eval_steps) > 1 else 0), eval_steps[-1]
    total = weight = 0.0
    previous = 0
    for step in sorted(train):
        n = min(step, end) - max(previous, start)
        if n > 0:
            total += n * float(train[step]["train/loss"])
            weight += n
        previous = step
    return total / weight if weight else None


def load_records(study: Study, specs: list[RunSpec]) -> list[RunRecord]:
    records = []
    for spec in specs:
        directory = find_run(study, spec)  # this study's folder, or a reused study's
        status = run_status(directory)
        results = json.loads((directory / "results.json").read_text()) if status == FINISHED else None
        records.append(RunRecord(spec, directory, status, results, read_run_info(directory)))
    return records


def read_train_log(path: Path) -> tuple[dict[int, dict], dict[int, dict]]:
    """(training lines, evaluation lines), each by step. A resumed run logs some steps twice: the last
    line of a step wins, as it is the one the finished run continued from."""
    train: dict[int, dict] = {}
    evals: dict[int, dict] = {}
    if not path.is_file():
        return train, evals
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a run killed mid-write leaves half a last line
            continue
        if any(k.startswith("eval/") for k in record):
            evals[int(record["step"])] = record
        elif "train/loss" in record:
            train[int(record["step"])] = record
    return dict(sorted(train.items())), dict(sorted(evals.items()))
