"""Peak host memory per rank and tokens/s of recipes/clm.py on LLaMA-family models of three sizes, under
DeepSpeed ZeRO-2 and ZeRO-3 on 2 processes, each with and without LoRA and activation checkpointing; the
memory of loading a checkpoint with and without ZeRO-3's partitioned loading (zero.Init); and checkpointing's
cut at a long sequence. The table of docs/llm.md is this script's output.

    python benchmarks/llm_memory.py --output_dir runs/llm_memory --adamw             # every part (about 1.5 h on 2 cores)
    python benchmarks/llm_memory.py --output_dir runs/llm_memory --parts table --sizes llama-tiny   # one size

Every figure comes from a real run of the recipe through accelerate + DeepSpeed (2 CPU processes, gloo):

    accelerate launch --config_file launch/deepspeed_single_node.yaml --deepspeed_config_file ds_configs/zero{2,3}.json \\
        --num_processes 2 recipes/clm.py --config_name llama-120m --block_size 128 --per_device_train_batch_size 1 \\
        --max_train_steps 3 [--lora] [--gradient_checkpointing] ...

- Models: recipes/clm.py's presets llama-tiny (4.0M), llama-60m (57M) and llama-120m (122M parameters, with the
  30,522-token MiniLM vocabulary), random init (memory does not depend on the weights' values).
- Optimizer: the recipe's default, AdaptOpt with Mechanic (12 bytes of fp32 state per trained parameter), with
  --optimizer_impl eager so that no run includes torch.compile's first compilation; ``--adamw`` adds one AdamW
  row (8 bytes per parameter) per size.
- Peak memory: each rank's ``ru_maxrss`` at the end of the run (results.json's peak_memory_mb_per_rank), which
  includes the Python/torch/DeepSpeed runtime (about 0.5 GiB per rank here). "at start": the same once
  prepare() has placed the model, before the first update (memory.start.peak_memory_mb, rank 0; the load part
  reads every rank's, peak_memory_at_start_mb_per_rank, and the peak before loading,
  peak_memory_before_load_mb_per_rank). A checkpoint is mapped lazily and first read when prepare() places it,
  which is why loading is measured up to the start of training and not right after from_pretrained. The load
  part also reports each rank's private memory (private_memory_*_load_mb_per_rank: anonymous resident memory,
  sampled), which leaves out the mapped checkpoint's page cache that the resident figures count.
- tokens/s: training tokens of both ranks per second of training (3 updates, the first included), indicative
  only: the machine is shared and the first update carries DeepSpeed's set-up.
- Loading (``--parts load``): the preset llama-250m (251M parameters) saved once as a checkpoint (safetensors,
  200 MB shards) and loaded with --model_name_or_path under ZeRO-3, with accelerate's zero3_init_flag on (the
  repository's default) and off (``--zero3_init_flag false``: every rank loads the whole model, then DeepSpeed
  partitions it); and the same model built from its config (--config_name llama-250m) both ways. These runs
  train LoRA adapters for one update: loading is the same as for full fine-tuning, and the small training
  step keeps the run beside a machine's other jobs.
- Before each run the script waits until --min_available_gib of memory is available (a shared machine).
- Long sequence (``--parts long``): llama-60m, ZeRO-2, full fine-tuning, 1 x 2048 tokens, with and without
  --gradient_checkpointing, 2 updates.
Writes <output_dir>/llm_memory.json (every run's figures and command, added as runs finish) and prints the
tables in markdown.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing: the repository's adaptopt

from adaptopt.launch import command_line, launcher_args, recipe_command, run_recipe  # noqa: E402

SIZES = ["llama-tiny", "llama-60m", "llama-120m"]
LARGE = ["llama-250m"]  # full fine-tuning needs about 6 GiB per rank: run on its own with --sizes llama-250m
PARTS = ["table", "load", "long"]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", required=True, help="data, one folder per run, and llm_memory.json go here")
    parser.add_argument("--squad_dir", default=os.environ.get("SQUAD_DIR") or str(REPO.parent / "shared" / "data" / "squad"),
                        help="SQuAD v1.1 files whose paragraphs are the training text")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=PARTS, help="what to measure")
    parser.add_argument("--sizes", nargs="+", choices=SIZES + LARGE, default=SIZES,
                        help="model sizes of the table (llama-250m only when named)")
    parser.add_argument("--block_size", type=int, default=128, help="tokens per sequence of the table's runs")
    parser.add_argument("--steps", type=int, default=3, help="updates per table run")
    parser.add_argument("--adamw", action="store_true", help="add an AdamW row per size (ZeRO-2, full, no checkpointing)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads per process")
    parser.add_argument("--min_available_gib", type=float, default=8.0,
                        help="wait before each run until this much memory is available (MemAvailable)")
    return parser.parse_args(argv)


def write_text(squad_dir: Path, out: Path) -> tuple[Path, Path]:
    """SQuAD paragraphs as training (test-v1.1-part.json) and validation (dev-v1.1-part.json) text."""
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for source, name in (("test-v1.1-part.json", "train.jsonl"), ("dev-v1.1-part.json", "valid.jsonl")):
        data = json.loads((squad_dir / source).read_text())["data"]
        contexts = [p["context"] for article in data for p in article["paragraphs"]]
        paths.append(out / name)
        paths[-1].write_text("".join(json.dumps({"text": c}) + "\n" for c in contexts))
    return paths[0], paths[1]


def save_checkpoint(out: Path) -> Path:
    """llama-250m with random weights, saved as a pretrained checkpoint is, in 200 MB shards."""
    if (out / "config.json").is_file():
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    sys.path.insert(0, str(REPO / "recipes"))
    import clm

    tokenizer = AutoTokenizer.from_pretrained(clm.default_model_path())
    config = clm.model_config(argparse.Namespace(model_name_or_path=None, config_name="llama-250m",
                                                 trust_remote_code=False), tokenizer)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(out, max_shard_size="200MB", safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


class Runner:
    def __init__(self, args, train: Path, valid: Path):
        self.args, self.train, self.valid = args, train, valid
        self.out = Path(args.output_dir)
        self.json = self.out / "llm_memory.json"
        self.record = json.loads(self.json.read_text()) if self.json.is_file() else dict(runs={})

    def run(self, name: str, stage: int, recipe_args: list[str], block: int, steps: int, launcher_extra=()) -> dict:
        out = self.out / name
        if name in self.record["runs"] and (out / "results.json").is_file():  # a rerun continues where it stopped
            return self._row(name, stage, block, steps, self.record["runs"][name]["command"])
        wait_for_memory(self.args.min_available_gib)
        launcher = launcher_args(processes=2, deepspeed_config=REPO / "ds_configs" / f"zero{stage}.json",
                                 main_process_port=free_port()) + list(launcher_extra)
        args = ["--train_file", str(self.train), "--validation_file", str(self.valid), "--block_size", str(block),
                "--per_device_train_batch_size", "1", "--per_device_eval_batch_size", "1", "--max_train_steps",
                str(steps), "--max_eval_samples", "2", "--optimizer_impl", "eager", "--logging_steps", "1",
                "--output_dir", str(out), *recipe_args]
        out.mkdir(parents=True, exist_ok=True)
        cmd, _ = recipe_command(launcher, REPO / "recipes" / "clm.py", args, threads=self.args.threads)
        run_recipe(launcher, REPO / "recipes" / "clm.py", args, threads=self.args.threads, log=out / "run.log")
        row = self._row(name, stage, block, steps, command_line(cmd).replace(f"{REPO}/", "").replace(f"{self.out}/", ""))
        print(f"{name}: peak {row['peak_mb']} MiB, at start {row['start_mb']} MiB, "
              f"{row['tokens_per_s']:.0f} tokens/s", flush=True)
        return row

    def _row(self, name: str, stage: int, block: int, steps: int, command: str) -> dict:
        """The figures of a finished run, from its results.json (recorded in llm_memory.json)."""
        r = json.loads((self.out / name / "results.json").read_text())
        row = dict(name=name, stage=stage, model=r["model"], parameters=r["parameters"],
                   trainable_parameters=r["trainable_parameters"], optimizer=r["optimizer"],
                   lora=r["trainable_parameters"] < r["parameters"], gradient_checkpointing=r["gradient_checkpointing"],
                   block_size=block, steps=steps, peak_mb=r["peak_memory_mb_per_rank"],
                   start_mb=r.get("peak_memory_at_start_mb_per_rank", [r["memory"]["start"]["peak_memory_mb"]]),
                   before_load_mb=r.get("peak_memory_before_load_mb_per_rank"),
                   private_before_load_mb=r.get("private_memory_before_load_mb_per_rank"),
                   private_peak_load_mb=r.get("private_memory_peak_load_mb_per_rank"),
                   loaded_partitioned=r.get("loaded_partitioned"),
                   tokens_per_s=r["train_samples_per_second"] * block, train_loss=r["train_loss"],
                   optimizer_state_bytes=r["memory"]["end"]["optimizer_state_bytes"],
                   parameter_bytes=r["memory"]["end"]["parameter_bytes"],
                   command=command)
        self.record["runs"][name] = row
        self.json.write_text(json.dumps(self.record, indent=2))
        return row


def wait_for_memory(gib: float) -> None:
    import time

    def available() -> float:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("MemAvailable")) / 2**20

    while available() < gib:
        time.sleep(10)


def free_port() -> int:
    import socket

    with socket.socket() as s:  # other jobs on the machine may hold accelerate's default port
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def gib(mb_list) -> str:
    return " / ".join(f"{mb / 1024:.2f}" for mb in mb_list)


def main(argv=None) -> None:
    args = parse_args(argv)
    out = Path(args.output_dir)
    train, valid = write_text(Path(args.squad_dir), out / "data")
    runner = Runner(args, train, valid)
    runner.record.setdefault("machine", dict(date=datetime.date.today().isoformat(), cpus=os.cpu_count(),
                                             processor=platform.processor() or platform.machine()))
    if "table" in args.parts:
        print("| model | parameters | ZeRO | LoRA | act. ckpt | optimizer | peak GiB rank 0 / 1 | at start GiB, rank 0 "
              "| tokens/s |\n|---|---|---|---|---|---|---|---|---|", flush=True)
        for size in args.sizes:
            configs = [(stage, lora, ckpt, "adaptopt") for stage in (2, 3) for lora in (False, True)
                       for ckpt in (False, True)]
            if args.adamw:
                configs.append((2, False, False, "adamw"))
            for stage, lora, ckpt, optimizer in configs:
                name = f"{size}-zero{stage}{'-lora' if lora else ''}{'-ckpt' if ckpt else ''}" + (
                    "-adamw" if optimizer == "adamw" else "")
                extra = ["--config_name", size, "--optimizer", optimizer] + (["--lora"] if lora else []) + (
                    ["--gradient_checkpointing"] if ckpt else [])
                r = runner.run(name, stage, extra, args.block_size, args.steps)
                print(f"| {size} | {r['parameters'] / 1e6:.1f}M | {stage} | {'yes' if lora else 'no'} | "
                      f"{'yes' if ckpt else 'no'} | {optimizer} | {gib(r['peak_mb'])} | {gib(r['start_mb'][:1])} | "
                      f"{r['tokens_per_s']:.0f} |", flush=True)
    if "load" in args.parts:
        checkpoint = save_checkpoint(out / "llama-250m-checkpoint")
        print("\n| llama-250m (251M), ZeRO-3, 2 ranks | zero3_init_flag | loaded partitioned | before loading GiB "
              "rank 0 / 1 | at start GiB rank 0 / 1 | loading cost GiB rank 0 / 1 | private loading cost GiB rank 0 / 1 |"
              "\n|---|---|---|---|---|---|---|", flush=True)
        for source, source_args in (("checkpoint", ["--model_name_or_path", str(checkpoint)]),
                                    ("config", ["--config_name", "llama-250m"])):
            for init in ("false", "true"):
                r = runner.run(f"load-{source}-zero3-init-{init}", 3, source_args + ["--lora"], args.block_size, 1,
                               launcher_extra=["--zero3_init_flag", init])
                cost = [a - b for a, b in zip(r["start_mb"], r["before_load_mb"])]
                private = [a - b for a, b in zip(r["private_peak_load_mb"], r["private_before_load_mb"])]
                print(f"| from the {source} | {init} | {'yes' if r['loaded_partitioned'] else 'no'} | "
                      f"{gib(r['before_load_mb'])} | {gib(r['start_mb'])} | {gib(cost)} | {gib(private)} |", flush=True)
    if "long" in args.parts:
        print("\n| llama-60m, ZeRO-2, 1 x 2048 tokens | peak GiB rank 0 / 1 | tokens/s |\n|---|---|---|", flush=True)
        for ckpt in (False, True):
            r = runner.run(f"long-llama-60m-zero2{'-ckpt' if ckpt else ''}", 2,
                           ["--config_name", "llama-60m"] + (["--gradient_checkpointing"] if ckpt else []), 2048, 2)
            print(f"| activation checkpointing {'on' if ckpt else 'off'} | {gib(r['peak_mb'])} | "
                  f"{r['tokens_per_s']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
