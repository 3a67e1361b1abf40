#!/usr/bin/env python
"""``accelerate launch`` inside a SLURM job: the launch arithmetic in one tested place.

    python launch/slurm.py [--gpus_per_node N] [--config_file C] [--print] \\
        [accelerate options ...] recipes/glue.py [recipe args ...]

Run once per machine (the sbatch scripts in slurm/ run it as one srun task per node). From the SLURM
environment of that task it computes

- ``num_machines``: the step's tasks (``SLURM_NTASKS``; else ``SLURM_NNODES``). One task per node is the
  normal case; several tasks per node make each task one "machine" (how the tests run 2 machines on 1 node);
- ``machine_rank``: ``SLURM_NODEID`` with one task per node, ``SLURM_PROCID`` with several;
- ``num_processes`` over all machines: GPUs per node (``--gpus_per_node``, else ``SLURM_GPUS_ON_NODE``, else
  ``SLURM_GPUS_PER_NODE``) divided among the node's tasks, times the machines. On CPU-only nodes pass
  ``--gpus_per_node`` as the number of CPU processes per node;
- ``main_process_ip``: the first host of ``SLURM_JOB_NODELIST`` (``scontrol show hostnames`` when it is
  there, else the pure-Python expansion :func:`expand_nodelist`);
- ``main_process_port``: ``--main_process_port``, else ``10000 + SLURM_JOB_ID % 20000`` (below Linux's
  ephemeral range; the same on every node of the job and after a requeue).

It then runs ``python launch/run.py`` (so CPU-only nodes work too) with those values, the accelerate
config (default: ``launch/ddp_single_node.yaml`` on one machine, ``launch/deepspeed_multi_node.yaml`` on
several), every other option before the recipe passed to ``accelerate launch``, and the recipe with its
arguments unchanged, plus ``--resume_from_checkpoint latest`` unless the arguments already name a
checkpoint (``--no_auto_resume`` turns that off): a requeued job continues from its newest complete
checkpoint, a new one starts fresh. The recipe is the first argument ending in ``.py``.

SIGUSR1 (SLURM's warning before a time limit or preemption) is set to "ignore" before the launch; the
setting is inherited by run.py, ``accelerate launch`` and torchrun, so a USR1 sent to every process of the
job step leaves the launchers running and reaches the recipe processes, which install their own handler
(adaptopt/preemption.py) to save a checkpoint and stop.
"""
from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # runnable as a plain script from a checkout: the repository's adaptopt

from adaptopt.launch import split_command  # noqa: E402

SINGLE_NODE_CONFIG = REPO / "launch" / "ddp_single_node.yaml"
MULTI_NODE_CONFIG = REPO / "launch" / "deepspeed_multi_node.yaml"
PORT_BASE, PORT_SPAN = 10000, 20000


class SlurmEnvError(RuntimeError):
    """A SLURM variable the launch needs is missing or malformed."""


@dataclass(frozen=True)
class LaunchPlan:
    num_machines: int
    num_processes: int  # over all machines
    machine_rank: int
    main_process_ip: str
    main_process_port: int

    def accelerate_args(self) -> list[str]:
        return ["--num_machines", str(self.num_machines), "--num_processes", str(self.num_processes),
                "--machine_rank", str(self.machine_rank), "--main_process_ip", self.main_process_ip,
                "--main_process_port", str(self.main_process_port)]


