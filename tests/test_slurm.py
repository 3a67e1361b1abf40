"""The slurm/ sbatch scripts on a real SLURM (slurm-wlm + munge on localhost, tests/slurm_cluster.py):

- slurm/single_node.sbatch runs recipes/glue.py with 2 processes to completion;
- a running job gets SLURM's warning signal (USR1 to the batch script, as --signal=B:USR1@N sends it): the
  recipe checkpoints and stops, the script requeues the job, the requeued job resumes from the checkpoint
  and ends with exactly the metrics of the uninterrupted run;
- slurm/multi_node.sbatch, the same preemption, runs as 2 srun tasks on the one node, each one "machine"
  (machine rank 0 and 1, DeepSpeed ZeRO-2 with the standard multinode launcher), and ends with the metrics
  of the one-machine run. (Its uninterrupted run is not run on its own: the preempted job runs the same
  launch to the end, and ZeRO-2's exact resume is tests/test_deepspeed.py's.)

- slurm/study.sbatch as a job array of 2 runners sharing one study folder: every run done exactly once.

Tiny model (tests/conftest.py), a real MRPC slice, 60 updates of a few ms each.
"""
import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import REPO
from slurm_cluster import Cluster, SlurmUnavailable

pytestmark = pytest.mark.slow  # SLURM daemons and sbatch jobs that launch the recipe: minutes

STEPS = 60


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    try:
        c = Cluster(tmp_path_factory.mktemp("slurm")).start()
    except SlurmUnavailable as err:
        pytest.skip(f"no SLURM on this machine: {err}")
    yield c
    c.stop()


def recipe_args(glue_dir, tiny_bert, out):
    return ["recipes/glue.py", "--task_name", "mrpc", "--data_dir", str(glue_dir), "--model_name_or_path",
            str(tiny_bert), "--output_dir", str(out), "--max_train_samples", "128", "--max_eval_samples", "101",
            "--per_device_train_batch_size", "16", "--learning_rate", "1e-3", "--logging_steps", "1",
            "--max_train_steps", str(STEPS), "--checkpointing_steps", "20", "--eval_steps", "1000"]


def submit(cluster, script, workdir: Path, slurm_opts, args) -> int:
    """sbatch as a user would, from ``workdir``, overriding only the lines marked # EDIT: in the script
    (this cluster has partition debug, no GPUs, few CPUs); the script cds to the repository."""
    workdir.mkdir(parents=True, exist_ok=True)
    cpus = min(2, os.cpu_count() or 1)
    opts = ["--partition=debug", "--gpus-per-node=0", f"--cpus-per-task={cpus}", *slurm_opts]
    return cluster.sbatch([*opts, str(REPO / "slurm" / script), "--gpus_per_node", "2", *args], cwd=workdir,
                          env={"ADAPTOPT_DIR": str(REPO), "OMP_NUM_THREADS": "1"})


def finished(cluster, job_id, workdir: Path, name: str, timeout=240) -> str:
    job = cluster.wait(job_id, timeout)
    # %x-%j.out in the submit folder; two tasks interleaving their bytes may split a UTF-8 character
    log = (workdir / f"{name}-{job_id}.out").read_text(errors="replace")
    assert job["JobState"] == "COMPLETED" and job["ExitCode"] == "0:0", f"{job}\n{log[-6000:]}"
    return log


