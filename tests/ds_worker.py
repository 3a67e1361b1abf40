"""Run by tests/test_deepspeed.py under ``torchrun --nproc_per_node 2``: every registry optimizer as
DeepSpeed's client optimizer, under each ds_configs/ file and precision, against a single-process
PyTorch run of the same global batch.

For every case it writes one JSON line to the output file (rank 0): the largest parameter difference
to the single-process run, the final-loss difference, the largest difference between the engine's
logged pre-clip norm and the true global norm, and the step counts. The test judges them.

The glue is the recipes' own: adaptopt.deepspeed_run.DeepSpeedRun fills the clipping, decides who clips and
gives AdaptOpt a reduce_fn under ZeRO; adaptopt.divergence.update_applied tells the schedule and the skip
counter which updates applied, as in adaptopt/training.py.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import deepspeed  # noqa: E402
import deepspeed.comm as dist  # noqa: E402

from adaptopt import build_optimizer, build_scheduler  # noqa: E402
from adaptopt.deepspeed_run import DeepSpeedRun  # noqa: E402
from adaptopt.divergence import DivergenceMonitor, update_applied  # noqa: E402

MICRO, D_IN, D_OUT, STEPS, LR, CLIP = 4, 16, 4, 5, 1e-2, 0.5
PRECISION_DTYPE = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def make_model() -> torch.nn.Module:
    torch.manual_seed(1)
    return torch.nn.Sequential(torch.nn.Linear(D_IN, 32), torch.nn.LayerNorm(32), torch.nn.GELU(),
                               torch.nn.Linear(32, D_OUT))


def make_data(steps: int):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(steps, 2 * MICRO, D_IN, generator=gen)
    y = 3 * torch.randn(steps, 2 * MICRO, D_OUT, generator=gen)  # large targets: the norm exceeds CLIP early on
    x_eval = torch.randn(64, D_IN, generator=gen)
    y_eval = 3 * torch.randn(64, D_OUT, generator=gen)
    return x, y, x_eval, y_eval


def loss_fn(out, y):
    return torch.nn.functional.mse_loss(out.float(), y)


def ds_config(name: str, precision: str) -> dict:
    config = json.loads((REPO / "ds_configs" / name).read_text())
    # what accelerate fills from the recipe and the model in a real run
    config.update(train_micro_batch_size_per_gpu=MICRO, gradient_accumulation_steps=1, train_batch_size=2 * MICRO)
    config["fp16"]["enabled"] = precision == "fp16"
    # 2^8, not the file's 2^16: this tiny model's loss (about 10) times 2^16 overflows fp16 in the first
    # steps, and those skips would make the run differ from the reference for a reason this test is not about.
    config["fp16"]["initial_scale_power"] = 8
    config["bf16"]["enabled"] = precision == "bf16"
    zero = config["zero_optimization"]
    for key in ("reduce_bucket_size", "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold"):
        if zero.get(key) == "auto":
            zero[key] = 0 if key == "stage3_param_persistence_threshold" else 500_000
    config["steps_per_print"] = 10**9
    return config


def build(opt_name: str, model, **kwargs):
    """The optimizer as the recipes build it; Schedule-Free steps in train mode."""
    optimizer = build_optimizer(opt_name, model, lr=LR, **kwargs)
    if hasattr(optimizer, "train"):
        optimizer.train()
    return optimizer


def reference(opt_name: str, steps: int, adaptive_clip: bool, skip_step: int | None, rule: dict):
    """The single-process run: fp32 PyTorch, whole global batch, the optimizer's own clipping."""
    model = make_model()
    opt = build(opt_name, model, max_grad_norm=CLIP, adaptive_clip=adaptive_clip, **rule)
    sched = build_scheduler(opt, "linear", total_steps=steps, warmup_steps=2)
    x, y, x_eval, y_eval = make_data(steps)
    norms = []
    for t in range(steps):
        if t == skip_step:
            norms.append(float("inf"))
            continue  # the overflowed step: nothing happens
        opt.zero_grad()
        loss_fn(model(x[t]), y[t]).backward()
        opt.step()
        sched.step()
        norms.append(opt.grad_clipper.last_norm)
    with torch.no_grad():
        final = float(loss_fn(model(x_eval), y_eval))
    return [p.detach().clone() for p in model.parameters()], final, norms, sched.applied_steps