def _split_top_level(text: str) -> list[str]:
    """Splits at commas that are not inside [...]."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced ']' in node list {text!r}")
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth:
        raise ValueError(f"unbalanced '[' in node list {text!r}")
    parts.append(text[start:])
    return [p for p in (s.strip() for s in parts) if p]


def _expand_range(spec: str, nodelist: str) -> list[str]:
    out = []
    for item in spec.split(","):
        item = item.strip()
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", item)
        if not m:
            raise ValueError(f"bad range {item!r} in node list {nodelist!r}")
        lo, hi = m.group(1), m.group(2) or m.group(1)
        if int(hi) < int(lo):
            raise ValueError(f"descending range {item!r} in node list {nodelist!r}")
        width = len(lo)  # zero padding as written: node[01-10] -> node01 ... node10
        out += [str(n).zfill(width) for n in range(int(lo), int(hi) + 1)]
    return out


def _expand_host(pattern: str, nodelist: str) -> list[str]:
    m = re.search(r"\[([^\[\]]*)\]", pattern)
    if not m:
        return [pattern]
    head, tail = pattern[:m.start()], pattern[m.end():]
    return [h for n in _expand_range(m.group(1), nodelist) for h in _expand_host(head + n + tail, nodelist)]


def expand_nodelist(nodelist: str) -> list[str]:
    """SLURM's compressed host list, expanded in order: ``node[01-03,07]`` -> node01 node02 node03 node07;
    ``a,b``; ``gpu-[1-2]``; ``r[1-2]-n[1-2]`` -> r1-n1 r1-n2 r2-n1 r2-n2 (as ``scontrol show hostnames``)."""
    hosts = [h for part in _split_top_level(nodelist) for h in _expand_host(part, nodelist)]
    if not hosts:
        raise ValueError(f"empty node list {nodelist!r}")
    return hosts


def first_host(nodelist: str, use_scontrol: bool = True) -> str:
    """The first host of a node list; ``scontrol show hostnames`` if available, else :func:`expand_nodelist`."""
    if use_scontrol and shutil.which("scontrol"):
        try:
            out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                                 timeout=30, check=True).stdout.split()
            if out:
                return out[0]
        except (subprocess.SubprocessError, OSError):
            pass
    return expand_nodelist(nodelist)[0]


def _get(env: dict, *names: str) -> str:
    for name in names:
        value = env.get(name)
        if value not in (None, ""):
            return value
    alt = f" (or {', '.join(names[1:])})" if len(names) > 1 else ""
    raise SlurmEnvError(f"{names[0]}{alt} is not set: run this inside a SLURM job step (sbatch/srun), "
                        "or set it by hand")


def _int(env: dict, *names: str) -> int:
    raw = _get(env, *names)
    # SLURM_TASKS_PER_NODE style values like "2(x3)" never reach here; plain integers only
    try:
        return int(raw)
    except ValueError:
        raise SlurmEnvError(f"{names[0]}={raw!r} is not an integer") from None


def gpus_on_node(env: dict) -> int:
    """GPUs of this node from SLURM: ``SLURM_GPUS_ON_NODE`` (a count), else ``SLURM_GPUS_PER_NODE``
    (``4``, ``a100:4`` or ``a100:2,v100:1``)."""
    if env.get("SLURM_GPUS_ON_NODE"):
        return _int(env, "SLURM_GPUS_ON_NODE")
    raw = env.get("SLURM_GPUS_PER_NODE")
    if not raw:
        raise SlurmEnvError("GPUs per node unknown: SLURM_GPUS_ON_NODE (or SLURM_GPUS_PER_NODE) is not set; "
                            "request GPUs with #SBATCH --gpus-per-node=N, or pass --gpus_per_node N "
                            "(on CPU-only nodes: CPU processes per node)")
    total = 0
    for item in raw.split(","):
        count = item.split("(")[0].rsplit(":", 1)[-1]
        if not count.isdigit():
            raise SlurmEnvError(f"SLURM_GPUS_PER_NODE={raw!r}: cannot read a GPU count from {item!r}")
        total += int(count)
    return total


def plan_from_env(env: dict, gpus_per_node: int | None = None, main_process_port: int | None = None,
                  use_scontrol: bool = True) -> LaunchPlan:
    """The launch values for the SLURM task whose environment is ``env``. Raises SlurmEnvError."""
    nodelist = _get(env, "SLURM_JOB_NODELIST", "SLURM_NODELIST")
    nnodes = _int(env, "SLURM_NNODES", "SLURM_JOB_NUM_NODES")
    ntasks = _int(env, "SLURM_NTASKS") if env.get("SLURM_NTASKS") else nnodes
    if ntasks < nnodes or ntasks % nnodes:
        raise SlurmEnvError(f"SLURM_NTASKS={ntasks} over SLURM_NNODES={nnodes}: need the same number of tasks "
                            "on every node (#SBATCH --ntasks-per-node)")
    tasks_per_node = ntasks // nnodes
    if tasks_per_node == 1:
        machine_rank = _int(env, "SLURM_NODEID")
    else:  # several tasks per node: each task is one machine
        machine_rank = _int(env, "SLURM_PROCID")
    if not 0 <= machine_rank < ntasks:
        raise SlurmEnvError(f"machine rank {machine_rank} is outside 0..{ntasks - 1}")
    gpus = gpus_per_node if gpus_per_node is not None else gpus_on_node(env)
    if gpus < tasks_per_node or gpus % tasks_per_node:
        raise SlurmEnvError(f"{gpus} GPUs (processes) per node do not split evenly over {tasks_per_node} "
                            "tasks per node")
    if main_process_port is None:
        main_process_port = PORT_BASE + _int(env, "SLURM_JOB_ID") % PORT_SPAN
    try:
        host = first_host(nodelist, use_scontrol)
    except ValueError as err:
        raise SlurmEnvError(f"SLURM_JOB_NODELIST: {err}") from None
    return LaunchPlan(num_machines=ntasks, num_processes=ntasks * (gpus // tasks_per_node),
                      machine_rank=machine_rank, main_process_ip=host, main_process_port=main_process_port)


def _has_option(args: list[str], name: str) -> bool:
    return any(a == name or a.startswith(name + "=") for a in args)


def build_command(argv: list[str], env: dict, use_scontrol: bool = True) -> tuple[list[str], bool]:
    """The full ``python launch/run.py ...`` command for this task, and whether to only print it."""
    try:
        before, recipe, recipe_args = split_command(argv)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    parser = argparse.ArgumentParser(prog="launch/slurm.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpus_per_node", type=int, default=None,
                        help="processes per node (GPUs; CPU processes on CPU-only nodes). "
                             "Default: SLURM_GPUS_ON_NODE / SLURM_GPUS_PER_NODE")
    parser.add_argument("--main_process_port", type=int, default=None, help="default: from SLURM_JOB_ID")
    parser.add_argument("--config_file", default=None,
                        help=f"accelerate config (default: {SINGLE_NODE_CONFIG.relative_to(REPO)} on one "
                             f"machine, {MULTI_NODE_CONFIG.relative_to(REPO)} on several)")
    parser.add_argument("--no_auto_resume", action="store_true",
                        help="do not add --resume_from_checkpoint latest to the recipe's arguments")
    parser.add_argument("--print", action="store_true", help="print the command instead of running it")
    opts, accelerate_opts = parser.parse_known_args(before)
    plan = plan_from_env(env, opts.gpus_per_node, opts.main_process_port, use_scontrol)
    config = opts.config_file or str(SINGLE_NODE_CONFIG if plan.num_machines == 1 else MULTI_NODE_CONFIG)
    if not opts.no_auto_resume and not _has_option(recipe_args, "--resume_from_checkpoint"):
        recipe_args = [*recipe_args, "--resume_from_checkpoint", "latest"]
    cmd = [sys.executable, str(REPO / "launch" / "run.py"), "--config_file", config, *plan.accelerate_args(),
           *accelerate_opts, recipe, *recipe_args]
    return cmd, opts.print


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    try:
        cmd, only_print = build_command(argv, dict(os.environ))
    except SlurmEnvError as err:
        print(f"launch/slurm.py: error: {err}", file=sys.stderr)
        return 2
    print(shlex.join(cmd), flush=True)
    if only_print:
        return 0
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # inherited through exec by every launcher process
    os.execv(cmd[0], cmd)


if __name__ == "__main__":
    sys.exit(main())
