"""Runs a study's grid through the real recipe: one `accelerate launch` subprocess per run, N at a time.

Each run lives in ``<study>/runs/<run name>/``. The recipe writes results.json and train_log.jsonl
there; the runner writes run.json (the run's arguments as the study file writes them, the optimizer
defaults of the library it ran with, threads, status, return code, wall time, attempts), stdout.log and
stderr.log. A run is finished when its results.json exists: the next invocation skips it, so a study
stopped at any point resumes where it was. A run that exits non-zero (or exits 0 without results.json,
or times out) is recorded as failed, with the tail of its stderr in run.json, and the other runs go on.

run.json holds no path of the machine that ran it (``${GLUE_DIR}`` stays as written, the recipe and the
run folder are relative to the repository), so a study folder committed on one machine resumes on
another. A study may also ``reuse`` other study folders: a run finished there with the same arguments
and defaults counts as done here and is read from there.

Several runners (cores, machines, a SLURM job array) share a study by splitting its grid, not by
coordinating: ``--shard i/N`` runs the runs whose index in the grid is i modulo N (__main__.py).
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from ..cli import flag_hyperparameters
from ..launch import available_cores, recipe_command, threads_per_process
from ..registry import default_hyperparameters
from .config import REPO, RunSpec, Study, StudyConfigError
from .files import write_atomically

FINISHED, FAILED, PENDING = "finished", "failed", "pending"
# Recipe switches that restate what the recipe did before the switch existed, where its default changed since:
# switch -> (the results.json key under which the recipe records the setting, the setting before the switch). A
# study file pins the old behaviour with the switch; a finished run whose arguments lack it and whose results.json
# does not record the setting ran before it existed, so it ran as the switch says: the same run.
RESTATED_DEFAULTS = {"--no_group_by_length": ("group_by_length", False)}
ERROR_TAIL_LINES = 30
_ERROR = re.compile(r"(^|\s|: )(error:|[A-Za-z_.]*(Error|Exception|Interrupt)\b)")


@dataclass
class Outcome:
    name: str
    status: str  # finished | failed | interrupted
    wall_time_s: float
    returncode: int | None
    error: str = ""  # the last line of stderr, when failed


def run_dir(study: Study, spec: RunSpec) -> Path:
    """Where this study runs ``spec`` (and writes its files)."""
    return study.output_dir / "runs" / spec.name


def find_run(study: Study, spec: RunSpec) -> Path:
    """The folder that holds ``spec``'s results: this study's own, or a ``reuse`` study's where the same run
    finished with the same arguments and defaults (``same_run``), else this study's own (not run yet)."""
    own = run_dir(study, spec)
    if run_status(own) == FINISHED:
        return own
    for other in study.reuse:
        candidate = other / "runs" / spec.name
        if (run_status(candidate) == FINISHED
                and same_run(spec, read_run_info(candidate), results=read_results(candidate)) is None):
            return candidate
    return own