def results(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


@pytest.fixture(scope="module")
def single_node_run(cluster, glue_dir, tiny_bert, tmp_path_factory):
    work = tmp_path_factory.mktemp("single")
    job = submit(cluster, "single_node.sbatch", work, [], recipe_args(glue_dir, tiny_bert, work / "out"))
    log = finished(cluster, job, work, "adaptopt")
    return results(work / "out"), log


def test_single_node_script_runs_two_processes(single_node_run):
    r, log = single_node_run
    assert r["completed_steps"] == STEPS and r["num_processes"] == 2 and r["resumed_from"] is None
    assert 0.0 <= r["accuracy"] <= 1.0 and r["eval_samples"] == {"validation": 101}
    assert "--num_machines 1 --num_processes 2 --machine_rank 0" in log
    assert "--resume_from_checkpoint latest" in log  # added by launch/slurm.py: a requeue resumes
    assert "step finished with exit code 0" in log


MULTI = ["--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1"]  # 2 tasks = 2 machines on this one node


@pytest.mark.parametrize("script", ["single_node", "multi_node"])
def test_preempted_job_checkpoints_requeues_and_resumes_exactly(script, cluster, glue_dir, tiny_bert, tmp_path,
                                                                 single_node_run):
    """USR1 mid-training -> checkpoint at the next update on every rank -> requeue -> resume -> the
    uninterrupted run's final loss and metrics."""
    out = tmp_path / "out"
    multi = script == "multi_node"
    job = submit(cluster, f"{script}.sbatch", tmp_path, MULTI if multi else [], recipe_args(glue_dir, tiny_bert, out))
    first = out / "checkpoints" / "step_00000020"
    cluster.wait(job, 180, until=lambda j: first.is_dir() or j.get("JobState") not in ("PENDING", "RUNNING"))
    assert first.is_dir(), cluster.job(job)
    # what #SBATCH --signal=B:USR1@180 does before the time limit: USR1 to the batch script only
    subprocess.run(["scancel", "--batch", "--signal=USR1", str(job)], env=cluster.env, check=True)
    cluster.wait(job, 120, until=lambda j: j.get("Restarts") == "1")  # requeued by the script
    log = finished(cluster, job, tmp_path, "adaptopt-multi" if multi else "adaptopt")

    assert "USR1: asking the training processes to checkpoint and stop" in log
    assert "[rank 0] got SIGUSR1" in log and "[rank 1] got SIGUSR1" in log
    assert "requeueing job" in log and "restart 1" in log
    if not multi:  # the recipe's exit code reaches the batch script through srun and the launcher
        assert "step stopped after the signal (exit 75)" in log
    r, ref = results(out), single_node_run[0]
    stopped = int(r["resumed_from"].rsplit("_", 1)[1])
    assert 20 < stopped < STEPS  # the preemption checkpoint (not the scheduled one at 20)
    # both ranks stop at the same update; each node's launcher shows the line once
    assert log.count("stopped for preemption after update") == (2 if multi else 1)
    assert f"stopped for preemption after update {stopped};" in log
    assert not list((out / "checkpoints").glob("*.tmp"))
    assert r["completed_steps"] == STEPS and r["num_processes"] == 2
    if multi:  # 2 srun tasks, each a machine of 1 process (DeepSpeed ZeRO-2, standard launcher)
        for rank in (0, 1):
            assert f"{rank}: " in log and f"--num_machines 2 --num_processes 2 --machine_rank {rank} " in log
        assert "deepspeed_multi_node.yaml" in log and "DeepSpeed ZeRO-2" in log
    for key in ("accuracy", "f1", "train_loss"):  # nothing lost: the uninterrupted run's result
        if multi:  # ZeRO-2 over 2 machines trains what DDP on one machine trains (fp32; all-reduce order aside)
            assert r[key] == pytest.approx(ref[key], rel=1e-5, abs=1e-6), key
        else:  # DDP: to the last bit
            assert r[key] == ref[key], key


def test_study_job_array_runners_share_the_study_folder(cluster, glue_dir, tiny_bert, tmp_path):
    """2 array tasks, one core each, split one tiny study in one folder: each run is run once, by the task whose
    shard holds it."""
    config = {"seeds": [1, 2],
              "args": {"data_dir": str(glue_dir), "model_name_or_path": str(tiny_bert), "max_train_samples": 32,
                       "max_eval_samples": 32, "per_device_train_batch_size": 16, "max_train_steps": 2},
              "tasks": ["mrpc"], "optimizers": ["adamw", "adaptopt"]}
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(config))
    out = tmp_path / "out"
    job = cluster.sbatch(["--partition=debug", "--array=0-1", "--cpus-per-task=1", "--mem=0",  # EDIT: lines
                          str(REPO / "slurm" / "study.sbatch"),
                          "--config", str(tmp_path / "study.yaml"), "--output_dir", str(out)],
                         cwd=tmp_path, env={"ADAPTOPT_DIR": str(REPO)})
    logs = []
    for task in (0, 1):
        state = cluster.wait(f"{job}_{task}", 300)
        logs.append((tmp_path / f"adaptopt-study-{job}_{task}.out").read_text(errors="replace"))
        assert state["JobState"] == "COMPLETED" and state["ExitCode"] == "0:0", f"{state}\n{logs[-1][-4000:]}"
    runs = sorted(p.name for p in (out / "runs").iterdir())
    assert len(runs) == 4
    for name in runs:
        info = json.loads((out / "runs" / name / "run.json").read_text())
        assert info["status"] == "finished" and info["attempts"] == 1, name
        assert (out / "runs" / name / "results.json").is_file()
        ran = [task for task, log in enumerate(logs) if f"{name} finished in" in log]
        assert len(ran) == 1, name  # by exactly one runner: the one whose shard holds it
    for task, log in enumerate(logs):
        assert f"runner {task} of job {job}" in log
        assert "1 at a time, OMP_NUM_THREADS=1" in log  # the task's one CPU (SLURM_CPUS_PER_TASK)
