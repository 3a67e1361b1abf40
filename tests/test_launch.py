"""adaptopt/launch.py and launch/run.py: the same launch command on a GPU machine and on a CPU-only one."""
import json
import os
import re
import subprocess
import sys

import pytest

from adaptopt.launch import (RecipeFailed, command_line, launcher_args, recipe_command, results_of, run_recipe,
                             split_command, threads_per_process)
from conftest import REPO, _free_port
from test_glue_recipe import common

DDP = ["--config_file", str(REPO / "launch" / "ddp_single_node.yaml")]
DS = ["--config_file", str(REPO / "launch" / "deepspeed_single_node.yaml")]


def env_of(launcher, environ=None, cuda=False):
    return recipe_command(launcher, "x.py", environ=environ or {}, cuda=cuda, cores=8)[1]


def threads_of(launcher, environ=None, cuda=False, threads=None):
    cmd, _ = recipe_command(launcher, "x.py", environ=environ or {}, cuda=cuda, cores=8, threads=threads)
    return cmd[cmd.index("--num_cpu_threads_per_process") + 1] if "--num_cpu_threads_per_process" in cmd else None


def test_cpu_ddp_gets_the_cpu_flag_and_deepspeed_does_not():
    assert env_of(DDP)["ACCELERATE_USE_CPU"] == "true"
    assert env_of(["--multi_gpu", "--num_processes", "2"])["ACCELERATE_USE_CPU"] == "true"
    # ACCELERATE_USE_CPU would silently switch DeepSpeed off
    assert "ACCELERATE_USE_CPU" not in env_of(DS, {"ACCELERATE_USE_CPU": "true"})
    assert "ACCELERATE_USE_CPU" not in env_of(launcher_args(processes=2, deepspeed_config="z.json"),
                                              {"ACCELERATE_USE_CPU": "true"})
    assert "ACCELERATE_USE_CPU" not in env_of(["--num_processes", "1"])  # one process needs no launcher switch


def test_cpu_processes_get_the_cores_accelerate_would_leave_idle():
    assert threads_of(["--num_processes", "1"]) == "8"
    assert threads_of(DDP) == "4"  # the yaml says 2 processes
    assert threads_of(["--num_processes", "16", "--num_machines", "2"]) == "1"
    mine = ["--num_cpu_threads_per_process", "3"]
    cmd, _ = recipe_command(mine, "x.py", ["--seed", "1"], environ={}, cuda=False, cores=8)
    assert cmd[3:] == [*mine, "x.py", "--seed", "1"]  # the user's choice stays, nothing added
    assert threads_of([], {"OMP_NUM_THREADS": "2"}) is None  # accelerate passes the user's variable on
    assert threads_of([], cuda=True) is None  # GPU processes: accelerate's own choice


def test_a_caller_sets_the_threads_and_a_second_value_is_refused():
    assert threads_of(DDP, {"OMP_NUM_THREADS": "2"}, threads=1) == "1"
    assert threads_of([], cuda=True, threads=3) == "3"
    with pytest.raises(ValueError, match="threads=1 and --num_cpu_threads_per_process 2 disagree"):
        recipe_command(["--num_cpu_threads_per_process", "2"], "x.py", threads=1, cuda=False)


def test_concurrent_runs_share_the_cores():
    """The optimizer study runs --jobs N launches at once: each process gets its share of the cores."""
    assert threads_per_process(["--num_processes", "1"], cores=8, concurrent_runs=2) == 4
    assert threads_per_process(DDP, cores=8, concurrent_runs=2) == 2
    assert threads_per_process(["--num_processes", "4"], cores=2, concurrent_runs=3) == 1


def test_gpu_machines_run_accelerate_unchanged():
    cmd, env = recipe_command(DDP, "x.py", ["--a"], environ={"A": "1"}, cuda=True)
    assert env == {"A": "1"} and cmd == [sys.executable, "-m", "accelerate.commands.launch", *DDP, "x.py", "--a"]