def read_run_info(directory: Path) -> dict | None:
    try:
        return json.loads((directory / "run.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def read_results(directory: Path) -> dict | None:
    try:
        return json.loads((directory / "results.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def run_status(directory: Path) -> str:
    """finished (results.json exists), failed (the last attempt failed), or pending (never ran, or was cut off)."""
    if (directory / "results.json").is_file():
        return FINISHED
    info = read_run_info(directory)
    return FAILED if info and info.get("status") == FAILED else PENDING


def launch_command(study: Study, spec: RunSpec, out: Path, threads: int) -> tuple[list[str], dict[str, str]]:
    """(command, environment) of one run: `accelerate launch <launcher> <recipe> <args>` through
    adaptopt.launch, which owns the CPU catches, with ``threads`` CPU threads per process."""
    return recipe_command(study.launcher, study.recipe, [*spec.launch_args(), "--output_dir", str(out)],
                          threads=threads)


def portable_command(study: Study, spec: RunSpec, out: Path) -> list[str]:
    """``launch_command`` as run.json and the report show it: no path of this machine (``${GLUE_DIR}`` as the
    study file writes it, the recipe and the run folder relative to the repository when they are inside it)."""
    # accelerate's own launcher: the same run (adaptopt.launch only passes the recipe's exit code through), and the
    # command the committed run records hold
    return ["python", "-m", "accelerate.commands.launch", *study.launcher, portable_path(study.recipe),
            *spec.recipe_args(), "--output_dir", portable_path(out)]


def portable_path(path: Path) -> str:
    """``path`` relative to the repository when it is inside it (as reports and run.json show paths)."""
    try:
        return Path(path).resolve().relative_to(REPO).as_posix()
    except ValueError:  # a study kept outside the repository
        return str(path)


def optimizer_defaults(name: str) -> dict:
    """The library's defaults for the optimizer, as run.json stores them (JSON: tuples become lists)."""
    return json.loads(json.dumps(default_hyperparameters(name)))


def same_run(spec: RunSpec, info: dict | None, defaults: dict | None = None, results: dict | None = None) -> str | None:
    """None if a finished run's run.json (and results.json, ``results``) say it is ``spec`` as the library would
    run it today; otherwise what differs. Its arguments must be the study file's (``RESTATED_DEFAULTS``: or the
    study file's less a switch that restates what the run did before the switch existed), and the library defaults
    it ran with must be today's wherever none of its flags set the value: a default changed since (AdaptOpt's LR
    rule, say) refuses the run, while a default a flag overrode, or one the library did not have yet, cannot have
    changed it."""
    if info is None:
        return "no run.json"
    if info.get("recipe_args") != spec.recipe_args() and not ran_as_restated(spec, info.get("recipe_args"), results):
        return "its arguments differ from the study file's"
    set_by_flags = flag_hyperparameters(spec.recipe_args())
    recorded = info.get("optimizer_defaults") or {}
    today = defaults if defaults is not None else optimizer_defaults(spec.optimizer)
    changed = sorted(k for k, v in recorded.items() if k not in set_by_flags and k in today and today[k] != v)
    return f"the library's default {', '.join(changed)} changed since it ran" if changed else None


def ran_as_restated(spec: RunSpec, recorded: list[str] | None, results: dict | None) -> bool:
    """Whether a run recorded with ``recorded`` arguments ran as ``spec``, whose arguments add switches of
    ``RESTATED_DEFAULTS``: the rest must be the same, and for each such switch the run's results.json must record
    the switch's setting or nothing (it ran before the switch existed)."""
    wanted = spec.recipe_args()
    restated = [a for a in wanted if a in RESTATED_DEFAULTS]
    if not restated or recorded is None or [a for a in wanted if a not in RESTATED_DEFAULTS] != recorded:
        return False
    results = results or {}
    return all(results.get(key, setting) == setting for key, setting in map(RESTATED_DEFAULTS.get, restated))


def check_unchanged(study: Study, specs: list[RunSpec]) -> None:
    """Refuses to mix results of an edited study file or of changed library defaults (``same_run``)."""
    changed, defaults = [], {}
    for spec in specs:
        directory = run_dir(study, spec)
        if run_status(directory) != FINISHED:
            continue
        if spec.optimizer not in defaults:
            defaults[spec.optimizer] = optimizer_defaults(spec.optimizer)
        why = same_run(spec, read_run_info(directory), defaults[spec.optimizer], read_results(directory))
        if why:
            changed.append(f"{spec.name} ({why})")
    if changed:
        raise StudyConfigError(
            f"{len(changed)} finished run(s) in {study.output_dir} are not what the study file and the library "
            f"would run today: {'; '.join(changed[:3])}{' ...' if len(changed) > 3 else ''}. Compare their run.json; "
            "use a new --output_dir, or delete those run folders to redo them")


def stderr_tail(path: Path, lines: int = ERROR_TAIL_LINES) -> str:
    """The last lines of a log; progress bars rewrite their line with \\r, so those count as line ends."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 65536))
            text = f.read().decode("utf-8", "replace")
    except FileNotFoundError:
        return ""
    kept = [line for line in text.replace("\r", "\n").split("\n") if line.strip()]
    return "\n".join(kept[-lines:])


def error_line(tail: str) -> str:
    """The line that says what went wrong: the recipe's `error: ...` or the exception's last line.

    A recipe run with plain ``accelerate launch`` ends with accelerate's CalledProcessError traceback, which
    says nothing about the cause, so it is skipped."""
    lines = [line.strip() for line in tail.splitlines() if "CalledProcessError" not in line]
    for line in reversed(lines):
        if _ERROR.search(line):
            return line
    return lines[-1] if lines else ""


class Runner:
    """Runs specs, ``jobs`` at a time; Ctrl-C (or SIGTERM to the study) kills the runs in flight."""

    def __init__(self, study: Study, jobs: int = 1, timeout: float | None = None,
                 log: Callable[[str], None] = print, cores: int | None = None):
        if jobs < 1:
            raise ValueError(f"jobs must be >= 1, got {jobs}")
        self.study, self.jobs, self.timeout, self.log = study, jobs, timeout, log
        self.threads = threads_per_process(study.launcher, cores or available_cores(), concurrent_runs=jobs)
        self._active: set[subprocess.Popen] = set()
        self._lock = threading.Lock()
        self._stopping = threading.Event()

    def pending(self, specs: list[RunSpec], retry_failed: bool = True) -> list[RunSpec]:
        todo = []
        for spec in specs:
            status = run_status(find_run(self.study, spec))
            if status == PENDING or (status == FAILED and retry_failed):
                todo.append(spec)
        return todo

    def run(self, specs: list[RunSpec], retry_failed: bool = True) -> list[Outcome]:
        """Runs the specs that are not finished (and, with ``retry_failed=False``, not failed before)."""
        todo = self.pending(specs, retry_failed)
        self.log(f"{len(specs) - len(todo)} of {len(specs)} runs already done; running {len(todo)}, "
                 f"{self.jobs} at a time, OMP_NUM_THREADS={self.threads}")
        outcomes: list[Outcome] = []
        if not todo:
            return outcomes
        pool = ThreadPoolExecutor(max_workers=self.jobs)
        futures = [pool.submit(self._run_one, spec) for spec in todo]
        try:
            for i, future in enumerate(as_completed(futures), 1):
                outcome = future.result()
                outcomes.append(outcome)
                what = ("finished" if outcome.status == FINISHED else
                        f"FAILED (exit {outcome.returncode}): {outcome.error}")
                self.log(f"[{i}/{len(todo)}] {outcome.name} {what} in {outcome.wall_time_s / 60:.1f} min")
        except KeyboardInterrupt:
            self._stopping.set()
            for future in futures:
                future.cancel()
            self._kill_all()
            pool.shutdown(wait=True)
            raise
        pool.shutdown(wait=True)
        return outcomes

    def _run_one(self, spec: RunSpec) -> Outcome:
        if self._stopping.is_set():
            return Outcome(spec.name, "interrupted", 0.0, None)
        out = run_dir(self.study, spec)
        out.mkdir(parents=True, exist_ok=True)
        return self._launch(spec, out)

    def _launch(self, spec: RunSpec, out: Path) -> Outcome:
        previous = read_run_info(out) or {}
        if "--resume_from_checkpoint" not in spec.flags:
            # A fresh attempt: the log of a cut-off attempt would otherwise mix into this one's curves.
            (out / "train_log.jsonl").unlink(missing_ok=True)
        cmd, env = launch_command(self.study, spec, out, self.threads)
        info = dict(name=spec.name, task=spec.task, optimizer=spec.optimizer, learning_rate=spec.learning_rate,
                    seed=spec.seed, variant=spec.variant, recipe_args=spec.recipe_args(),
                    optimizer_defaults=optimizer_defaults(spec.optimizer),
                    command=portable_command(self.study, spec, out),
                    omp_num_threads=self.threads, attempts=previous.get("attempts", 0) + 1,
                    started=datetime.now(timezone.utc).isoformat(timespec="seconds"), status="running")
        _write_json(out / "run.json", info)
        start = time.perf_counter()
        returncode, timed_out = None, False
        with open(out / "stdout.log", "w") as stdout, open(out / "stderr.log", "w") as stderr:
            # Own session: a timeout or Ctrl-C kills accelerate's launcher *and* the recipe process it started.
            proc = subprocess.Popen(cmd, stdout=stdout, stderr=stderr, env=env, start_new_session=True)
            with self._lock:
                self._active.add(proc)
                stopping = self._stopping.is_set()  # set before _kill_all took its snapshot: ours to kill
            if stopping:
                _kill_group(proc)
            info["pid"] = proc.pid  # also the process group of the run (its own session)
            _write_json(out / "run.json", info)
            try:
                returncode, timed_out = self._wait(proc, out)
            finally:
                with self._lock:
                    self._active.discard(proc)
        wall = time.perf_counter() - start
        finished = returncode == 0 and (out / "results.json").is_file()
        if self._stopping.is_set() and not finished:
            status, error = "interrupted", "stopped by the study being interrupted"
        elif finished:
            status, error = FINISHED, ""
        else:
            status = FAILED
            error = (f"timed out after {self.timeout:g} s" if timed_out else
                     "exited 0 without writing results.json" if returncode == 0 else "")
        tail = stderr_tail(out / "stderr.log") if status != FINISHED else ""
        if status == FAILED and not error:
            error = error_line(tail) or f"exit code {returncode}, no stderr"
        info.update(status=status, returncode=returncode, wall_time_s=wall, error=error, stderr_tail=tail,
                    ended=datetime.now(timezone.utc).isoformat(timespec="seconds"))
        _write_json(out / "run.json", info)
        return Outcome(spec.name, status, wall, returncode, error)

    def _wait(self, proc: subprocess.Popen, out: Path) -> tuple[int | None, bool]:
        """Waits for the run (return code, timed out); kills it at the timeout."""
        try:
            return proc.wait(timeout=self.timeout), False
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            return None, True

    def _kill_all(self) -> None:
        with self._lock:
            procs = list(self._active)
        for proc in procs:
            _kill_group(proc)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the run is lost either way; it reruns on the next invocation
    except ProcessLookupError:
        pass
    proc.wait()


def _write_json(path: Path, data: dict) -> None:
    write_atomically(path, json.dumps(data, indent=2))  # a study killed mid-write never leaves half a run.json
