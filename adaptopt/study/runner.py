"""Runs a study's grid through the real recipe: one `accelerate launch` subprocess per run, N at a time.

Each run lives in ``<study>/runs/<run name>/``. The recipe writes results.json and train_log.jsonl
there; the runner writes run.json (command, threads, status, return code, wall time, attempts),
stdout.log and stderr.log. A run is finished when its results.json exists: the next invocation skips
it, so a study stopped at any point resumes where it was. A run that exits non-zero (or exits 0
without results.json, or times out) is recorded as failed, with the tail of its stderr in run.json,
and the other runs go on.

Several runners may share one study folder (one per core or per machine, e.g. SLURM jobs on a shared
file system): a runner claims a run before starting it (``runs/<run>/claim.json``, created atomically)
and skips a run that another live runner holds or that finished since it made its list. A claim is a
lease: its runner touches it every HEARTBEAT_S while the run goes. A claim whose runner died on this host is
taken over at once; one from another host (whose processes cannot be checked from here) once it has not been
touched for LEASE_S, so a node that crashed or a job killed with SIGKILL holds its run for minutes, not forever.
"""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from ..registry import default_hyperparameters
from .config import RunSpec, Study, StudyConfigError
from .files import write_atomically

FINISHED, FAILED, PENDING = "finished", "failed", "pending"
SKIPPED = "skipped"  # held by another runner, or finished by one since this runner made its list
CLAIM = "claim.json"
HEARTBEAT_S = 60.0  # a runner touches its claim this often while its run goes
TAKEOVER_SETTLE_S = 1.0  # after taking a stale claim over: time for a concurrent taker's delete to show
LEASE_S = 900.0  # another host's claim untouched this long is stale: 15 heartbeats missed, file-system clocks apart
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
    return study.output_dir / "runs" / spec.name


def read_run_info(directory: Path) -> dict | None:
    try:
        return json.loads((directory / "run.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def run_status(directory: Path) -> str:
    """finished (results.json exists), failed (the last attempt failed), or pending (never ran, or was cut off)."""
    if (directory / "results.json").is_file():
        return FINISHED
    info = read_run_info(directory)
    return FAILED if info and info.get("status") == FAILED else PENDING


def claim_run(directory: Path) -> str | None:
    """Claims the run in ``directory`` for this process. None when claimed; otherwise who holds it.

    The claim is a file created with O_EXCL, so two runners on one file system cannot both get it. A
    stale claim (``_stale``: its runner died) is deleted and claimed anew. Two runners may find the same
    stale claim, and the second one's delete may remove the first one's new claim, so after a takeover a
    runner waits a moment and keeps the run only if the claim on disk is still its own."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / CLAIM
    mine = dict(host=socket.gethostname(), pid=os.getpid(),
                since=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    took_over = False
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                held = json.loads(path.read_text())
            except FileNotFoundError:  # released meanwhile: try again
                continue
            except json.JSONDecodeError:  # being written right now, or its runner died while writing it
                held = {}
            if not _stale(held, path):
                return (f"runner pid {held.get('pid')} on {held.get('host')} since {held.get('since')}" if held
                        else "another runner (its claim is being written)")
            path.unlink(missing_ok=True)
            took_over = True
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(mine, f)
        if took_over:
            time.sleep(TAKEOVER_SETTLE_S)
            if not _is_mine(path):
                return "another runner (it took the stale claim over at the same time)"
        return None
    return "another runner (the claim changed hands while this runner tried to take it)"


def _is_mine(path: Path) -> bool:
    try:
        held = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return False
    return held.get("pid") == os.getpid() and held.get("host") == socket.gethostname()


def release_run(directory: Path) -> None:
    path = directory / CLAIM
    if _is_mine(path):
        path.unlink(missing_ok=True)


def refresh_claim(directory: Path) -> bool:
    """Touches this process's claim (the lease's heartbeat). False if the claim is not ours any more: it
    was taken over as stale (this runner was stopped for longer than LEASE_S) or deleted by hand."""
    path = directory / CLAIM
    if not _is_mine(path):
        return False
    os.utime(path)
    return True


def _stale(claim: dict, path: Path) -> bool:
    """A claim of this host: its process is gone. Another host's claim (its processes cannot be checked from
    here), or one that cannot be read (its runner died while writing it): not touched for LEASE_S."""
    if claim.get("host") == socket.gethostname():
        try:
            os.kill(int(claim["pid"]), 0)
        except ProcessLookupError:
            return True
        except (PermissionError, KeyError, TypeError, ValueError):
            return False
        return False
    try:
        return time.time() - path.stat().st_mtime > LEASE_S
    except FileNotFoundError:
        return False  # released meanwhile: the next O_EXCL attempt decides


def launch_command(study: Study, spec: RunSpec, out: Path) -> list[str]:
    """The exact command of one run: what `accelerate launch <launcher> <recipe> <args>` runs."""
    return [sys.executable, "-m", "accelerate.commands.launch", *study.launcher, str(study.recipe),
            *spec.recipe_args(), "--output_dir", str(out)]


def available_cores() -> int:
    """The cores this process may use; inside a SLURM job no more than its allocation (SLURM_CPUS_PER_TASK),
    which a cluster without CPU binding does not show in the affinity mask."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    slurm = os.environ.get("SLURM_CPUS_PER_TASK", "")
    return min(cores, int(slurm)) if slurm.isdigit() and int(slurm) > 0 else cores


