"""Run by tests/test_zero_resume.py under ``torchrun`` (1 or 2 processes): AdaptOpt as DeepSpeed's client
optimizer under each ZeRO case (CASES), trained a few steps and checkpointed, or a checkpoint of another world size
loaded through adaptopt/zero_resume.py and saved again at once, so that the test can compare the two checkpoints.

``--train OUT``: trains STEPS updates (adaptive clipping by the engine, AdaptOpt's default Mechanic rule and
adaptive momentum: every kind of state) and saves ``OUT/<config>-<precision>``.
``--reshard IN OUT``: builds the same engine, loads ``IN/<config>-<precision>`` (another world size) as the recipes do
(the model by DeepSpeed with ``load_optimizer_states=False``, the optimizer state by ``load_resharded``), checks
that the fp32 master weights are the whole ones, and saves ``OUT/<config>-<precision>`` without a step in between.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import deepspeed  # noqa: E402
import deepspeed.comm as dist  # noqa: E402
from ds_worker import CLIP, MICRO, PRECISION_DTYPE, build, ds_config, loss_fn, make_data, make_model  # noqa: E402

from adaptopt.deepspeed_run import DeepSpeedRun  # noqa: E402
from adaptopt.zero_resume import consolidate, load_resharded  # noqa: E402

# (ds_configs/ file, precision): both ZeRO stages, the host-side optimizer of ZeRO-Offload, bf16 master weights, and
# fp16's dynamic loss scale where DeepSpeed takes fp16 on this CPU (tests/test_deepspeed.py: _deepspeed_takes_fp16)
CASES = (("zero1.json", "fp32"), ("zero2.json", "fp32"), ("zero2_offload.json", "fp32"), ("zero2.json", "bf16"),
         ("zero2.json", "fp16"), ("zero3.json", "fp32"), ("zero3_offload.json", "fp32"), ("zero3.json", "bf16"))
STEPS = 4


def engine_for(config_name: str, precision: str):
    world = dist.get_world_size()
    config = ds_config(config_name, precision)
    config.update(train_batch_size=MICRO * world)  # each rank takes MICRO rows of every step's batch
    model = make_model()
    run = DeepSpeedRun(config, CLIP, adaptive_clip=True)
    optimizer = build("adaptopt", model, max_grad_norm=None)
    run.guard(optimizer)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    run.attach(engine, optimizer)
    return engine, run


def train(out: Path, config_name: str, precision: str) -> None:
    engine, run = engine_for(config_name, precision)
    world, rank = dist.get_world_size(), dist.get_rank()
    x, y, _, _ = make_data(STEPS)
    rows = slice(rank * 2 * MICRO // world, (rank + 1) * 2 * MICRO // world)  # the same global batch at any size
    for t in range(STEPS):
        engine.backward(loss_fn(engine(x[t, rows].to(PRECISION_DTYPE[precision])), y[t, rows]))
        engine.step()
        run.after_update()
    engine.save_checkpoint(str(out / f"{config_name}-{precision}"), tag="pytorch_model")
    engine.destroy()


def reshard(source: Path, out: Path, config_name: str, precision: str) -> None:
    engine, run = engine_for(config_name, precision)
    folder = f"{config_name}-{precision}"
    whole = consolidate(source / folder / "pytorch_model")
    assert whole.written_by != dist.get_world_size()
    engine.load_checkpoint(str(source / folder), tag="pytorch_model", load_optimizer_states=False)
    load_resharded(engine, whole)
    run.after_load()
    params = dict(engine.module.named_parameters())
    with deepspeed.zero.GatheredParameters(list(params.values()), enabled=whole.stage == 3):
        for name, param in params.items():  # the model the engine holds is the checkpoint's
            group = next(g for g in whole.fp32 if name in g)
            assert torch.equal(param.detach().flatten(), group[name].to(param.dtype)), name
    engine.save_checkpoint(str(out / folder), tag="pytorch_model")
    engine.destroy()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--train", type=Path)
    parser.add_argument("--reshard", type=Path, nargs=2)
    args = parser.parse_args()
    deepspeed.init_distributed(dist_backend="gloo")
    from deepspeed.accelerator import get_accelerator

    for config_name, precision in CASES:
        if precision == "fp16" and not get_accelerator().is_fp16_supported():
            continue
        if args.train:
            train(args.train, config_name, precision)
        # ZeRO-3 grows no further than the processes that wrote it: a new rank has no model-state file to load
        if args.reshard and not (config_name.startswith("zero3") and dist.get_world_size() > 1):
            reshard(*args.reshard, config_name, precision)
    dist.barrier()
    # a gloo group left to the interpreter's finalization can abort the process (adaptopt/training.py:
    # end_process_group)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
