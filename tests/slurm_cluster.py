"""A real one-node SLURM cluster on localhost for the tests: munged, slurmctld and slurmd (Debian's slurm-wlm
and munge packages, installed with apt-get where missing) started by hand, as the test machines have no
systemd, with a generated slurm.conf in a temporary folder, on free ports (docs/slurm.md does the same by
hand). Only daemons started here are stopped, by the PIDs in their pid files.

    python tests/slurm_cluster.py /tmp/cluster     # start one by hand; prints the SLURM_CONF to export
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

DAEMONS = ("/usr/sbin/munged", "/usr/sbin/slurmctld", "/usr/sbin/slurmd")
MUNGE_SOCKET = Path("/run/munge/munge.socket.2")


class SlurmUnavailable(RuntimeError):
    pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def ensure_installed() -> None:
    """apt-get installs slurm-wlm and munge if they are missing; SlurmUnavailable if that is impossible."""
    if all(Path(d).exists() for d in DAEMONS) and shutil.which("sbatch"):
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise SlurmUnavailable("slurm-wlm/munge are not installed and apt-get is unavailable (needs root): "
                               "apt-get install -y slurm-wlm munge")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "slurm-wlm", "munge"]):
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
        if proc.returncode != 0:
            raise SlurmUnavailable(f"{' '.join(cmd)} failed: {proc.stderr[-2000:]}")
    if not all(Path(d).exists() for d in DAEMONS):
        raise SlurmUnavailable("apt-get install slurm-wlm munge did not provide " + ", ".join(DAEMONS))


def _write_conf(root: Path, host: str, cpus: int) -> Path:
    for sub in ("state", "spool", "log"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    conf = root / "slurm.conf"
    conf.write_text(f"""\
ClusterName=adaptopt-test
SlurmctldHost={host}
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
AuthType=auth/munge
# a requeued job may start again after cred_expire seconds (default 120)
AuthInfo=cred_expire=10
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobRequeue=1
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2
KillWait=10
ReturnToService=2
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
NodeName={host} CPUs={cpus} RealMemory=2000 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")
    return conf


def _pid(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


class Cluster:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.host = socket.gethostname()
        self.conf: Path | None = None
        self.started: list[tuple[str, Path]] = []  # (name, pid file) of the daemons this object started
        self.jobs: list[int] = []

    @property
    def env(self) -> dict:
        return dict(os.environ, SLURM_CONF=str(self.conf))

    def start(self, cpus: int | None = None) -> "Cluster":
        ensure_installed()
        self.root.mkdir(parents=True, exist_ok=True)
        self.conf = _write_conf(self.root, self.host, cpus or os.cpu_count() or 1)
        if not self._munge_ok():
            run = Path("/run/munge")
            run.mkdir(parents=True, exist_ok=True)
            shutil.chown(run, "munge", "munge")
            if not Path("/etc/munge/munge.key").exists():
                subprocess.run(["runuser", "-u", "munge", "--", "/usr/sbin/mungekey", "--create"], check=True)
            subprocess.run(["runuser", "-u", "munge", "--", "/usr/sbin/munged"], check=True, timeout=30)
            self.started.append(("munged", run / "munged.pid"))
            self._wait(self._munge_ok, 20, "munged did not start")
        env = self.env
        subprocess.run(["/usr/sbin/slurmctld", "-f", str(self.conf)], check=True, env=env, timeout=30)
        self.started.append(("slurmctld", self.root / "slurmctld.pid"))
        self._wait(lambda: subprocess.run(["scontrol", "ping"], env=env, capture_output=True, text=True)
                   .stdout.count("UP") > 0, 30, "slurmctld does not answer")
        subprocess.run(["/usr/sbin/slurmd", "-f", str(self.conf)], check=True, env=env, timeout=30)
        self.started.append(("slurmd", self.root / "slurmd.pid"))
        self._wait(self._node_idle, 60, "the node did not become idle")
        return self

    def _munge_ok(self) -> bool:
        if not MUNGE_SOCKET.exists() or not shutil.which("munge"):
            return False
        return subprocess.run("munge -n | unmunge", shell=True, capture_output=True).returncode == 0

    def _node_idle(self) -> bool:
        out = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], env=self.env, capture_output=True, text=True).stdout
        return out.strip().startswith("idle")

    def _wait(self, ok, timeout: float, what: str) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if ok():
                return
            time.sleep(0.5)
        logs = "".join(f"\n--- {p.name}:\n{p.read_text()[-3000:]}" for p in (self.root / "log").glob("*.log"))
        raise SlurmUnavailable(f"{what}{logs}")

    def stop(self) -> None:
        if self.jobs and self.conf is not None:  # jobs left by a failed test: end them before their slurmd
            subprocess.run(["scancel", *map(str, self.jobs)], env=self.env, capture_output=True)
            end = time.monotonic() + 30
            while time.monotonic() < end and subprocess.run(
                    ["squeue", "-h", "-j", ",".join(map(str, self.jobs))], env=self.env, capture_output=True,
                    text=True).stdout.strip():
                time.sleep(0.5)
        for name, pidfile in reversed(self.started):
            pid = _pid(pidfile)
            if pid is None:
                continue
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
            for _ in range(50):
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.2)
            else:
                os.kill(pid, signal.SIGKILL)
        self.started.clear()

    # --- jobs -----------------------------------------------------------------------------------
    def sbatch(self, args: list[str], cwd: Path, env: dict | None = None) -> int:
        proc = subprocess.run(["sbatch", "--parsable", *args], cwd=cwd, capture_output=True, text=True,
                              env={**self.env, **(env or {})}, timeout=60)
        if proc.returncode != 0:
            raise RuntimeError(f"sbatch {' '.join(args)} failed: {proc.stderr}")
        job_id = int(proc.stdout.strip().split(";")[0])
        self.jobs.append(job_id)
        return job_id

    def job(self, job_id: int) -> dict:
        """``scontrol show job`` as a dict (JobState, Restarts, ExitCode, ...); {} once the job is forgotten."""
        out = subprocess.run(["scontrol", "-o", "show", "job", str(job_id)], env=self.env, capture_output=True,
                             text=True).stdout
        fields = {}
        for item in out.split():
            if "=" in item:
                k, v = item.split("=", 1)
                fields.setdefault(k, v)
        return fields

    def wait(self, job_id: int, timeout: float, until=None) -> dict:
        """Polls until the job reached a final state (or ``until(job)`` is true); returns the last job dict."""
        end = time.monotonic() + timeout
        job = {}
        while time.monotonic() < end:
            job = self.job(job_id)
            if until is not None and until(job):
                return job
            if until is None and job.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT",
                                                         "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"):
                return job
            time.sleep(0.5)
        raise TimeoutError(f"job {job_id} after {timeout}s: {job}")


if __name__ == "__main__":
    c = Cluster(Path(sys.argv[1])).start()
    print(f"export SLURM_CONF={c.conf}")
    print("started:", c.started)
