"""launch/run.py: the same launch command on a GPU machine and on a CPU-only one."""
import importlib.util
import json
import os
import subprocess
import sys

from conftest import REPO, _free_port
from test_glue_recipe import common

spec = importlib.util.spec_from_file_location("launch_run", REPO / "launch" / "run.py")
launch_run = importlib.util.module_from_spec(spec)
spec.loader.exec_module(launch_run)

DDP = ["--config_file", str(REPO / "launch" / "ddp_single_node.yaml")]
DS = ["--config_file", str(REPO / "launch" / "deepspeed_single_node.yaml")]


def test_cpu_ddp_gets_the_cpu_flag_and_deepspeed_does_not():
    assert launch_run.launch_env(DDP, {}, cuda=False)["ACCELERATE_USE_CPU"] == "true"
    assert launch_run.launch_env(["--multi_gpu", "x.py"], {}, cuda=False)["ACCELERATE_USE_CPU"] == "true"
    # ACCELERATE_USE_CPU would silently switch DeepSpeed off
    assert "ACCELERATE_USE_CPU" not in launch_run.launch_env(DS, {"ACCELERATE_USE_CPU": "true"}, cuda=False)


def test_cpu_processes_get_the_cores_accelerate_would_leave_idle():
    def threads(argv, environ=None):
        out = launch_run.launch_args(argv, environ or {}, cuda=False, cores=8)
        return out[1] if out[0] == "--num_cpu_threads_per_process" else None

    assert threads(["--num_processes", "1", "x.py"]) == "8"
    assert threads(DDP + ["x.py"]) == "4"  # the yaml says 2 processes
    assert threads(["--num_processes", "16", "--num_machines", "2", "x.py"]) == "1"
    mine = ["--num_cpu_threads_per_process", "3", "x.py"]
    assert launch_run.launch_args(mine, {}, cuda=False, cores=8) == mine  # the user's choice stays
    assert launch_run.launch_args(["x.py"], {"OMP_NUM_THREADS": "2"}, cuda=False, cores=8) == ["x.py"]
    assert launch_run.launch_args(["x.py"], {}, cuda=True, cores=8) == ["x.py"]


def test_gpu_machines_run_accelerate_unchanged():
    assert launch_run.launch_env(DDP, {"A": "1"}, cuda=True) == {"A": "1"}


def test_ddp_config_runs_two_processes_on_cpu(glue_dir, tiny_bert, tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, str(REPO / "launch" / "run.py"), *DDP, "--main_process_port", str(_free_port()),
           str(REPO / "recipes" / "glue.py"), *common(glue_dir, tiny_bert, out, "--max_train_steps", "2")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert json.loads((out / "results.json").read_text())["num_processes"] == 2
