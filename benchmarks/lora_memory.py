"""Memory of one training step of a 124M-parameter GPT-2 with LoRA adapters vs full fine-tuning, on CPU.

    python benchmarks/lora_memory.py                       # about 3 minutes on 2 cores
    python benchmarks/lora_memory.py --shapes 1x128 8x512 --optimizer adamw --json lora_memory.json

Model: ``GPT2LMHeadModel(GPT2Config())``, GPT-2 small's shape (12 layers, 768 wide, 1024 positions,
vocabulary 50,257: 124,439,808 parameters), randomly initialised from seed 0: no pretrained causal LM can
be had offline, and memory does not depend on the weights' values. Each mode runs in a fresh process, so
that its peak resident memory is its own:

* full: every parameter trains;
* lora: ``adaptopt.lora.apply_lora(model, "CAUSAL_LM", r=--lora_r)``, as ``--lora`` in the recipes does
  (rank 8 on c_attn, peft's default for GPT-2; the base weights are frozen).

Then the optimizer from ``adaptopt.build_optimizer`` (AdaptOpt by default; it is built from trainable
parameters only) and one step: forward and backward on a batch of random token ids (labels = inputs),
``optimizer.step()``, for each ``--shapes`` entry (sequences x tokens). The figures are those of the
recipes' memory report (``adaptopt.memory.MemoryTracker``): optimizer state = the tensors in
``optimizer.state`` after the step; gradients = the ``.grad`` tensors the optimizer stepped with; peak =
the process's ``ru_maxrss``, which also counts the Python/torch/transformers runtime both modes share
(printed as "after imports").
Targets (issue 6): optimizer state + gradients cut by >= 90%, peak process memory cut by >= 40%.

Why two batch shapes: LoRA removes the gradients and optimizer state of the frozen weights, not the
activations, which every mode keeps for backward (GPT-2 small in eager mode: about 2 GB at 4 x 256 tokens,
mostly attention scores, MLP intermediates and the 50,257-wide logits). Peak memory is the larger of the
forward/backward activation peak and weights + gradients + state at the step, so the peak cut is large
where the weights dominate (a large model, a small batch: the regime of "larger LLMs", 1 x 128 here) and
small where activations dominate (4 x 256 here). The table gives both.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MIB = 2**20
TARGETS = {"state_grad": 0.90, "peak": 0.40}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--optimizer", default="adaptopt", help="registry name (default %(default)s)")
    parser.add_argument("--shapes", nargs="+", default=["1x128", "4x256"],
                        help="batch shapes, sequences x tokens, one pair of runs each (default %(default)s)")
    parser.add_argument("--lora_r", type=int, default=8, help="adapter rank (default %(default)s)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default %(default)s)")
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    parser.add_argument("--child", choices=["full", "lora"], default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    try:
        args.shapes = [tuple(int(n) for n in shape.lower().split("x")) for shape in args.shapes]
    except ValueError:
        parser.error(f"--shapes takes sequences x tokens pairs such as 1x128 (got {' '.join(args.shapes)})")
    return args


def run_child(args) -> dict:
    """One mode, in this (fresh) process; returns its figures."""
    import resource

    import torch

    sys.path.insert(0, str(REPO))
    from transformers import GPT2Config, GPT2LMHeadModel

    from adaptopt import build_optimizer
    from adaptopt.memory import MemoryTracker

    after_imports = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config())
    if args.child == "lora":
        from adaptopt.lora import apply_lora

        model = apply_lora(model, "CAUSAL_LM", r=args.lora_r)
    model.train()
    optimizer = build_optimizer(args.optimizer, model)
    tracker = MemoryTracker(model, optimizer)
    ids = torch.randint(0, model.config.vocab_size, args.shapes[0], generator=torch.Generator().manual_seed(1))
    start = time.perf_counter()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    seconds = time.perf_counter() - start
    report = tracker.report()
    return dict(mode=args.child, **report, after_imports_mb=after_imports, step_s=seconds, loss=float(loss))


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(run_child(args)))
        return
    import torch

    print(f"GPT-2 small shape (random init), optimizer {args.optimizer}, LoRA rank {args.lora_r}; torch "
          f"{torch.__version__}, {args.threads} threads, {platform.machine()}, {os.cpu_count()} CPUs", flush=True)
    print(f"{'batch':<8} {'mode':<5} {'parameters':>12} {'trainable':>12} {'opt state MiB':>14} {'grads MiB':>10} "
          f"{'state+grad MiB':>15} {'peak MiB':>9} {'after imports':>14} {'step s':>7}", flush=True)
    results = []
    for batch, seq in args.shapes:
        rows = {}
        for mode in ("full", "lora"):
            cmd = [sys.executable, __file__, "--child", mode, "--optimizer", args.optimizer, "--shapes",
                   f"{batch}x{seq}", "--lora_r", str(args.lora_r), "--threads", str(args.threads)]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
            if proc.returncode != 0:
                raise SystemExit(f"{mode} {batch}x{seq} failed:\n{proc.stderr[-3000:]}")
            r = rows[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
            r["state_grad_bytes"] = r["optimizer_state_bytes"] + r["gradient_bytes"]
            print(f"{batch}x{seq:<6} {mode:<5} {r['parameters']:>12,} {r['trainable_parameters']:>12,} "
                  f"{r['optimizer_state_bytes'] / MIB:>14.1f} {r['gradient_bytes'] / MIB:>10.1f} "
                  f"{r['state_grad_bytes'] / MIB:>15.1f} {r['peak_memory_mb']:>9.0f} {r['after_imports_mb']:>14.0f} "
                  f"{r['step_s']:>7.2f}", flush=True)
        full, lora = rows["full"], rows["lora"]
        cuts = {"state_grad": 1 - lora["state_grad_bytes"] / full["state_grad_bytes"],
                "peak": 1 - lora["peak_memory_mb"] / full["peak_memory_mb"]}
        results.append(dict(batch=batch, seq=seq, rows=rows, cuts=cuts))
    print()
    for res in results:
        for key, label in (("state_grad", "optimizer state + gradients"), ("peak", "peak process memory")):
            cut = res["cuts"][key]
            print(f"{res['batch']}x{res['seq']}: {label}: LoRA/full = {1 - cut:.4f}, cut {cut:.1%} "
                  f"(target >= {TARGETS[key]:.0%}): {'met' if cut >= TARGETS[key] else 'NOT met'}")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(settings=vars(args), results=results), indent=2))


if __name__ == "__main__":
    main()
