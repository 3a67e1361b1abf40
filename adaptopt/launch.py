"""How a recipe is started: the ``accelerate launch`` command and environment, built in one place for
every caller (``launch/run.py`` for users, the benchmarks, the optimizer study, the tests).

    from adaptopt.launch import launcher_args, recipe_command, run_recipe

    cmd, env = recipe_command(["--num_processes", "2", "--multi_gpu"], "recipes/glue.py", ["--task_name", "mrpc"])
    run_recipe(launcher_args(processes=2, deepspeed_config="ds_configs/zero2.json"), "recipes/glue.py", [...])

``accelerate launch`` on a machine without CUDA has three catches, solved here and nowhere else:

- **Threads.** Without ``--cpu``, accelerate runs every process with ``OMP_NUM_THREADS=1``. On a CPU-only
  machine that leaves all cores but one idle in a 1-process run, which halved the recipe's throughput
  against HF's Trainer on 2 cores. The policy: ``threads`` when the caller gives it (the study, the
  benchmarks and the tests do); else ``--num_cpu_threads_per_process`` or ``OMP_NUM_THREADS`` when the
  user set one; else cores / processes per machine. On a CUDA machine accelerate's own choice stays.
- **Plain data parallel** (``--multi_gpu``, or ``distributed_type: MULTI_GPU`` in the ``--config_file``
  yaml): accelerate would start one process (``--cpu`` expects an MPI hostfile). ``ACCELERATE_USE_CPU=true``
  keeps the multi-process launcher and gives each process the gloo backend.
- **DeepSpeed**: ``ACCELERATE_USE_CPU`` would silently turn DeepSpeed off, so it is removed from the
  environment. DeepSpeed picks its CPU accelerator itself, and the recipes fix accelerate's process count
  at start-up (``adaptopt.deepspeed_run.fix_cpu_deepspeed_state``).
"""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Iterable, Mapping

REPO = Path(__file__).resolve().parents[1]
# accelerate configs of the repository's launch/ folder, for launcher_args(deepspeed_config=...)
DEEPSPEED_SINGLE_NODE = REPO / "launch" / "deepspeed_single_node.yaml"
DEEPSPEED_MULTI_NODE = REPO / "launch" / "deepspeed_multi_node.yaml"
ACCELERATE_LAUNCH = [sys.executable, "-m", "accelerate.commands.launch"]


def split_command(argv: list[str]) -> tuple[list[str], str, list[str]]:
    """(accelerate options, the recipe, the recipe's arguments): the recipe is the first argument ending in
    ``.py`` that is not an option, or the module after accelerate's ``-m``/``--module`` (which stays with the
    options). Raises ValueError when there is none."""
    for i, arg in enumerate(argv):
        if arg in ("-m", "--module") and i + 1 < len(argv):
            return argv[:i + 1], argv[i + 1], argv[i + 2:]
        if arg.endswith(".py") and not arg.startswith("-"):
            return argv[:i], arg, argv[i + 1:]
    raise ValueError("no recipe given (the first argument ending in .py, e.g. recipes/glue.py, or -m module)")


def _option(args: list[str], flag: str) -> str | None:
    """The value of ``flag`` in ``args`` (``--flag v`` or ``--flag=v``), or None."""
    for i, arg in enumerate(args):
        if arg == flag and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


def _config_value(args: list[str], key: str):
    """``key`` from the yaml given with --config_file (None if there is none or it does not say)."""
    path = _option(args, "--config_file")
    if not path:
        return None
    import yaml

    with open(path) as f:
        return (yaml.safe_load(f) or {}).get(key)


def launcher_args(*, processes: int = 1, machines: int = 1, machine_rank: int | None = None,
                  main_process_ip: str | None = None, main_process_port: int | None = None,
                  mixed_precision: str = "no", deepspeed_config: str | Path | None = None,
                  config_file: str | Path | None = None) -> list[str]:
    """The ``accelerate launch`` options of the usual cases: one process; ``processes`` DDP processes; or,
    with ``deepspeed_config`` (a DeepSpeed JSON, e.g. ds_configs/zero2.json), DeepSpeed through
    launch/deepspeed_single_node.yaml (several ``machines``: deepspeed_multi_node.yaml) or ``config_file``.
    ``processes`` counts all machines' processes, as accelerate's ``--num_processes`` does."""
    if deepspeed_config is not None:
        config = config_file or (DEEPSPEED_SINGLE_NODE if machines == 1 else DEEPSPEED_MULTI_NODE)
        # precision from the command line into the JSON's "auto" fp16/bf16; the yaml names none (see its comment)
        args = ["--config_file", str(config), "--deepspeed_config_file", str(deepspeed_config),
                "--num_processes", str(processes)]
        if machines > 1:
            args += ["--num_machines", str(machines)]
        if mixed_precision != "no":
            args += ["--mixed_precision", mixed_precision]
    else:
        args = ["--config_file", str(config_file)] if config_file else []
        args += [*(["--multi_gpu"] if processes > 1 else []), "--num_processes", str(processes),
                 "--num_machines", str(machines), "--mixed_precision", mixed_precision, "--dynamo_backend", "no"]
    if machine_rank is not None:
        args += ["--machine_rank", str(machine_rank)]
    if main_process_ip is not None:
        args += ["--main_process_ip", main_process_ip]
    if main_process_port is not None:
        args += ["--main_process_port", str(main_process_port)]
    return args