def deepspeed_run(opt_name: str, config_name: str, precision: str, steps: int, adaptive_clip: bool,
                  skip_step: int | None, rule: dict, impl: dict):
    rank = dist.get_rank()
    config = ds_config(config_name, precision)
    model = make_model()
    run = DeepSpeedRun(config, CLIP, adaptive_clip)
    optimizer = build(opt_name, model, max_grad_norm=CLIP if run.optimizer_clips else None,
                      adaptive_clip=adaptive_clip and run.optimizer_clips, **rule, **impl)
    scheduler = build_scheduler(optimizer, "linear", total_steps=steps, warmup_steps=2)
    scheduler.count_updates_externally()  # ZeRO calls step() per group: the schedule counts update_applied's answers
    run.guard(optimizer)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    run.attach(engine, optimizer)
    monitor = DivergenceMonitor(max_consecutive=10**9)  # the recipes' skip counter
    dtype = PRECISION_DTYPE[precision]
    x, y, x_eval, y_eval = make_data(steps)
    rows = slice(rank * MICRO, (rank + 1) * MICRO)
    norms = []
    for t in range(steps):
        loss = loss_fn(engine(x[t, rows].to(dtype)), y[t, rows])
        if t == skip_step:
            loss = loss * float("inf")  # an overflow, as fp16 produces one
        engine.backward(loss)
        engine.step()
        applied = update_applied(run.after_update(), optimizer)
        if applied:
            scheduler.record_update()
        monitor.update(applied)
        scheduler.step()
        norms.append(run.grad_clipper.last_norm)
    with torch.no_grad():
        final = float(loss_fn(engine(x_eval.to(dtype)), y_eval))
    if run.stage == 3:
        with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
            params = [p.detach().float().clone() for p in engine.module.parameters()]
    else:
        params = [p.detach().float().clone() for p in engine.module.parameters()]
    state_steps = sorted({float(s["step"]) for s in optimizer.state.values() if "step" in s})
    engine.destroy()
    return params, final, norms, scheduler.applied_steps, monitor.skipped, state_steps


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--cases", required=True, help="JSON list of [optimizer, config, precision, extra]")
    args = parser.parse_args()
    deepspeed.init_distributed(dist_backend="gloo")
    out = open(args.out, "w") if dist.get_rank() == 0 else None
    for opt_name, config_name, precision, extra in json.loads(args.cases):
        flags = set(extra.split("+"))  # e.g. "compiled+overflow"
        adaptive_clip = "adaptive_clip" in flags
        skip_step = 2 if "overflow" in flags else None
        steps = 30 if adaptive_clip else STEPS  # ZClip's threshold takes over after 25 norms
        rule = {"adaptive_lr": "hypergradient"} if "hypergradient" in flags else {}
        ref_params, ref_final, ref_norms, ref_applied = reference(opt_name, steps, adaptive_clip, skip_step, rule)
        params, final, norms, applied, skipped, state_steps = deepspeed_run(
            opt_name, config_name, precision, steps, adaptive_clip, skip_step, rule,
            impl={flag: True for flag in ("compiled", "fused", "native") if flag in flags})
        if out is not None:
            # the largest parameter difference, relative to how far the reference moved the parameters
            moved = max(float((a - b).abs().max()) for a, b in zip(ref_params, make_model().parameters()))
            diff = max(float((a - b).abs().max()) for a, b in zip(params, ref_params))
            # and relative to each tensor's largest value (bf16/fp16 parameters carry 8/11 significant bits)
            rel = max(float((a - b).abs().max() / b.abs().max().clamp_min(1e-12)) for a, b in zip(params, ref_params))
            finite = [(a, b) for a, b in zip(norms, ref_norms) if b != float("inf")]
            result = dict(
                optimizer=opt_name, config=config_name, precision=precision, extra=extra,
                param_diff_over_move=diff / moved, param_rel_diff=rel, final_loss=final, ref_final_loss=ref_final,
                norm_rel_diff=max(abs(a - b) / b for a, b in finite),
                skipped_norm_inf=all(norms[i] == float("inf") for i, b in enumerate(ref_norms) if b == float("inf")),
                applied=applied, ref_applied=ref_applied, skipped=skipped, state_steps=state_steps,
            )
            out.write(json.dumps(result) + "\n")
            out.flush()
    dist.barrier()
    # a gloo group left to the interpreter's finalization can abort the process (adaptopt/training.py:
    # end_process_group)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
