"""A DeepSpeed ZeRO-1/2 checkpoint resumed by another number of processes.

DeepSpeed's engine loads a ZeRO checkpoint only at the data-parallel world size that wrote it (``The checkpoint
being loaded used a DP world size of N but the current world size is M``). Its universal checkpoint
(``deepspeed.checkpoint.ds_to_universal``, 0.19) is no way out for AdaptOpt: its extraction and its merge copy only
``fp32``, ``exp_avg`` and ``exp_avg_sq`` (Mechanic's per-element start point ``x0`` would be lost), its loader keeps
only the param groups of the client optimizer's state, not what rides in its ``state_dict()`` through hooks (the
clipper, the Mechanic learner: adaptopt/clip.py ``attach_state``), and its ZeRO-3 loader gives every param group
group 0's settings.

So the resume does what DeepSpeed's zero_to_fp32 does for the weights, for every per-element state tensor, and
lets each new rank cut its own partition:

1. :func:`consolidate` reads the N ranks' optimizer shards and joins each flat partition tensor by parameter name
   (``param_slice_mappings``: where each parameter's fragment lies in each rank's partition; a parameter split
   between ranks lies in rank order): the fp32 weights and every state key whose tensor is a whole partition
   (``exp_avg``, ``exp_avg_sq``, ``x0``; any optimizer's). Per-tensor scalars (``step``, ``beta1_prod``), the param
   groups' scalars (``lr_scale``, ``path_cos``, ``index``, ...) and the hooked state are equal on every rank and
   taken from rank 0.
2. AdaptOpt's pending sums (its deferred statistics, docs/optimizer.md "One step late") are each rank's part of a
   sum that the next step all-reduces. They are totalled over the N writers here; the new run's rank 0 holds the
   total and the other ranks zeros, so the next step's all-reduce over M ranks gives the same total.
3. :func:`load_resharded`, after the engine has loaded the model alone (``load_optimizer_states=False``): each rank
   cuts its partition from the whole tensors with the engine's own map (each parameter's ``_hp_mapping``: which
   elements of the parameter this rank holds, and where in its flat partition), sets its fp32 master weights,
   and loads the client optimizer's ``state_dict`` built as if this rank had written it (torch's
   ``load_state_dict``: its hooks restore the clipper and the learner).

Each new rank reads all N shards: the whole optimizer state passes through each process's host memory once.
ZeRO-3 (parameters partitioned too, in sub-groups whose split depends on the world size) and ZeRO-0 bf16 (DeepSpeed's
BF16_Optimizer, another layout) are refused before the model loads (adaptopt/checkpointing.py).
"""
from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from pathlib import Path

import torch

# Values that are one rank's part of a sum over shards, reduced by the next step (adaptopt/optim.py, mechanic.py):
# in each param group, and in the state a hook stores under the key given.
GROUP_PARTIAL_SUMS = ("pending_stats",)
HOOKED_PARTIAL_SUMS = {"lr_tuner": ("pending",)}

_SHARD = re.compile(r"^(bf16_)?zero_pp_rank_(\d+)_mp_rank_00_optim_states\.pt$")


def optimizer_shards(folder: Path) -> list[Path]:
    """The ZeRO optimizer shard files of a DeepSpeed checkpoint folder (``<checkpoint>/pytorch_model``), by rank."""
    found = [(int(m.group(2)), p) for p in folder.glob("*zero_pp_rank_*_optim_states.pt") if (m := _SHARD.match(p.name))]
    return [p for _, p in sorted(found)]


def zero_layout(folder: Path) -> tuple[int, bool]:
    """(ZeRO stage, bf16) of the run that wrote ``folder``'s shards, from the config DeepSpeed saved with rank 0's
    (read memory-mapped: only the config is touched)."""
    saved = torch.load(optimizer_shards(folder)[0], map_location="cpu", weights_only=False, mmap=True)
    config = saved.get("ds_config", {})
    bf16 = str(config.get("bf16", {}).get("enabled", False)).lower() == "true"
    return int(config.get("zero_optimization", {}).get("stage", 0)), bf16


@dataclass
class WholeState:
    """A ZeRO-1/2 checkpoint's optimizer state, whole: per param group, {name: whole flat tensor} for the fp32
    weights and each per-element state key, and the scalars; the rest as rank 0 saved it, partial sums totalled."""

    written_by: int
    fp32: list[dict[str, torch.Tensor]]
    tensors: list[dict[str, dict[str, torch.Tensor]]]
    scalars: list[dict]
    client: dict  # the client optimizer's state_dict() without "state"
    engine: dict  # DeepSpeed's own scalars (loss scale, clip value, version) for its _load_global_state


