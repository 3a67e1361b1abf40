"""Pre-flight check of a DeepSpeed config (and an accelerate config) against a recipe's settings.

    python -m adaptopt.config_check --ds_config ds_configs/zero2.json --accelerate_config launch/deepspeed_single_node.yaml \\
        [--per_device_train_batch_size 32 --gradient_accumulation_steps 1 --max_grad_norm 1.0 --num_processes 2]

The recipes run the same checks at start-up, before any process group exists, on the config that
``accelerate launch`` hands them. So a mistake stops every rank with one message that says what is
wrong and how to fix it. DeepSpeed would otherwise fail later with a less clear error, or accept the
config silently. Examples: a misspelt top-level key is ignored, and optimizer offload with a client
optimizer makes accelerate swap in DeepSpeedCPUAdam.

Values the recipe owns (micro batch, accumulation, clipping) belong in the recipe's flags. In the JSON
they should be ``"auto"``. A number there must equal the recipe's value, so one setting never has two
different values.
"""
from __future__ import annotations

import argparse
import difflib
import json
import sys
from dataclasses import dataclass
from pathlib import Path


class ConfigError(ValueError):
    """A config that cannot work, with the fix in the message."""


@dataclass
class RecipeSettings:
    """The recipe's side of the values DeepSpeed also has keys for."""

    per_device_train_batch_size: int
    gradient_accumulation_steps: int
    max_grad_norm: float | None  # None or 0: no clipping
    world_size: int | None = None  # total processes over all machines, when known


# DeepSpeed ignores unknown top-level keys, so a typo there silently changes nothing. Sections and keys
# from DeepSpeed's config documentation (deepspeed.ai/docs/config-json); extend when DeepSpeed adds one.
TOP_LEVEL_KEYS = {
    "train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping",
    "optimizer", "scheduler", "fp16", "bf16", "bfloat16", "amp", "torch_autocast", "zero_optimization",
    "zero_allow_untested_optimizer", "zero_force_ds_cpu_optimizer", "prescale_gradients",
    "gradient_predivide_factor", "communication_data_type", "seq_parallel_communication_data_type",
    "steps_per_print", "wall_clock_breakdown", "dump_state", "memory_breakdown", "disable_allgather",
    "dataloader_drop_last", "activation_checkpointing", "flops_profiler", "comms_logger", "tensorboard",
    "wandb", "csv_monitor", "comet", "aio", "autotuning", "elasticity", "curriculum_learning",
    "data_efficiency", "compression_training", "checkpoint", "data_types", "sparse_attention", "pipeline",
    "nebula", "weight_quantization", "hybrid_engine", "tensor_parallel", "compile", "timers",
    "graph_harvesting", "use_data_before_expert_parallelism", "use_node_local_storage", "load_universal",
    "zero_quantized_weights", "gradient_allreduce_op", "sequence_parallel_size", "eigenvalue",
    "quantize_training", "progressive_layer_drop", "mics_shard_size", "mics_hierarchical_params_gather",
    "expert_parallel", "zenflow", "disable_python_gc",
}
RECIPE_OWNED = {
    "train_micro_batch_size_per_gpu": "--per_device_train_batch_size",
    "gradient_accumulation_steps": "--gradient_accumulation_steps",
    "gradient_clipping": "--max_grad_norm",
}


def _pydantic_keys(model) -> set[str]:
    keys = set()
    for name, field in model.model_fields.items():
        keys.add(name)
        if field.alias:
            keys.add(field.alias)
    return keys


def _section_keys() -> dict[str, set[str]]:
    """Known keys of the nested sections, from DeepSpeed's own (pydantic) config models."""
    from deepspeed.runtime.precision_config import DeepSpeedBF16Config, DeepSpeedFP16Config
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
    from deepspeed.runtime.zero.offload_config import (
        DeepSpeedZeroOffloadOptimizerConfig,
        DeepSpeedZeroOffloadParamConfig,
    )

    return {
        "zero_optimization": _pydantic_keys(DeepSpeedZeroConfig),
        "zero_optimization.offload_optimizer": _pydantic_keys(DeepSpeedZeroOffloadOptimizerConfig),
        "zero_optimization.offload_param": _pydantic_keys(DeepSpeedZeroOffloadParamConfig),
        "fp16": _pydantic_keys(DeepSpeedFP16Config) | {"auto_cast", "loss_scale", "initial_scale_power"},
        "bf16": _pydantic_keys(DeepSpeedBF16Config),
    }


