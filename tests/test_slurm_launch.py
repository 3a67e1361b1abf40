"""launch/slurm.py: the launch arithmetic from SLURM environment values (no SLURM needed)."""
import importlib.util
import os
import shutil
import subprocess
import sys

import pytest

from conftest import REPO

spec = importlib.util.spec_from_file_location("launch_slurm", REPO / "launch" / "slurm.py")
slurm = importlib.util.module_from_spec(spec)
sys.modules["launch_slurm"] = slurm  # dataclasses look their module up
spec.loader.exec_module(slurm)

NODELISTS = {
    "node[01-04,07]": ["node01", "node02", "node03", "node04", "node07"],
    "a,b": ["a", "b"],
    "gpu-[1-2]": ["gpu-1", "gpu-2"],
    "vm": ["vm"],
    "node[8-11]": ["node8", "node9", "node10", "node11"],
    "node[098-101]": ["node098", "node099", "node100", "node101"],
    "a[1-2],b[3,5],c": ["a1", "a2", "b3", "b5", "c"],
    "r[1-2]-n[1-2]": ["r1-n1", "r1-n2", "r2-n1", "r2-n2"],
}


def env(**kw):
    base = dict(SLURM_JOB_NODELIST="node[01-04]", SLURM_NNODES="4", SLURM_NTASKS="4", SLURM_NODEID="2",
                SLURM_PROCID="2", SLURM_GPUS_ON_NODE="8", SLURM_JOB_ID="123456")
    base.update(kw)
    return {k: v for k, v in base.items() if v is not None}


@pytest.mark.parametrize("nodelist", NODELISTS)
def test_nodelist_expansion(nodelist):
    assert slurm.expand_nodelist(nodelist) == NODELISTS[nodelist]


@pytest.mark.skipif(not shutil.which("scontrol"), reason="scontrol not installed (apt-get install slurm-wlm)")
@pytest.mark.parametrize("nodelist", NODELISTS)
def test_nodelist_expansion_agrees_with_scontrol(nodelist, tmp_path):
    conf = tmp_path / "slurm.conf"  # scontrol wants a configuration, even to expand a host list
    conf.write_text("ClusterName=x\nSlurmctldHost=localhost\nNodeName=localhost\nPartitionName=p Nodes=ALL\n")
    out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                         env=dict(os.environ, SLURM_CONF=str(conf)))
    if out.returncode != 0:
        pytest.skip(f"scontrol show hostnames failed here: {out.stderr.strip()}")
    assert slurm.expand_nodelist(nodelist) == out.stdout.split()


@pytest.mark.parametrize("bad", ["node[01-04", "node]1[", "node[a-b]", "node[5-2]", ""])
def test_malformed_nodelist_is_an_error(bad):
    with pytest.raises(ValueError):
        slurm.expand_nodelist(bad)
    with pytest.raises(slurm.SlurmEnvError, match="SLURM_JOB_NODELIST"):
        slurm.plan_from_env(env(SLURM_JOB_NODELIST=bad or " "), use_scontrol=False)


def test_one_task_per_node():
    plan = slurm.plan_from_env(env(SLURM_JOB_NODELIST="node[01-04,07]", SLURM_NNODES="5", SLURM_NTASKS="5"),
                               use_scontrol=False)
    assert plan == slurm.LaunchPlan(num_machines=5, num_processes=40, machine_rank=2, main_process_ip="node01",
                                    main_process_port=10000 + 123456 % 20000)


def test_machine_rank_is_the_node_id_with_one_task_per_node():
    ranks = [slurm.plan_from_env(env(SLURM_NODEID=str(n), SLURM_PROCID=str(n)), use_scontrol=False).machine_rank
             for n in range(4)]
    assert ranks == [0, 1, 2, 3]


