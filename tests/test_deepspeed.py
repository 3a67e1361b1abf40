"""DeepSpeed ZeRO with 2 real processes on CPU (gloo).

- Every registry optimizer is DeepSpeed's client optimizer under each ds_configs/ file (ZeRO 0-3, with
  offload) in fp32, bf16 and fp16. Each run is held to the single-process PyTorch run of the same global
  batch (tests/ds_worker.py; one torchrun launch for the whole matrix).
- recipes/glue.py through ``accelerate launch`` with the ds_configs: ZeRO-2 and ZeRO-3 resume exactly;
  two "machines" on one host give what one machine with 2 processes gives.
"""
import json
import os
import subprocess
import sys

import pytest

from adaptopt.launch import launcher_args, recipe_command
from conftest import REPO, _free_port, launch
from test_glue_recipe import common, results

# 2-process launches and a torchrun matrix: minutes. The refusals and the clipping set-up, which need no
# process group, are tests/test_deepspeed_run.py.
pytestmark = pytest.mark.slow

OPTIMIZERS = ["sgd", "momentum", "adagrad", "rmsprop", "adam", "adamw", "adaptopt"]
CONFIGS = ["zero0.json", "zero1.json", "zero2.json", "zero2_offload.json", "zero3.json", "zero3_offload.json"]
PRECISIONS = ["fp32", "bf16", "fp16"]
# DeepSpeed replaces a client Adagrad under ZeRO >= 1 (adaptopt.deepspeed_run.DeepSpeedRun.guard refuses it)
CASES = [[o, c, p, ""] for o in OPTIMIZERS for c in CONFIGS for p in PRECISIONS
         if not (o == "adagrad" and c != "zero0.json")]
CASES += [["adaptopt", c, "fp32", "adaptive_clip"] for c in ("zero0.json", "zero2.json", "zero3.json")]
# AdaptOpt's other LR rule (the default, Mechanic, is in the matrix above)
CASES += [["adaptopt", c, "fp32", "hypergradient"] for c in ("zero0.json", "zero2.json", "zero3.json")]
# The learning-rate-free peers where DeepSpeed runs them right (ZeRO-0 fp32: the engine calls them directly with
# full, averaged gradients); everywhere else they are refused (test_peers_are_refused_where_deepspeed_wraps_them).
PEERS = ["prodigy", "dadapt_adam", "schedulefree_adamw"]
CASES += [[o, "zero0.json", "fp32", ""] for o in PEERS]
CASES += [[o, c, "fp16", "overflow"] for o, c in
          (("adaptopt", "zero0.json"), ("adaptopt", "zero2.json"), ("adaptopt", "zero3.json"), ("adamw", "zero2.json"))]
# AdaptOpt's compiled update (the recipes' default where torch.compile works) on DeepSpeed's flat
# partitions, held to the same eager single-process reference; under ZeRO-0 fp32 it also folds the clip.
CASES += [["adaptopt", c, "fp32", "compiled"] for c in CONFIGS]
CASES += [["adaptopt", "zero0.json", "fp32", "compiled+adaptive_clip"], ["adaptopt", "zero2.json", "bf16", "compiled"],
          ["adaptopt", "zero2.json", "fp16", "compiled+overflow"]]
# AdaptOpt's native CPU update (the recipes' default where the step runs on the CPU, ZeRO-Offload's host step
# included) on the same flat partitions
CASES += [["adaptopt", c, "fp32", "native"] for c in CONFIGS]
CASES += [["adaptopt", "zero2_offload.json", "bf16", "native"], ["adaptopt", "zero2.json", "fp16", "native+overflow"]]
# torch's own fused kernels, which the recipes pick for the baselines (--optimizer_impl auto), on the same partitions
CASES += [["adamw", c, "fp32", "fused"] for c in ("zero0.json", "zero2.json", "zero3.json")]
CASES += [["adamw", "zero2.json", "fp16", "fused+overflow"], ["momentum", "zero2.json", "fp32", "fused"]]