def load_json(path: str | Path) -> dict:
    try:
        text = Path(path).read_text()
    except OSError as err:
        raise ConfigError(f"DeepSpeed config {path}: cannot read it ({err.strerror})") from None
    try:
        config = json.loads(text)
    except json.JSONDecodeError as err:
        raise ConfigError(
            f"DeepSpeed config {path}: invalid JSON at line {err.lineno}, column {err.colno}: {err.msg} "
            "(JSON allows no comments and no trailing commas; strings need double quotes)"
        ) from None
    if not isinstance(config, dict):
        raise ConfigError(f"DeepSpeed config {path}: the top level must be a JSON object {{...}}")
    return config


def _unknown(where: str, keys, known: set[str]) -> list[str]:
    problems = []
    for key in keys:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else "; see deepspeed.ai/docs/config-json"
            problems.append(f"unknown key {where}{key!r}{hint}")
    return problems


def _is_true(value) -> bool:
    return value is True or str(value).lower() == "true"


def _number(value):
    return None if value == "auto" or value is None else value


def check_ds_config(config: dict, recipe: RecipeSettings | None = None, *, name: str = "DeepSpeed config") -> None:
    """Raises ConfigError listing every problem found in ``config`` (a parsed DeepSpeed JSON)."""
    problems = _unknown("", config, TOP_LEVEL_KEYS)
    sections = _section_keys()
    for section, known in sections.items():
        parent, _, child = section.partition(".")
        node = config.get(parent)
        if child and isinstance(node, dict):
            node = node.get(child)
        if isinstance(node, dict):
            problems += _unknown(f"in {section!r}: ", node, known)

    zero = config.get("zero_optimization", {})
    if not isinstance(zero, dict):
        problems.append('"zero_optimization" must be an object such as {"stage": 2}')
        zero = {}
    stage = zero.get("stage", 0)
    if stage not in (0, 1, 2, 3):
        problems.append(f'zero_optimization.stage is {stage!r}; use 0, 1, 2 or 3')
    offload_opt = (zero.get("offload_optimizer") or {}).get("device", "none")
    offload_param = (zero.get("offload_param") or {}).get("device", "none")
    if offload_param not in (None, "none") and stage != 3:
        problems.append(f"zero_optimization.offload_param needs stage 3 (this config has stage {stage}); "
                        "use ds_configs/zero3_offload.json or remove offload_param")
    if offload_opt not in (None, "none"):
        if stage not in (1, 2, 3):
            problems.append(f"zero_optimization.offload_optimizer needs stage 1, 2 or 3 (this config has stage {stage})")
        if _is_true(config.get("zero_force_ds_cpu_optimizer", True)):
            problems.append('optimizer offload with the recipe\'s optimizer needs "zero_force_ds_cpu_optimizer": false '
                            "(otherwise DeepSpeed refuses it, or accelerate silently swaps in DeepSpeedCPUAdam)")

    if _is_true((config.get("fp16") or {}).get("enabled")) and _is_true((config.get("bf16") or {}).get("enabled")):
        problems.append('fp16 and bf16 are both enabled; set one "enabled" to false, or both to "auto" and '
                        "choose with accelerate launch --mixed_precision fp16|bf16")
    for section in ("optimizer", "scheduler"):
        if section in config:
            problems.append(f'remove the "{section}" section: the recipe builds the {section} '
                            f"(--optimizer/--lr_scheduler), so one setting lives in one place")

    if recipe is not None:
        owned = {
            "train_micro_batch_size_per_gpu": recipe.per_device_train_batch_size,
            "gradient_accumulation_steps": recipe.gradient_accumulation_steps,
            "gradient_clipping": float(recipe.max_grad_norm or 0.0),
        }
        for key, ours in owned.items():
            theirs = _number(config.get(key))
            if theirs is not None and theirs != ours:
                problems.append(f'{key} is {theirs} in the JSON but the recipe has {RECIPE_OWNED[key]} {ours}; '
                                f'set "{key}": "auto" so the recipe\'s value is the only one')
        micro = _number(config.get("train_micro_batch_size_per_gpu")) or recipe.per_device_train_batch_size
        accum = _number(config.get("gradient_accumulation_steps")) or recipe.gradient_accumulation_steps
        total = _number(config.get("train_batch_size"))
        if total is not None and recipe.world_size is not None and total != micro * accum * recipe.world_size:
            problems.append(f"train_batch_size {total} != micro batch {micro} x accumulation {accum} x world size "
                            f"{recipe.world_size} = {micro * accum * recipe.world_size}; set it to \"auto\"")
    if problems:
        raise ConfigError(f"{name}:\n  - " + "\n  - ".join(problems))