def test_several_tasks_per_node_make_each_task_a_machine():
    """2 nodes x 2 tasks, 4 GPUs per node: 4 machines of 2 processes; the rank is the task's SLURM_PROCID."""
    plans = [slurm.plan_from_env(env(SLURM_JOB_NODELIST="gpu-[1-2]", SLURM_NNODES="2", SLURM_NTASKS="4",
                                     SLURM_NODEID=str(p // 2), SLURM_PROCID=str(p), SLURM_GPUS_ON_NODE="4"),
                                 use_scontrol=False) for p in range(4)]
    assert [p.machine_rank for p in plans] == [0, 1, 2, 3]
    assert {(p.num_machines, p.num_processes, p.main_process_ip) for p in plans} == {(4, 8, "gpu-1")}
    # the test cluster's case: 2 tasks on one CPU node, --gpus_per_node 2 -> 2 machines of 1 process
    plan = slurm.plan_from_env(env(SLURM_JOB_NODELIST="vm", SLURM_NNODES="1", SLURM_NTASKS="2", SLURM_NODEID="0",
                                   SLURM_PROCID="1", SLURM_GPUS_ON_NODE=None), gpus_per_node=2, use_scontrol=False)
    assert (plan.num_machines, plan.num_processes, plan.machine_rank) == (2, 2, 1)


def test_uneven_tasks_or_gpus_are_refused():
    with pytest.raises(slurm.SlurmEnvError, match="same number of tasks on every node"):
        slurm.plan_from_env(env(SLURM_NNODES="2", SLURM_NTASKS="3"), use_scontrol=False)
    with pytest.raises(slurm.SlurmEnvError, match="do not split evenly over 2 tasks"):
        slurm.plan_from_env(env(SLURM_NNODES="2", SLURM_NTASKS="4", SLURM_GPUS_ON_NODE="3"), use_scontrol=False)


@pytest.mark.parametrize("value,gpus", [("4", 4), ("a100:4", 4), ("gpu:a100:2", 2), ("a100:2,v100:1", 3)])
def test_gpus_per_node_forms(value, gpus):
    e = env(SLURM_GPUS_ON_NODE=None, SLURM_GPUS_PER_NODE=value, SLURM_NNODES="1", SLURM_NTASKS="1", SLURM_NODEID="0")
    assert slurm.plan_from_env(e, use_scontrol=False).num_processes == gpus


def test_argument_overrides_gpus_and_port():
    plan = slurm.plan_from_env(env(), gpus_per_node=2, main_process_port=29500, use_scontrol=False)
    assert (plan.num_processes, plan.main_process_port) == (8, 29500)


def test_port_from_job_id_is_in_a_safe_range():
    ports = {slurm.plan_from_env(env(SLURM_JOB_ID=str(j)), use_scontrol=False).main_process_port
             for j in (0, 1, 19999, 20000, 123456789)}
    assert all(10000 <= p < 30000 for p in ports) and len(ports) == 4  # 0 and 20000 share a port


@pytest.mark.parametrize("missing", ["SLURM_JOB_NODELIST", "SLURM_NNODES", "SLURM_NODEID", "SLURM_JOB_ID",
                                     "SLURM_GPUS_ON_NODE"])
def test_missing_variable_is_named(missing):
    e = env(SLURM_NTASKS=None, SLURM_PROCID=None, **{missing: None})
    with pytest.raises(slurm.SlurmEnvError, match=missing):
        slurm.plan_from_env(e, use_scontrol=False)


def test_procid_is_needed_with_several_tasks_per_node():
    with pytest.raises(slurm.SlurmEnvError, match="SLURM_PROCID"):
        slurm.plan_from_env(env(SLURM_NNODES="1", SLURM_NTASKS="2", SLURM_PROCID=None), use_scontrol=False)


def test_command_passes_recipe_and_options_through():
    e = env(SLURM_JOB_NODELIST="node[01-02]", SLURM_NNODES="2", SLURM_NTASKS="2", SLURM_NODEID="1")
    cmd, only_print = slurm.build_command(
        ["--print", "--deepspeed_config_file", "ds_configs/zero3.json", "--mixed_precision", "bf16",
         "recipes/glue.py", "--task_name", "mrpc", "--output_dir", "runs/x"], e, use_scontrol=False)
    assert only_print
    assert cmd[:2] == [sys.executable, str(REPO / "launch" / "run.py")]
    assert cmd[2:4] == ["--config_file", str(REPO / "launch" / "deepspeed_multi_node.yaml")]  # several machines
    i = cmd.index("recipes/glue.py")
    launch_part = cmd[4:i]
    assert launch_part == ["--num_machines", "2", "--num_processes", "16", "--machine_rank", "1",
                           "--main_process_ip", "node01", "--main_process_port", str(10000 + 123456 % 20000),
                           "--deepspeed_config_file", "ds_configs/zero3.json", "--mixed_precision", "bf16"]
    # the recipe's arguments unchanged, plus automatic resume (a requeued job continues)
    assert cmd[i + 1:] == ["--task_name", "mrpc", "--output_dir", "runs/x", "--resume_from_checkpoint", "latest"]


def test_one_machine_uses_the_ddp_config_and_an_explicit_resume_is_kept():
    e = env(SLURM_JOB_NODELIST="vm", SLURM_NNODES="1", SLURM_NTASKS="1", SLURM_NODEID="0", SLURM_GPUS_ON_NODE=None)
    cmd, _ = slurm.build_command(["--gpus_per_node", "2", "recipes/glue.py", "--resume_from_checkpoint=ck/step_1"],
                                 e, use_scontrol=False)
    assert cmd[3] == str(REPO / "launch" / "ddp_single_node.yaml")
    assert cmd[cmd.index("--num_processes") + 1] == "2"
    assert cmd[-1] == "--resume_from_checkpoint=ck/step_1"
    cmd, _ = slurm.build_command(["--no_auto_resume", "--gpus_per_node", "2", "x.py"], e, use_scontrol=False)
    assert cmd[-1] == "x.py"


def test_cli_reports_a_missing_variable_and_prints_the_command():
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    proc = subprocess.run([sys.executable, str(REPO / "launch" / "slurm.py"), "recipes/glue.py"], env=clean,
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "SLURM_JOB_NODELIST" in proc.stderr and "is not set" in proc.stderr
    proc = subprocess.run([sys.executable, str(REPO / "launch" / "slurm.py"), "--print", "--gpus_per_node", "1",
                           "recipes/glue.py", "--task_name", "rte"],
                          env=dict(clean, **env(SLURM_JOB_NODELIST="a,b", SLURM_NNODES="2", SLURM_NTASKS="2",
                                                SLURM_NODEID="0")), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "--num_machines 2 --num_processes 2 --machine_rank 0 --main_process_ip a" in proc.stdout
    assert proc.stdout.strip().endswith("recipes/glue.py --task_name rte --resume_from_checkpoint latest")


def test_no_recipe_is_an_error():
    with pytest.raises(SystemExit, match="no recipe"):
        slurm.build_command(["--gpus_per_node", "2"], env(), use_scontrol=False)


def test_preemption_signal_sets_a_flag_and_sigterm_only_inside_slurm(monkeypatch):
    import signal

    from adaptopt.preemption import PreemptionSignal

    saved = {s: signal.getsignal(s) for s in (signal.SIGUSR1, signal.SIGTERM)}
    try:
        monkeypatch.delenv("SLURM_JOB_ID", raising=False)
        stop = PreemptionSignal.install()
        assert signal.getsignal(signal.SIGTERM) == saved[signal.SIGTERM]  # outside SLURM: default kept
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.requested and stop.received == signal.SIGUSR1

        class OneProcess:
            num_processes = 1

        assert stop.requested_everywhere(OneProcess())
        monkeypatch.setenv("SLURM_JOB_ID", "7")
        stop = PreemptionSignal.install()
        os.kill(os.getpid(), signal.SIGTERM)  # inside a SLURM job: SIGTERM also means "save and stop"
        assert stop.received == signal.SIGTERM
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)
