#!/usr/bin/env python
"""``accelerate launch`` that runs the same command on a GPU cluster and on a CPU-only machine.

    python launch/run.py --config_file launch/ddp_single_node.yaml recipes/glue.py --task_name mrpc ...
    python launch/run.py --config_file launch/deepspeed_single_node.yaml \\
        --deepspeed_config_file ds_configs/zero3.json recipes/glue.py --task_name mrpc ...

Every argument goes to ``accelerate launch`` unchanged. On a machine with CUDA this only runs it. Without
CUDA it solves accelerate's two CPU catches (../shared/ENVIRONMENT.md), here and nowhere else:

- plain data parallel (``distributed_type: MULTI_GPU`` in the config, or ``--multi_gpu``): accelerate
  would start one process (``--cpu`` expects an MPI hostfile). We set ``ACCELERATE_USE_CPU=true``, which
  keeps the multi-process launcher and gives each process the gloo backend;
- DeepSpeed: ``ACCELERATE_USE_CPU`` would silently turn DeepSpeed off, so it is not set. DeepSpeed picks
  its CPU accelerator itself. The recipes fix accelerate's process count at start-up
  (``adaptopt.deepspeed_run.fix_cpu_deepspeed_state``).

And one CPU performance catch: without ``--cpu``, ``accelerate launch`` runs every process with
``OMP_NUM_THREADS=1``. On a CPU-only machine that leaves all cores but one idle in a 1-process run, which
halved the recipe's throughput against HF's Trainer on 2 cores. Unless you set ``OMP_NUM_THREADS`` or
``--num_cpu_threads_per_process``, we pass cores / processes-per-machine.
"""
from __future__ import annotations

import os
import subprocess
import sys


def _config_value(argv: list[str], key: str) -> str | None:
    """``key`` from the yaml given with --config_file (None if there is none or it does not say)."""
    for i, arg in enumerate(argv):
        path = argv[i + 1] if arg == "--config_file" and i + 1 < len(argv) else (
            arg.split("=", 1)[1] if arg.startswith("--config_file=") else None)
        if path:
            import yaml

            with open(path) as f:
                return (yaml.safe_load(f) or {}).get(key)
    return None


def _arg_value(argv: list[str], flag: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


def launch_args(argv: list[str], environ: dict, cuda: bool, cores: int) -> list[str]:
    """``argv`` plus the CPU thread count accelerate would otherwise set to 1 (see the module docstring)."""
    if cuda or "OMP_NUM_THREADS" in environ or _arg_value(argv, "--num_cpu_threads_per_process"):
        return argv
    processes = int(_arg_value(argv, "--num_processes") or _config_value(argv, "num_processes") or 1)
    machines = int(_arg_value(argv, "--num_machines") or _config_value(argv, "num_machines") or 1)
    per_machine = max(1, processes // max(1, machines))
    return ["--num_cpu_threads_per_process", str(max(1, cores // per_machine)), *argv]


def launch_env(argv: list[str], environ: dict, cuda: bool) -> dict:
    """The environment ``accelerate launch argv`` needs on this machine."""
    env = dict(environ)
    if cuda:
        return env
    distributed = _config_value(argv, "distributed_type")
    if "--use_deepspeed" in argv or distributed == "DEEPSPEED":
        env.pop("ACCELERATE_USE_CPU", None)
    elif "--multi_gpu" in argv or distributed == "MULTI_GPU":
        env["ACCELERATE_USE_CPU"] = "true"
    return env


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    import torch

    cuda = torch.cuda.is_available()
    env = launch_env(argv, os.environ, cuda)
    argv = launch_args(argv, os.environ, cuda, os.cpu_count() or 1)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *argv]
    return subprocess.call(cmd, env=env)


if __name__ == "__main__":
    sys.exit(main())