def check_accelerate_config(path: str | Path) -> dict:
    """Checks an accelerate launch config (yaml) that uses DeepSpeed; returns it parsed."""
    import yaml

    try:
        config = yaml.safe_load(Path(path).read_text())
    except OSError as err:
        raise ConfigError(f"accelerate config {path}: cannot read it ({err.strerror})") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"accelerate config {path}: invalid YAML{where}: {getattr(err, 'problem', err)}") from None
    if not isinstance(config, dict):
        raise ConfigError(f"accelerate config {path}: expected a mapping of settings")
    problems = []
    if config.get("distributed_type") == "DEEPSPEED":
        ds = config.get("deepspeed_config") or {}
        if not ds.get("deepspeed_config_file"):
            problems.append("deepspeed_config.deepspeed_config_file is missing: point it at a JSON in ds_configs/")
        if config.get("mixed_precision") not in (None, "no"):
            problems.append(f"mixed_precision: {config['mixed_precision']} next to a DeepSpeed config file makes "
                            "accelerate raise; remove it and pass --mixed_precision to accelerate launch, or set "
                            'fp16/bf16 "enabled" in the JSON')
        if int(config.get("num_machines", 1)) > 1 and ds.get("deepspeed_multinode_launcher", "pdsh") != "standard":
            problems.append("several machines need deepspeed_config.deepspeed_multinode_launcher: standard (the "
                            "default, pdsh, needs passwordless ssh and a hostfile)")
    if problems:
        raise ConfigError(f"accelerate config {path}:\n  - " + "\n  - ".join(problems))
    return config


def precision_refusal(config: dict, mixed_precision: str | None) -> str | None:
    """Why this machine's DeepSpeed accelerator cannot train in the precision ``config`` asks for (its fp16/bf16
    "enabled", where "auto" follows accelerate's ``mixed_precision``), or None.

    DeepSpeed checks it only once the model is loaded (engine ``_do_sanity_check``: "Type fp16 is not supported
    on your device", in a traceback); on a CPU its accelerator offers fp16 only where oneDNN has fp16 kernels
    (``torch.ops.mkldnn._is_mkldnn_fp16_supported()``), which many CPUs lack."""
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    for dtype, supported in (("fp16", accelerator.is_fp16_supported), ("bf16", accelerator.is_bf16_supported)):
        enabled = (config.get(dtype) or {}).get("enabled", False)
        if not (_is_true(enabled) or (enabled == "auto" and mixed_precision == dtype)) or supported():
            continue
        other = "bf16" if dtype == "fp16" else "fp16"
        instead = (f"--mixed_precision {other} (supported here) or no" if
                   (accelerator.is_bf16_supported if other == "bf16" else accelerator.is_fp16_supported)()
                   else "--mixed_precision no")
        return (f"{dtype} under DeepSpeed: this machine's DeepSpeed accelerator ({accelerator.device_name()}) does "
                f"not support {dtype}" + (" (on a CPU it needs oneDNN's fp16 kernels, which this one lacks)"
                                          if accelerator.device_name() == "cpu" and dtype == "fp16" else "") +
                f". Use {instead}" + (f', or set "{dtype}": {{"enabled": false}} in the JSON' if _is_true(enabled)
                                      else ""))
    return None


def check_launch_env(recipe: RecipeSettings) -> None:
    """The check a recipe runs at start-up on what ``accelerate launch`` passed it in the environment."""
    import os

    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true":
        return
    path = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if path and path != "none":
        if recipe.world_size is None and os.environ.get("WORLD_SIZE"):
            recipe.world_size = int(os.environ["WORLD_SIZE"])
        config = load_json(path)
        check_ds_config(config, recipe, name=f"DeepSpeed config {path}")
        refusal = precision_refusal(config, os.environ.get("ACCELERATE_MIXED_PRECISION"))
        if refusal:
            raise ConfigError(refusal)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ds_config", required=True, help="DeepSpeed JSON config")
    parser.add_argument("--accelerate_config", default=None, help="accelerate launch yaml")
    parser.add_argument("--per_device_train_batch_size", type=int, default=32)
    parser.add_argument("--gradient_accumulation_steps", type=int, default=1)
    parser.add_argument("--max_grad_norm", type=float, default=1.0)
    parser.add_argument("--num_processes", type=int, default=None,
                        help="total processes over all machines (default: from the accelerate config)")
    args, _ = parser.parse_known_args(argv)  # the rest of a recipe command line may follow
    try:
        world = args.num_processes
        if args.accelerate_config:
            acc = check_accelerate_config(args.accelerate_config)
            world = world or acc.get("num_processes")
        recipe = RecipeSettings(args.per_device_train_batch_size, args.gradient_accumulation_steps,
                                args.max_grad_norm, world)
        check_ds_config(load_json(args.ds_config), recipe, name=f"DeepSpeed config {args.ds_config}")
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"ok: {args.ds_config}" + (f" with {args.accelerate_config}" if args.accelerate_config else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