def threads_per_run(launcher: list[str], jobs: int, cores: int) -> int:
    """OMP threads per process so that `jobs` runs of `--num_processes` processes share the cores."""
    processes = 1
    for i, arg in enumerate(launcher):
        if arg == "--num_processes" and i + 1 < len(launcher):
            processes = int(launcher[i + 1])
        elif arg.startswith("--num_processes="):
            processes = int(arg.split("=", 1)[1])
    return max(1, cores // (jobs * max(1, processes)))


def optimizer_defaults(name: str) -> dict:
    """The library's defaults for the optimizer, as run.json stores them (JSON: tuples become lists)."""
    return json.loads(json.dumps(default_hyperparameters(name)))


def check_unchanged(study: Study, specs: list[RunSpec]) -> None:
    """Refuses to mix results of an edited study file or of changed library defaults: a finished run must
    have run with today's arguments and today's optimizer defaults (the flags a study does not set)."""
    changed, defaults = [], {}
    for spec in specs:
        directory = run_dir(study, spec)
        info = read_run_info(directory)
        if run_status(directory) != FINISHED or not info:
            continue
        if spec.optimizer not in defaults:
            defaults[spec.optimizer] = optimizer_defaults(spec.optimizer)
        if info.get("recipe_args") != spec.recipe_args() or info.get("optimizer_defaults") != defaults[spec.optimizer]:
            changed.append(spec.name)
    if changed:
        raise StudyConfigError(
            f"{len(changed)} finished run(s) in {study.output_dir} ran with other arguments than the study file now "
            f"gives, or with other optimizer defaults than the library now has (e.g. {', '.join(changed[:3])}; "
            "compare their run.json): use a new --output_dir, or delete those run folders to redo them")


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

    accelerate launch ends every failure with its own CalledProcessError traceback (and exit code 1,
    whatever the recipe's was), which says nothing about the cause, so it is skipped."""
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
        self.threads = threads_per_run(study.launcher, jobs, cores or available_cores())
        self._active: set[subprocess.Popen] = set()
        self._lock = threading.Lock()
        self._stopping = threading.Event()

    def pending(self, specs: list[RunSpec], retry_failed: bool = True) -> list[RunSpec]:
        todo = []
        for spec in specs:
            status = run_status(run_dir(self.study, spec))
            if status == PENDING or (status == FAILED and retry_failed):
                todo.append(spec)
        return todo

    def run(self, specs: list[RunSpec], retry_failed: bool = True) -> list[Outcome]:
        """Runs the specs that are not finished (and, with ``retry_failed=False``, not failed before)."""
        todo = self.pending(specs, retry_failed)
        self.log(f"{len(specs) - len(todo)} of {len(specs)} runs already done or skipped; running {len(todo)}, "
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
                        f"skipped: {outcome.error}" if outcome.status == SKIPPED else
                        f"FAILED (exit {outcome.returncode}): {outcome.error}")
                took = "" if outcome.status == SKIPPED else f" in {outcome.wall_time_s / 60:.1f} min"
                self.log(f"[{i}/{len(todo)}] {outcome.name} {what}{took}")
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
        out = run_dir(self.study, spec)
        if self._stopping.is_set():
            return Outcome(spec.name, "interrupted", 0.0, None)
        holder = claim_run(out)
        if holder is not None:
            return Outcome(spec.name, SKIPPED, 0.0, None, f"held by {holder}")
        try:
            if run_status(out) == FINISHED:  # another runner finished it after this one made its list
                return Outcome(spec.name, SKIPPED, 0.0, None, "finished by another runner")
            return self._launch(spec, out)
        finally:
            release_run(out)

    def _launch(self, spec: RunSpec, out: Path) -> Outcome:
        previous = read_run_info(out) or {}
        if "--resume_from_checkpoint" not in spec.flags:
            # A fresh attempt: the log of a cut-off attempt would otherwise mix into this one's curves.
            (out / "train_log.jsonl").unlink(missing_ok=True)
        cmd = launch_command(self.study, spec, out)
        info = dict(name=spec.name, task=spec.task, optimizer=spec.optimizer, learning_rate=spec.learning_rate,
                    seed=spec.seed, variant=spec.variant, recipe_args=spec.recipe_args(),
                    optimizer_defaults=optimizer_defaults(spec.optimizer), command=cmd,
                    omp_num_threads=self.threads, attempts=previous.get("attempts", 0) + 1,
                    started=datetime.now(timezone.utc).isoformat(timespec="seconds"), status="running")
        _write_json(out / "run.json", info)
        env = dict(os.environ, OMP_NUM_THREADS=str(self.threads))
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
        """Waits for the run (return code, timed out), touching its claim every HEARTBEAT_S; kills it at the timeout."""
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        warned = False
        while True:
            left = None if deadline is None else deadline - time.monotonic()
            try:
                return proc.wait(timeout=HEARTBEAT_S if left is None else max(0.0, min(HEARTBEAT_S, left))), False
            except subprocess.TimeoutExpired:
                if left is not None and left <= HEARTBEAT_S:
                    _kill_group(proc)
                    return None, True
            if not refresh_claim(out) and not warned:
                warned = True
                self.log(f"warning: {out.name}: this runner's claim was taken over or deleted; another runner "
                         f"may be running it too (was this runner stopped for over {LEASE_S:g} s?)")

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