def available_cores() -> int:
    """The cores this process may use; inside a SLURM job no more than its allocation (SLURM_CPUS_PER_TASK),
    which a cluster without CPU binding does not show in the affinity mask."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    slurm = os.environ.get("SLURM_CPUS_PER_TASK", "")
    return min(cores, int(slurm)) if slurm.isdigit() and int(slurm) > 0 else cores


def threads_per_process(args: list[str], cores: int, concurrent_runs: int = 1) -> int:
    """CPU threads for each process of ``accelerate launch args`` so that ``concurrent_runs`` such launches
    share ``cores`` cores: cores / (runs x processes per machine), at least 1."""
    processes = int(_option(args, "--num_processes") or _config_value(args, "num_processes") or 1)
    machines = int(_option(args, "--num_machines") or _config_value(args, "num_machines") or 1)
    per_machine = max(1, processes // max(1, machines))
    return max(1, cores // (max(1, concurrent_runs) * per_machine))


def recipe_command(launcher: list[str], recipe: str | Path, recipe_args: Iterable[str] = (), *,
                   threads: int | None = None, environ: Mapping[str, str] | None = None,
                   cuda: bool | None = None, cores: int | None = None) -> tuple[list[str], dict[str, str]]:
    """(command, environment) that runs ``accelerate launch <launcher> <recipe> <recipe_args>`` on this
    machine, with the thread policy and the CPU catches of the module docstring.

    ``threads``: CPU threads per process (default: the policy). ``environ``: the environment to start from
    (default os.environ). ``cuda``/``cores``: the machine (default: torch.cuda.is_available(), available_cores())."""
    environ = os.environ if environ is None else environ
    if cuda is None:
        import torch

        cuda = torch.cuda.is_available()
    args, env = list(launcher), dict(environ)
    chosen = _option(args, "--num_cpu_threads_per_process")
    if threads is not None:
        if chosen is not None and int(chosen) != threads:
            raise ValueError(f"threads={threads} and --num_cpu_threads_per_process {chosen} disagree: give one")
        if chosen is None:
            args = ["--num_cpu_threads_per_process", str(threads), *args]
    elif not cuda and chosen is None and "OMP_NUM_THREADS" not in environ:
        args = ["--num_cpu_threads_per_process", str(threads_per_process(args, cores or available_cores())), *args]
    if not cuda:
        distributed = _config_value(args, "distributed_type")
        if "--use_deepspeed" in args or distributed == "DEEPSPEED":
            env.pop("ACCELERATE_USE_CPU", None)
        elif "--multi_gpu" in args or distributed == "MULTI_GPU":
            env["ACCELERATE_USE_CPU"] = "true"
    return [*ACCELERATE_LAUNCH, *args, str(recipe), *map(str, recipe_args)], env


def command_line(cmd: list[str]) -> str:
    """``cmd`` as a shell line a reader can run: ``accelerate launch ...`` instead of this interpreter's path."""
    if cmd[:len(ACCELERATE_LAUNCH)] == ACCELERATE_LAUNCH:
        return shlex.join(["accelerate", "launch", *cmd[len(ACCELERATE_LAUNCH):]])
    return shlex.join(cmd)


class RecipeFailed(RuntimeError):
    """A launched recipe exited with a non-zero code; the message ends with the tail of its output."""

    def __init__(self, cmd: list[str], returncode: int, tail: str, log: str | Path | None = None):
        where = f"; its output is in {log}" if log is not None else ""
        super().__init__(f"{command_line(cmd)} failed (exit {returncode}){where}:\n{tail}")
        self.returncode = returncode


def results_of(launcher: list[str], recipe: str | Path, recipe_args: list[str], out: str | Path, *,
               threads: int | None = None, env: Mapping[str, str] | None = None, log: str | Path | None = None,
               cwd: str | Path | None = None) -> dict:
    """The results.json of the recipe run writing to ``out`` (``recipe_args`` carry ``--output_dir out``),
    running it first unless it finished before: a finished run is one whose results.json exists, the study
    runner's rule, so a benchmark restarted after an interruption goes on where it stopped."""
    results = Path(out) / "results.json"
    if not results.is_file():
        print(f"running: {command_line(recipe_command(launcher, recipe, recipe_args, threads=threads)[0])}",
              flush=True)
        if log is not None:
            Path(log).parent.mkdir(parents=True, exist_ok=True)
        run_recipe(launcher, recipe, recipe_args, threads=threads, env=env, log=log, cwd=cwd)
    return json.loads(results.read_text())


def run_recipe(launcher: list[str], recipe: str | Path, recipe_args: Iterable[str] = (), *,
               threads: int | None = None, env: Mapping[str, str] | None = None, log: str | Path | None = None,
               timeout: float | None = None, cwd: str | Path | None = None,
               check: bool = True) -> subprocess.CompletedProcess:
    """Runs ``recipe_command(...)`` to the end. ``env``: variables added to os.environ. Output goes to the
    file ``log`` (stdout and stderr together), else it is captured as text in the returned process.
    ``check``: raise RecipeFailed, with the last lines of the output, on a non-zero exit."""
    cmd, run_env = recipe_command(launcher, recipe, recipe_args, threads=threads, environ={**os.environ, **(env or {})})
    if log is None:
        proc = subprocess.run(cmd, env=run_env, cwd=cwd, timeout=timeout, capture_output=True, text=True)
        tail = proc.stderr[-6000:]
    else:
        with open(log, "w") as out:
            proc = subprocess.run(cmd, env=run_env, cwd=cwd, timeout=timeout, stdout=out, stderr=subprocess.STDOUT)
        tail = "\n".join(Path(log).read_text(errors="replace").splitlines()[-30:])
    if check and proc.returncode != 0:
        raise RecipeFailed(cmd, proc.returncode, tail, log)
    return proc
