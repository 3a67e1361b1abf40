"""What only a GPU exercises, checked in one run of under 8 minutes on a machine with one CUDA GPU.

    python benchmarks/gpu_check.py --data_dir ../shared/data/glue --json docs/gpu_check.json

Three checks, each in its own process with its own time limit, their figures gathered into one JSON and
one printed summary:

1. ``optimizer_step``: benchmarks/optimizer_step.py on the GPU: AdaptOpt's compiled update (Triton code)
   against torch's fused AdamW on all-MiniLM-L6-v2's parameters, as a ratio, and the fraction of the GPU's
   memory bandwidth (a measured copy) that AdaptOpt's step reaches.
2. ``zero2_fp16`` and ``zero2_bf16``: a short recipes/glue.py run (SST-2, AdaptOpt) under DeepSpeed ZeRO-2
   (ds_configs/zero2.json) with fp16 (dynamic loss scaling) and with bf16. Passes when the logged training
   loss falls (the last third of the logged windows against the first third) and at most a few updates
   were skipped (the loss scaler's first overflows, not a storm).
3. ``throughput``: benchmarks/glue_throughput.py (one round): the recipe's samples/s against HF Trainer's.

Without a GPU the script runs what a CPU allows, on the CPU and smaller: the optimizer step (with its CPU
rows), the ZeRO-2 runs in bf16 (and fp16 where DeepSpeed's CPU accelerator accepts it: not on AMD CPUs,
where the check is reported as skipped with DeepSpeed's reason) and the throughput comparison, each with
fewer steps. The summary names the device, so a CPU run is never mistaken for the GPU check.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from adaptopt.launch import launcher_args, run_recipe  # noqa: E402

MAX_SKIPPED = 5  # fp16's loss scaler skips its first few updates while it finds its scale; more is a storm
# fp16 refused by the machine's DeepSpeed accelerator (CPUs without oneDNN fp16 kernels): the recipes' start-up
# check (adaptopt.config_check.precision_refusal), or DeepSpeed's own message where that check did not run
FP16_REFUSED = ("does not support fp16", "not supported on your device")


def run(cmd: list[str], timeout: int, env: dict | None = None) -> tuple[int, str, float]:
    """Exit code, the output's tail and the wall time of ``cmd`` (124 when it ran out of time)."""
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})
        code, out = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as err:
        code, out = 124, (err.stdout or b"").decode(errors="replace") + (err.stderr or b"").decode(errors="replace")
    return code, out[-3000:], time.perf_counter() - start


