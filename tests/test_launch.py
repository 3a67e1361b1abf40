"""adaptopt/launch.py and launch/run.py: the same launch command on a GPU machine and on a CPU-only one."""
import json
import os
import re
import subprocess
import sys

import pytest

from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

from adaptopt.launch import (RecipeFailed, command_line, exit_with, failure_report, launcher_args, recipe_command,
                             results_of, run_recipe, split_command, threads_per_process)
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
    """accelerate's own options and environment; only the process in between (adaptopt.launch, which keeps the
    recipe's exit code) and the path it imports adaptopt from are added."""
    cmd, env = recipe_command(DDP, "x.py", ["--a"], environ={"A": "1", "PYTHONPATH": "elsewhere"}, cuda=True)
    assert env == {"A": "1", "PYTHONPATH": os.pathsep.join([str(REPO), "elsewhere"])}
    assert cmd == [sys.executable, "-m", "adaptopt.launch", *DDP, "x.py", "--a"]


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


def _failure(tmp_path, rank, exitcode, message=None, monkeypatch=None):
    """torchrun's record of one failed rank; with ``message``, the error file that rank's exit_with wrote."""
    error_file = tmp_path / f"error_{len(list(tmp_path.iterdir()))}.json"  # a fresh one for each failure
    if message is None:
        error_file.mkdir()  # keeps the name taken; torchrun sees no error file
    else:
        monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_file))
        with pytest.raises(SystemExit) as stop:
            exit_with(message, exitcode)
        assert stop.value.code == exitcode
    return ProcessFailure(local_rank=rank, pid=1000 + rank, exitcode=exitcode, error_file=str(error_file))


def test_failure_report_gives_the_recipes_code_and_each_message_once(tmp_path, monkeypatch, capsys):
    same = {r: _failure(tmp_path, r, 2, "error: no such file x.tsv", monkeypatch) for r in (0, 1)}
    assert failure_report(same) == (2, ["error: no such file x.tsv"])
    assert capsys.readouterr().err == ""  # under torchrun the line goes to the error file, not to every rank's stderr
    # rank 1 preempted itself, torchrun then stopped rank 0 with SIGTERM: the code is the one the recipe chose
    stopped = {0: _failure(tmp_path, 0, -15), 1: _failure(tmp_path, 1, 75, "preempted: after update 3", monkeypatch)}
    assert failure_report(stopped) == (75, ["preempted: after update 3"])
    # a crash leaves no error file: its traceback is in the output; a kill is named
    assert failure_report({0: _failure(tmp_path, 0, 1)}) == (
        1, ["rank 0 exited with code 1 (its traceback is in the output above)"])
    assert failure_report({0: _failure(tmp_path, 0, -9)}) == (137, ["rank 0 was killed by SIGKILL"])


def test_outside_torchrun_the_error_goes_to_stderr(monkeypatch, capsys):
    monkeypatch.delenv("TORCHELASTIC_ERROR_FILE", raising=False)
    with pytest.raises(SystemExit) as stop:
        exit_with("error: the reason", 3)
    assert stop.value.code == 3 and capsys.readouterr().err == "error: the reason\n"


@pytest.mark.slow
@pytest.mark.parametrize("processes", [1, 2])
def test_run_py_exits_with_the_recipes_code_and_one_error_line(glue_dir, tiny_bert, tmp_path, processes):
    """The real recipe through launch/run.py (accelerate launch, torchrun for 2 processes): a bad input ends in
    exit 2 and its line shown once, with no launcher traceback (accelerate launch alone: exit 1, a
    CalledProcessError or ChildFailedError traceback, the line once per process)."""
    launcher = (DDP if processes == 2 else ["--num_processes", "1"]) + [
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
        str(_free_port())]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for bad, line in [(["--data_dir", str(tmp_path / "nowhere")], "MRPC"),  # a missing file: FileNotFoundError
                      (["--max_grad_norm", "-1"], "glue.py: error: --max_grad_norm must be >= 0")]:  # argparse
        cmd = [sys.executable, str(REPO / "launch" / "run.py"), *launcher, str(REPO / "recipes" / "glue.py"),
               *common(glue_dir, tiny_bert, tmp_path / "out"), *bad]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
        errors = [x for x in proc.stderr.splitlines() if "error:" in x]
        assert proc.returncode == 2, proc.stderr[-4000:]
        assert len(errors) == 1 and line in errors[0], proc.stderr[-4000:]
        assert "Traceback" not in proc.stderr and "ChildFailedError" not in proc.stderr, proc.stderr[-4000:]


PROCESS_GROUP_WORKER = """
import sys
import torch
import torch.distributed as dist
from adaptopt.launch import exit_with
from adaptopt.training import run_main

def train(code, preemption):
    dist.init_process_group("gloo")
    t = torch.ones(1000)
    for _ in range(5):
        dist.all_reduce(t)
    if code:
        exit_with("error: stopped on purpose", code)
    return {}

run_main(lambda: (int(sys.argv[1]),), train)
"""


@pytest.mark.slow
@pytest.mark.parametrize("code", [0, 3])
def test_a_recipe_process_ends_its_gloo_group_so_it_exits_with_its_own_code(tmp_path, code):
    # Without destroy_process_group a gloo process aborts in interpreter finalization about every other time
    # (SIGABRT, "terminate called without an active exception"; 8 of 15 two-process runs on the project's
    # machine): run_main ends the group at exit. Five clean exits in a row would happen by chance about 2% of
    # the time without it.
    script = tmp_path / "worker.py"
    script.write_text(PROCESS_GROUP_WORKER)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    for _ in range(5):
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                               "--master_port", str(_free_port()), str(script), str(code)],
                              capture_output=True, text=True, timeout=300, env=env)
        output = proc.stdout + proc.stderr
        assert "terminate called" not in output, output[-3000:]
        if code:
            assert proc.returncode != 0 and f"exitcode  : {code}" in output, output[-3000:]
        else:
            assert proc.returncode == 0, output[-3000:]
