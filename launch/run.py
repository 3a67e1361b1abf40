#!/usr/bin/env python
"""``accelerate launch`` that runs the same command on a GPU cluster and on a CPU-only machine.

    python launch/run.py --config_file launch/ddp_single_node.yaml recipes/glue.py --task_name mrpc ...
    python launch/run.py --config_file launch/deepspeed_single_node.yaml \\
        --deepspeed_config_file ds_configs/zero3.json recipes/glue.py --task_name mrpc ...

The options before the recipe (the first argument ending in .py) go to ``accelerate launch`` and the rest
to the recipe, unchanged. On a machine with CUDA this only runs it. Without CUDA it gives every process
cores / processes-per-machine threads unless you set ``OMP_NUM_THREADS`` or ``--num_cpu_threads_per_process``
(accelerate alone would give each one thread), and makes multi-process DDP and DeepSpeed run on CPU
processes: ``adaptopt/launch.py`` says how, and is what the benchmarks, the optimizer study and the tests
launch recipes through too.

It exits with the recipe's exit code (0 done, 2 bad input, 3 too many skipped updates, 75 preempted after a
checkpoint), where ``accelerate launch`` exits 1 on any failure, and shows each distinct error line once
instead of once per process under a launcher traceback.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

# Runnable as a plain script from a checkout: make the repository's adaptopt importable.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from adaptopt.launch import ACCELERATE_LAUNCH, launch, recipe_command, split_command  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    try:
        launcher, recipe, recipe_args = split_command(argv)
    except ValueError as err:
        print(f"launch/run.py: error: {err}", file=sys.stderr)
        return 2
    cmd, env = recipe_command(launcher, recipe, recipe_args)
    # in this process: a signal to it (scancel, Ctrl-C) reaches accelerate's launcher, which stops the recipe
    os.environ.clear()
    os.environ.update(env)
    return launch(cmd[len(ACCELERATE_LAUNCH):])


if __name__ == "__main__":
    sys.exit(main())