# Stated tolerances. fp32: the same arithmetic up to the order of the gradient all-reduce. bf16/fp16: the
# forward and backward run in 8/11-bit precision on half batches, so single gradient elements differ.
# Adam-type updates then differ by up to lr where an element's gradient is near zero. The loss and the
# global norm still agree closely.
TOL = {
    "fp32": dict(param=1e-5, loss=1e-6, norm=1e-6),
    "bf16": dict(param=None, loss=5e-3, norm=2e-2),
    "fp16": dict(param=None, loss=5e-3, norm=2e-2),
}


def _deepspeed_takes_fp16() -> bool:
    """On a CPU, DeepSpeed's engine refuses fp16 ("Type fp16 is not supported on your device") unless
    oneDNN has fp16 kernels (AVX-512-FP16 / AMX). The Intel machines of earlier sessions ran these cases;
    the AMD AVX2 machines cannot. Asked through DeepSpeed's own accelerator, so the rule stays theirs."""
    from deepspeed.accelerator import get_accelerator

    return bool(get_accelerator().is_fp16_supported())


NO_FP16 = None if _deepspeed_takes_fp16() else "DeepSpeed refuses fp16 on this CPU (no oneDNN fp16 kernels)"
RUNNABLE = [c for c in CASES if not (NO_FP16 and c[2] == "fp16")]


@pytest.fixture(scope="module")
def matrix(tmp_path_factory):
    out = tmp_path_factory.mktemp("ds") / "cases.jsonl"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(_free_port()), str(REPO / "tests" / "ds_worker.py"), "--out", str(out), "--cases", json.dumps(RUNNABLE)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-6000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    return {(r["optimizer"], r["config"], r["precision"], r["extra"]): r for r in rows}


@pytest.mark.parametrize("case", CASES, ids=["-".join(filter(None, c)).replace(".json", "") for c in CASES])
def test_deepspeed_matches_single_process(matrix, case):
    if case not in RUNNABLE:
        pytest.skip(NO_FP16)
    r = matrix[tuple(case)]
    tol = TOL[r["precision"]]
    if tol["param"] is not None:
        assert r["param_rel_diff"] < tol["param"], r
    assert abs(r["final_loss"] - r["ref_final_loss"]) <= tol["loss"] * r["ref_final_loss"], r
    # the logged norm is the true pre-clip global norm over both ranks' shards, every step
    assert r["norm_rel_diff"] < tol["norm"], r
    # applied updates, schedule position and optimizer step counts agree with the single-process run
    assert r["applied"] == r["ref_applied"], r
    if r["state_steps"]:  # (Adagrad also keeps the step-0 state it made for the fp16 params at construction)
        assert max(r["state_steps"]) == float(r["ref_applied"]), r
    if "overflow" in r["extra"].split("+"):
        # the overflowed step advanced neither the schedule nor the optimizer's step count
        assert r["skipped"] == 1 and r["skipped_norm_inf"] and r["applied"] == 4, r
    else:
        assert r["skipped"] == 0, r


def _glue_args(glue_dir, tiny_bert, out, *extra):
    return common(glue_dir, tiny_bert, out, "--per_device_train_batch_size", "8", *extra)


RUN_ARGS = ["--max_train_steps", "6", "--checkpointing_steps", "3", "--adaptive_clip"]


def _full_run(ds_config, glue_dir, tiny_bert, out):
    """6 updates of one machine with 2 processes, checkpointing at update 3."""
    launch("recipes/glue.py", _glue_args(glue_dir, tiny_bert, out, *RUN_ARGS), processes=2, ds_config=ds_config)
    return out


@pytest.fixture(scope="module")
def zero2_full_run(glue_dir, tiny_bert, tmp_path_factory):
    """Shared by the ZeRO-2 resume test and the two-machine test: each 2-process launch costs about 30 s."""
    return _full_run("zero2.json", glue_dir, tiny_bert, tmp_path_factory.mktemp("zero2") / "full")