def test_launcher_args_of_the_usual_cases():
    assert launcher_args() == ["--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no",
                               "--dynamo_backend", "no"]
    assert launcher_args(processes=2, mixed_precision="bf16", main_process_port=1234)[:3] == [
        "--multi_gpu", "--num_processes", "2"]
    ds = launcher_args(processes=2, deepspeed_config="ds_configs/zero3.json")
    assert ds == ["--config_file", str(REPO / "launch" / "deepspeed_single_node.yaml"),
                  "--deepspeed_config_file", "ds_configs/zero3.json", "--num_processes", "2"]
    two = launcher_args(processes=2, machines=2, machine_rank=1, main_process_ip="10.0.0.1", main_process_port=29500,
                        deepspeed_config="z.json", mixed_precision="fp16")
    assert two[:2] == ["--config_file", str(REPO / "launch" / "deepspeed_multi_node.yaml")]
    assert two[4:] == ["--num_processes", "2", "--num_machines", "2", "--mixed_precision", "fp16", "--machine_rank",
                       "1", "--main_process_ip", "10.0.0.1", "--main_process_port", "29500"]


def test_split_command_and_the_printed_line():
    assert split_command(["--num_processes", "2", "recipes/glue.py", "--x", "a.py"]) == (
        ["--num_processes", "2"], "recipes/glue.py", ["--x", "a.py"])
    assert split_command(["--num_processes", "2", "-m", "pkg.train", "--x"]) == (
        ["--num_processes", "2", "-m"], "pkg.train", ["--x"])
    with pytest.raises(ValueError, match="no recipe given"):
        split_command(["--num_processes", "2"])
    cmd, _ = recipe_command(["--num_processes", "1"], "recipes/glue.py", ["--task_name", "rte"], threads=2)
    assert command_line(cmd) == ("accelerate launch --num_cpu_threads_per_process 2 --num_processes 1 recipes/glue.py "
                                 "--task_name rte")


def test_a_failed_recipe_raises_with_the_tail_of_its_output(tmp_path):
    """A real accelerate launch of a script that fails; its output goes to a log (conftest.launch, which the
    recipe tests use, captures it instead)."""
    script, log = tmp_path / "fails.py", tmp_path / "log.txt"
    script.write_text("import os, sys\nprint('threads', os.environ['OMP_NUM_THREADS'])\n"
                      "sys.exit('error: the reason')\n")
    # the command, the exit code, the log's place and its last lines, which show the thread count arrived
    expected = (rf"(?s)fails\.py failed \(exit 1\); its output is in {re.escape(str(log))}:"
                r".*threads 3\n.*error: the reason")
    with pytest.raises(RecipeFailed, match=expected):
        run_recipe(launcher_args(), script, threads=3, log=log, timeout=120)  # accelerate alone would give 1


def test_results_of_runs_a_recipe_once_and_then_reads_its_results(tmp_path):
    """A real accelerate launch of a script that writes results.json and counts its runs; the second call
    finds the run finished and reads it (how the benchmarks resume after an interruption)."""
    script, out = tmp_path / "writes.py", tmp_path / "run"
    script.write_text("import json, pathlib, sys\nout = pathlib.Path(sys.argv[sys.argv.index('--output_dir') + 1])\n"
                      "out.mkdir(parents=True, exist_ok=True)\ncount = out / 'runs'\n"
                      "count.write_text(str(int(count.read_text()) + 1) if count.exists() else '1')\n"
                      "(out / 'results.json').write_text(json.dumps({'f1': 0.5}))\n")
    args = ["--output_dir", str(out)]
    for _ in range(2):
        assert results_of(launcher_args(), script, args, out, threads=1, log=tmp_path / "logs" / "run.log") == {
            "f1": 0.5}
    assert (out / "runs").read_text() == "1"


def test_run_py_without_a_recipe_says_so():
    proc = subprocess.run([sys.executable, str(REPO / "launch" / "run.py"), "--num_processes", "2"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "no recipe given" in proc.stderr


@pytest.mark.slow
def test_ddp_config_runs_two_processes_on_cpu(glue_dir, tiny_bert, tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, str(REPO / "launch" / "run.py"), *DDP, "--main_process_port", str(_free_port()),
           str(REPO / "recipes" / "glue.py"), *common(glue_dir, tiny_bert, out, "--max_train_steps", "2")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert json.loads((out / "results.json").read_text())["num_processes"] == 2
