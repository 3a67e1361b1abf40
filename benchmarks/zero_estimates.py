"""DeepSpeed's own "on paper" memory estimates for our ZeRO configs at LLaMA-2-7B and -70B size.

    python benchmarks/zero_estimates.py
    python benchmarks/zero_estimates.py --nodes 1 4 --gpus-per-node 8 --raw   # also DeepSpeed's own printout

No launcher, no model, no accelerator needed: the figures come from DeepSpeed's estimator functions,
``deepspeed.runtime.zero.stage_1_and_2.estimate_zero2_model_states_mem_needs_all_cold(total_params,
num_gpus_per_node, num_nodes, additional_buffer_factor=1.5)`` and
``deepspeed.runtime.zero.stage3.estimate_zero3_model_states_mem_needs_all_cold(total_params,
largest_layer_params, num_gpus_per_node, num_nodes, additional_buffer_factor=1.5)``. Those two only print,
so this script calls the functions they call for each row (``estimate_zero2_model_states_mem_needs`` and
``estimate_zero3_model_states_mem_needs``), with the options that match each ds_configs/ file:

- zero2.json:          ZeRO-2, nothing offloaded;
- zero2_offload.json:  ZeRO-2, offload_optimizer=cpu;
- zero3.json:          ZeRO-3, nothing offloaded;
- zero3_offload.json:  ZeRO-3, offload_optimizer=cpu and offload_param=cpu.

For ZeRO-3 the estimate depends on whether the model is built under ``deepspeed.zero.Init`` (zero_init:
accelerate's ``zero3_init_flag``, transformers' from_pretrained under a ZeRO-3 config); both are printed.
``--raw`` also prints the estimators' own output, to check the table against.

What the estimates cover and assume (DeepSpeed's model, not ours): model states only (parameters,
gradients, optimizer states), no activations, buffers or fragmentation; 16-bit parameters and gradients
with fp32 master weights and two fp32 Adam moments (8 B/param). AdaptOpt's per-parameter state is the
same two fp32 moments (docs/performance.md, "Optimizer state memory"), so the estimates hold for it.
"per GPU" is memory on each GPU; "per node CPU" is host memory on each node (the estimator's "per CPU").
GiB = 2**30 bytes, as DeepSpeed prints "GB".

Sizes (LLaMA-2): 7B has 6.74e9 parameters and its largest layer is the 32000 x 4096 token embedding;
70B has 68.98e9 and a 32000 x 8192 embedding.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")  # no CUDA probing: the estimators are pure arithmetic

MODELS = {
    "LLaMA-2-7B": dict(total_params=6.74e9, largest_layer_params=32000 * 4096),
    "LLaMA-2-70B": dict(total_params=68.98e9, largest_layer_params=32000 * 8192),
}
CONFIGS = {  # ds_configs/ file -> (stage, offload_optimizer, offload_param)
    "zero2.json": (2, False, False),
    "zero2_offload.json": (2, True, False),
    "zero3.json": (3, False, False),
    "zero3_offload.json": (3, True, True),
}
GIB = 2**30


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node (default %(default)s)")
    parser.add_argument("--nodes", type=int, nargs="+", default=[1, 4], help="node counts (default: 1 4)")
    parser.add_argument("--buffer-factor", type=float, default=1.5,
                        help="DeepSpeed's additional_buffer_factor for CPU memory (default %(default)s, theirs)")
    parser.add_argument("--raw", action="store_true", help="also print the *_all_cold functions' own output")
    parser.add_argument("--json", default=None, help="write the rows to this JSON file")
    return parser.parse_args(argv)


def estimate(config: str, total_params: float, largest_layer_params: int, gpus: int, nodes: int, factor: float):
    """(per-GPU bytes, per-node CPU bytes with zero_init, per-node CPU bytes without) for one config."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    stage, offload_optimizer, offload_param = CONFIGS[config]
    if stage == 2:
        cpu, gpu = estimate_zero2_model_states_mem_needs(total_params, gpus, nodes, cpu_offload=offload_optimizer,
                                                         additional_buffer_factor=factor)
        return gpu, cpu, cpu
    rows = []
    for zero_init in (True, False):
        cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
            total_params, largest_layer_params, gpus, nodes, cpu_offload=offload_optimizer,
            cpu_offload_params=offload_param, zero_init=zero_init, additional_buffer_factor=factor)
        rows.append((gpu, cpu))
    assert rows[0][0] == rows[1][0]  # zero_init changes only the CPU figure
    return rows[0][0], rows[0][1], rows[1][1]


def main(argv=None) -> None:
    args = parse_args(argv)
    logging.disable(logging.WARNING)  # the accelerator-detection warning
    import deepspeed
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs_all_cold
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs_all_cold

    print(f"DeepSpeed {deepspeed.__version__} model-state estimates (params + grads + optimizer states only), "
          f"{args.gpus_per_node} GPUs per node, additional_buffer_factor {args.buffer_factor}; GiB\n")
    header = f"{'model':<12}{'nodes':>6}{'GPUs':>6}  {'config':<20}{'per GPU':>9}{'node CPU, zero_init':>21}{'node CPU, no zero_init':>24}"
    print(header)
    print("-" * len(header))
    rows = []
    for model, size in MODELS.items():
        for nodes in args.nodes:
            for config in CONFIGS:
                gpu, cpu_init, cpu_no_init = estimate(config, size["total_params"], size["largest_layer_params"],
                                                      args.gpus_per_node, nodes, args.buffer_factor)
                stage = CONFIGS[config][0]
                no_init = f"{cpu_no_init / GIB:24.1f}" if stage == 3 else f"{'(same)':>24}"
                print(f"{model:<12}{nodes:>6}{nodes * args.gpus_per_node:>6}  {config:<20}{gpu / GIB:9.1f}"
                      f"{cpu_init / GIB:21.1f}{no_init}")
                rows.append(dict(model=model, nodes=nodes, gpus_per_node=args.gpus_per_node, config=config, **size,
                                 per_gpu_bytes=gpu, per_node_cpu_bytes_zero_init=cpu_init,
                                 per_node_cpu_bytes_no_zero_init=cpu_no_init))
        print()
    print("ZeRO-2 has no zero_init variant: its CPU figure is the same either way ('(same)').")

    if args.raw:
        for model, size in MODELS.items():
            for nodes in args.nodes:
                print(f"\n==== {model}, {nodes} node(s): DeepSpeed's own printout")
                buf = io.StringIO()
                with contextlib.redirect_stdout(buf):
                    estimate_zero2_model_states_mem_needs_all_cold(
                        int(size["total_params"]), args.gpus_per_node, nodes, args.buffer_factor)
                    estimate_zero3_model_states_mem_needs_all_cold(
                        int(size["total_params"]), size["largest_layer_params"], args.gpus_per_node, nodes,
                        args.buffer_factor)
                print(buf.getvalue().rstrip())
    if args.json:
        Path(args.json).write_text(json.dumps(dict(deepspeed=deepspeed.__version__, rows=rows), indent=1))
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