def check_optimizer_step(device: str, quick: bool, timeout: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out_json = Path(tmp) / "step.json"
        repeats = ["--repeats", "3", "--warmup", "1"] if quick else ["--repeats", "30"]
        code, tail, secs = run([sys.executable, "benchmarks/optimizer_step.py", "--device", device, *repeats,
                                "--json", str(out_json)], timeout)
        if code != 0:
            return dict(status="failed", exit_code=code, seconds=secs, output_tail=tail)
        step = json.loads(out_json.read_text())
    keys = ("adaptopt_compiled_over_torch_fused", "adaptopt_compiled_bandwidth_fraction", "adaptopt_compiled_GBps",
            "copy_bandwidth_GBps", "median_ms")
    return dict(status="ok", seconds=secs, **{k: step[k] for k in keys if k in step})


def check_zero2(precision: str, data_dir: str, quick: bool, timeout: int) -> dict:
    steps = 20 if quick else 120
    with tempfile.TemporaryDirectory() as out:
        launcher = launcher_args(processes=1, mixed_precision=precision,
                                 deepspeed_config=REPO / "ds_configs" / "zero2.json", main_process_port=29571)
        recipe_args = ["--task_name", "sst2", "--data_dir", data_dir, "--output_dir", out,
                       "--max_train_samples", str(steps * 16), "--max_train_steps", str(steps),
                       "--per_device_train_batch_size", "16", "--learning_rate", "1e-4", "--max_eval_samples", "128",
                       "--logging_steps", str(max(1, steps // 10))]
        start = time.perf_counter()
        try:
            proc = run_recipe(launcher, REPO / "recipes" / "glue.py", recipe_args, env=dict(HF_HUB_OFFLINE="1"),
                              timeout=timeout, check=False)
            code, tail = proc.returncode, (proc.stdout + proc.stderr)[-3000:]
        except subprocess.TimeoutExpired:
            code, tail = 124, ""
        secs = time.perf_counter() - start
        if code != 0:
            status = "skipped" if any(refusal in tail for refusal in FP16_REFUSED) else "failed"
            return dict(status=status, exit_code=code, seconds=secs, output_tail=tail)
        results = json.loads((Path(out) / "results.json").read_text())
        log = [json.loads(line) for line in (Path(out) / "train_log.jsonl").read_text().splitlines()]
    losses = [row["train/loss"] for row in log if "train/loss" in row]
    skipped = int(results.get("skipped_updates", 0))
    third = max(1, len(losses) // 3)  # logged windows are noisy: the last third's mean against the first's
    falls = len(losses) >= 2 and sum(losses[-third:]) / third < sum(losses[:third]) / third
    return dict(status="ok" if falls and skipped <= MAX_SKIPPED else "failed", seconds=secs, losses=losses,
                loss_falls=falls, skipped_updates=skipped, completed_steps=results.get("completed_steps"),
                dev_accuracy=results.get("eval_accuracy", results.get("accuracy")))


def check_throughput(data_dir: str, quick: bool, timeout: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out_json = Path(tmp) / "throughput.json"
        steps = ["--steps", "20", "--train_samples", "800"] if quick else ["--steps", "100"]
        code, tail, secs = run([sys.executable, "benchmarks/glue_throughput.py", "--data_dir", data_dir, *steps,
                                "--rounds", "1", "--variants", "recipe_adaptopt", "--json", str(out_json)], timeout)
        if code != 0:
            return dict(status="failed", exit_code=code, seconds=secs, output_tail=tail)
        figures = json.loads(out_json.read_text())["median"]
    anchor = figures["hf_trainer_adamw"]
    return dict(status="ok", seconds=secs, samples_per_second=figures,
                recipe_over_trainer={name: value / anchor for name, value in figures.items()})


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", default=os.environ.get("GLUE_DIR"), help="GLUE TSV root (default $GLUE_DIR)")
    parser.add_argument("--json", type=Path, default=Path("gpu_check.json"), help="where to write the figures")
    parser.add_argument("--quick", action="store_true",
                        help="fewer steps and repeats (set by itself without a GPU): a run of the script, not a measurement")
    args = parser.parse_args(argv)
    if not args.data_dir:
        parser.error("pass --data_dir or set GLUE_DIR")
    import torch

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    quick = args.quick or not cuda
    report = dict(device=torch.cuda.get_device_name() if cuda else "cpu (no CUDA GPU: a run of the script only)",
                  torch=torch.__version__, quick=quick, checks={})
    limits = dict(optimizer_step=90, zero2_fp16=120, zero2_bf16=120, throughput=150)  # seconds, 8 min together
    if not cuda:  # the CPU runs the same checks, smaller, many times slower (and 2 cores may be shared)
        limits = {name: 10 * limit for name, limit in limits.items()}
    start = time.perf_counter()
    report["checks"]["optimizer_step"] = check_optimizer_step(device, quick, limits["optimizer_step"])
    for precision in ("fp16", "bf16"):
        report["checks"][f"zero2_{precision}"] = check_zero2(precision, args.data_dir, quick, limits[f"zero2_{precision}"])
    report["checks"]["throughput"] = check_throughput(args.data_dir, quick, limits["throughput"])
    report["seconds"] = time.perf_counter() - start
    args.json.write_text(json.dumps(report, indent=2))

    print(f"GPU check on {report['device']}, torch {report['torch']}: {report['seconds']:.0f} s")
    for name, check in report["checks"].items():
        line = f"  {name:15} {check['status']:8} {check['seconds']:6.0f} s"
        if name == "optimizer_step" and check["status"] == "ok":
            line += (f"  AdaptOpt compiled / torch fused AdamW {check['adaptopt_compiled_over_torch_fused']:.2f}x, "
                     f"{check['adaptopt_compiled_bandwidth_fraction']:.2f} of the copy bandwidth")
        elif name.startswith("zero2") and check.get("losses"):
            line += (f"  loss {check['losses'][0]:.3f} -> {check['losses'][-1]:.3f}, "
                     f"{check['skipped_updates']} skipped updates")
        elif name == "throughput" and check["status"] == "ok":
            line += f"  recipe / HF Trainer {check['recipe_over_trainer']['recipe_adaptopt']:.2f}x samples/s"
        elif check["status"] != "ok":
            line += f"  (exit {check.get('exit_code')}; output tail in {args.json})"
        print(line)
    print(f"figures: {args.json}")
    return report


if __name__ == "__main__":
    main()