@pytest.mark.parametrize("ds_config", ["zero2.json", "zero3.json"])
def test_recipe_resumes_exactly_under_zero(ds_config, glue_dir, tiny_bert, tmp_path, request):
    """6 updates with a checkpoint at 3; a new launch resumes from it and ends with the same loss and
    metrics (model, AdaptOpt's sharded state, the adaptive clipping statistics, LR schedule, data position)."""
    full = (request.getfixturevalue("zero2_full_run") if ds_config == "zero2.json"
            else _full_run(ds_config, glue_dir, tiny_bert, tmp_path / "full"))
    resumed = tmp_path / "resumed"
    launch("recipes/glue.py", _glue_args(glue_dir, tiny_bert, resumed, *RUN_ARGS, "--resume_from_checkpoint",
                                         str(full / "checkpoints" / "step_00000003")), processes=2, ds_config=ds_config)
    a, b = results(full), results(resumed)
    assert a["num_processes"] == 2 and a["completed_steps"] == b["completed_steps"] == 6
    for key in ("accuracy", "f1", "train_loss"):
        assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-7), key


def test_two_machines_on_one_host_match_one_machine(glue_dir, tiny_bert, tmp_path, zero2_full_run):
    """Two accelerate launches with machine_rank 0 and 1 (DeepSpeed's standard multinode launcher) run
    ZeRO-2 to completion and give the metrics of one machine with 2 processes."""
    two = tmp_path / "two"
    port = _free_port()
    procs = []
    for rank in (0, 1):
        launcher = launcher_args(processes=2, machines=2, machine_rank=rank, main_process_ip="127.0.0.1",
                                 main_process_port=port, deepspeed_config=REPO / "ds_configs" / "zero2.json")
        cmd, env = recipe_command(launcher, REPO / "recipes" / "glue.py",
                                  _glue_args(glue_dir, tiny_bert, two, *RUN_ARGS), threads=1)
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env))
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-6000:]
    a, b = results(zero2_full_run), results(two)
    assert b["num_processes"] == 2 and b["completed_steps"] == 6
    for key in ("accuracy", "f1", "train_loss"):
        assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-7), key


def test_recipe_rejects_a_bad_deepspeed_config_before_training(glue_dir, tiny_bert, tmp_path):
    bad = tmp_path / "bad.json"
    config = json.loads((REPO / "ds_configs" / "zero2.json").read_text())
    config["gradient_clipping"] = 0.5  # the recipe says --max_grad_norm 1.0
    bad.write_text(json.dumps(config))
    proc = launch("recipes/glue.py", _glue_args(glue_dir, tiny_bert, tmp_path / "x", "--max_train_steps", "2"),
                  processes=2, ds_config=str(bad), check=False)
    assert proc.returncode == 2, proc.stderr[-4000:]
    assert proc.stderr.count("gradient_clipping is 0.5 in the JSON but the recipe has --max_grad_norm 1.0") == 1


@pytest.mark.skipif(NO_FP16 is not None, reason=str(NO_FP16))
def test_diverging_fp16_run_stops_with_a_clear_error_and_keeps_its_checkpoints(glue_dir, tiny_bert, tmp_path):
    """An absurd LR makes every fp16 step overflow; the run stops after 5 skipped updates in a row, and
    the checkpoints it wrote before are complete."""
    out = tmp_path / "diverged"
    proc = launch("recipes/glue.py", _glue_args(glue_dir, tiny_bert, out, "--max_train_steps", "40", "--learning_rate",
                                                "1000", "--max_consecutive_skipped_steps", "5", "--checkpointing_steps", "2"),
                  processes=2, ds_config="zero2.json", mixed_precision="fp16", check=False)
    assert proc.returncode == 3, proc.stderr[-4000:]
    assert proc.stderr.count("5 updates in a row were skipped because the gradient was inf/NaN") == 1
    assert not (out / "results.json").exists()
    saved = sorted((out / "checkpoints").iterdir())
    assert saved and all((p / "progress.json").is_file() and not p.name.endswith(".tmp") for p in saved)
