"""adaptopt/zero_resume.py: a DeepSpeed ZeRO-1/2/3 checkpoint of N processes loaded by M carries the whole state.

Real DeepSpeed engines on CPU (gloo) through torchrun (tests/zero_resume_worker.py): checkpoints of 1 and 2
processes, each loaded at the other world size and saved again at once. Joined from their shards, the saved
checkpoint must equal the one loaded: the fp32 weights, every per-element state tensor (exp_avg, exp_avg_sq,
Mechanic's x0), every per-tensor and group scalar, the engine's clipper and the Mechanic learner, and the pending
partial sums as totals. recipes/glue.py resuming at another world size: tests/test_checkpointing.py.
"""
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO, _free_port
from test_deepspeed import NO_FP16

from adaptopt.zero_resume import consolidate

pytestmark = pytest.mark.slow  # three torchrun launches

CASES = ["zero1.json-fp32", "zero2.json-fp32", "zero2_offload.json-fp32", "zero2.json-bf16",  # the worker's
         pytest.param("zero2.json-fp16", marks=pytest.mark.skipif(bool(NO_FP16), reason=str(NO_FP16))),
         "zero3.json-fp32", "zero3_offload.json-fp32", "zero3.json-bf16"]


def _torchrun(processes: int, *args) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_port",
           str(_free_port()), str(REPO / "tests" / "zero_resume_worker.py"), *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-6000:]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("zero-resume")
    _torchrun(1, "--train", root / "one")
    _torchrun(2, "--train", root / "two", "--reshard", root / "one", root / "one_to_two")
    _torchrun(1, "--reshard", root / "two", root / "two_to_one")
    return root


def _assert_same_state(a, b):
    assert len(a.fp32) == len(b.fp32) == 2  # AdaptOpt's decay and no-decay groups
    for i in range(len(a.fp32)):
        assert a.fp32[i].keys() == b.fp32[i].keys()
        assert all(torch.equal(a.fp32[i][n], b.fp32[i][n]) for n in a.fp32[i])
        assert set(a.tensors[i]) == set(b.tensors[i]) == {"exp_avg", "exp_avg_sq", "x0"}
        for key, named in a.tensors[i].items():
            assert all(torch.equal(named[n], b.tensors[i][key][n]) for n in named), key
        assert a.scalars[i].keys() == b.scalars[i].keys() == {"step", "beta1_prod"}
        assert float(a.scalars[i]["step"]) == float(b.scalars[i]["step"]) > 0
        assert a.scalars[i]["beta1_prod"] == b.scalars[i]["beta1_prod"]
    # group scalars (lr_scale, path_cos, index, pending_stats as totals, ...), the clipper, the Mechanic learner
    groups_a, groups_b = a.client.pop("param_groups"), b.client.pop("param_groups")
    assert groups_a == groups_b and all(g["pending_stats"] is not None for g in groups_a)
    assert a.client == b.client and a.client["lr_tuner"]["pending"] is not None
    assert len(a.client["grad_clipper"]["warmup_norms"]) > 0  # the engine's adaptive clipper had recorded norms
    # DeepSpeed's own state: the loss scale (fp16's moves), the clip value (ZeRO-1/2 keep it)
    assert a.engine.keys() == b.engine.keys()
    for key in ("dynamic_loss_scale", "clip_grad", "overflow"):
        assert a.engine.get(key) == b.engine.get(key), key
    assert vars(a.engine["loss_scaler"]) == vars(b.engine["loss_scaler"])


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("source, resharded, written_by", [("two", "two_to_one", 2), ("one", "one_to_two", 1)])
def test_a_checkpoint_loaded_at_another_world_size_holds_the_whole_state(checkpoints, case, source, resharded,
                                                                         written_by):
    if case.startswith("zero3") and resharded == "one_to_two":
        pytest.skip("ZeRO-3 resumes only with fewer processes (adaptopt/checkpointing.py refuses more)")
    a = consolidate(checkpoints / source / case / "pytorch_model")
    b = consolidate(checkpoints / resharded / case / "pytorch_model")
    assert (a.written_by, b.written_by) == (written_by, 3 - written_by)
    _assert_same_state(a, b)


def test_the_pending_partial_sums_are_totalled_over_the_writing_ranks(checkpoints):
    """Each rank's pending sums are its shard's part; their total is what the next step's all-reduce gives."""
    shards = [torch.load(p, weights_only=False)["optimizer_state_dict"]["base_optimizer_state"]
              for p in sorted((checkpoints / "two" / "zero2.json-fp32" / "pytorch_model").glob("zero_pp_rank_*"))]
    whole = consolidate(checkpoints / "two" / "zero2.json-fp32" / "pytorch_model")
    assert len(shards) == 2 and shards[0]["lr_tuner"]["pending"] != shards[1]["lr_tuner"]["pending"]
    assert whole.client["lr_tuner"]["pending"] == [a + b for a, b in zip(*(s["lr_tuner"]["pending"] for s in shards))]
    for i, group in enumerate(whole.client["param_groups"]):
        parts = [s["param_groups"][i]["pending_stats"] for s in shards]
        assert group["pending_stats"] == [a + b for a, b in zip(*parts)]