def consolidate(folder: Path, progress=lambda shards: shards) -> WholeState:
    """Joins the optimizer shards of ``folder`` (``<checkpoint>/pytorch_model``). ``progress`` wraps the shard
    list (a progress bar)."""
    shards = []
    for path in progress(optimizer_shards(folder)):
        saved = torch.load(path, map_location="cpu", weights_only=False)["optimizer_state_dict"]
        if not isinstance(saved.get("base_optimizer_state"), dict) or "param_slice_mappings" not in saved:
            raise ValueError(f"{path}: not a ZeRO-1/2 checkpoint with its optimizer's whole state_dict (DeepSpeed's "
                             "elastic_checkpoint layout keeps no param groups): cannot be resharded")
        shards.append(saved)
    first = shards[0]
    fp32, tensors, scalars = [], [], []
    for i, mapping in enumerate(first["param_slice_mappings"]):
        def join(parts: list[torch.Tensor]) -> dict[str, torch.Tensor]:
            pieces: dict[str, list[torch.Tensor]] = {}
            for part, saved in zip(parts, shards):
                for name, fragment in saved["param_slice_mappings"][i].items():
                    pieces.setdefault(name, []).append(part.narrow(0, fragment.start, fragment.numel))
            return {name: torch.cat(p) for name, p in pieces.items()}

        fp32.append(join([saved["single_partition_of_fp32_groups"][i] for saved in shards]))
        # A per-element tensor has the partition's size (padding included: the last rank's is padded)
        sizes = [saved["single_partition_of_fp32_groups"][i].numel() + saved["group_paddings"][i] for saved in shards]
        states = [saved["base_optimizer_state"]["state"].get(i, {}) for saved in shards]
        per_element = [key for key, value in states[0].items()
                       if all(torch.is_tensor(s[key]) and s[key].dim() == 1 and s[key].numel() == size
                              for s, size in zip(states, sizes))]
        tensors.append({key: join([s[key] for s in states]) for key in per_element})
        scalars.append({key: value for key, value in states[0].items() if key not in per_element})
    client = {key: copy.deepcopy(value) for key, value in first["base_optimizer_state"].items() if key != "state"}
    for i, group in enumerate(client["param_groups"]):
        for key in GROUP_PARTIAL_SUMS:
            group[key] = _total([saved["base_optimizer_state"]["param_groups"][i].get(key) for saved in shards])
    for hook_key, keys in HOOKED_PARTIAL_SUMS.items():
        if hook_key in client:
            for key in keys:
                client[hook_key][key] = _total([saved["base_optimizer_state"][hook_key].get(key) for saved in shards])
    engine = {key: value for key, value in first.items()
              if key not in ("base_optimizer_state", "single_partition_of_fp32_groups", "param_slice_mappings")}
    return WholeState(len(shards), fp32, tensors, scalars, client, engine)


def _total(parts: list):
    """The sum of the ranks' partial sums (lists of floats), in rank order; None when nothing was pending."""
    if parts[0] is None:
        return None
    return [sum(column) for column in zip(*parts)]


def _zeroed(value):
    return None if value is None else [0.0] * len(value)


def load_resharded(engine, whole: WholeState) -> None:
    """Puts ``whole`` into a ZeRO-1/2 engine of any world size whose model is already loaded (every rank calls it)."""
    import deepspeed.comm as dist

    zero = engine.optimizer
    if not hasattr(zero, "single_partition_of_fp32_groups"):
        raise ValueError(f"the checkpoint holds a ZeRO-1/2 optimizer state, but this run's DeepSpeed optimizer is "
                         f"{type(zero).__name__}: resume with the ZeRO stage that wrote it")
    if len(zero.single_partition_of_fp32_groups) != len(whole.fp32):
        raise ValueError(f"the checkpoint has {len(whole.fp32)} param groups, this run's optimizer "
                         f"{len(zero.single_partition_of_fp32_groups)}: resume with the flags that wrote it")
    first_rank = dist.get_rank(group=zero.dp_process_group) == 0
    state = {}
    for i, flat in enumerate(zero.single_partition_of_fp32_groups):
        def cut(named: dict[str, torch.Tensor]) -> torch.Tensor:
            """This rank's flat partition of group i, from whole per-parameter tensors (padding left at zero)."""
            partition = torch.zeros_like(flat)
            for lp in zero.bit16_groups[i]:
                mapping = lp._hp_mapping
                if mapping is None:  # no element of this parameter lies in this rank's partition
                    continue
                name = zero.param_names[lp]
                if named[name].numel() != lp.numel():
                    raise ValueError(f"{name}: {named[name].numel()} elements in the checkpoint, {lp.numel()} in "
                                     "this run's model: resume with the model that wrote it")
                source, target = mapping.lp_fragment_address, mapping.hp_fragment_address
                partition.narrow(0, target.start, target.numel).copy_(named[name].narrow(0, source.start, source.numel))
            return partition

        flat.data.copy_(cut(whole.fp32[i]))
        state[i] = {**copy.deepcopy(whole.scalars[i]), **{key: cut(named) for key, named in whole.tensors[i].items()}}
    client = copy.deepcopy(whole.client)
    if not first_rank:  # the total is rank 0's part; the others add nothing to the next all-reduce
        for group in client["param_groups"]:
            for key in GROUP_PARTIAL_SUMS:
                group[key] = _zeroed(group.get(key))
        for hook_key, keys in HOOKED_PARTIAL_SUMS.items():
            for key in keys:
                if hook_key in client:
                    client[hook_key][key] = _zeroed(client[hook_key].get(key))
    zero._load_global_state(whole.engine)  # loss scale and its state, as DeepSpeed's own loaders do first
    zero.optimizer.load_state_dict({"state": state, **client})
    zero._link_all_hp_params()  # the parameters' fragment views must point at the state tensors just loaded
