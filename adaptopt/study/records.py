"""What one run left on disk: its results.json, its train_log.jsonl and the runner's run.json."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .config import RunSpec, Study
from .runner import FINISHED, read_run_info, run_dir, run_status


@dataclass
class RunRecord:
    spec: RunSpec
    directory: Path
    status: str  # finished | failed | pending
    results: dict | None
    info: dict | None  # run.json

    def value(self, key: str) -> float | None:
        """A number from results.json (None when the run has no such number, e.g. it failed)."""
        v = (self.results or {}).get(key)
        return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None

    def train_log(self) -> tuple[dict[int, dict], dict[int, dict]]:
        return read_train_log(self.directory / "train_log.jsonl")


def load_records(study: Study, specs: list[RunSpec]) -> list[RunRecord]:
    records = []
    for spec in specs:
        directory = run_dir(study, spec)
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
