"""A DeepSpeed ZeRO checkpoint resumed by another number of processes (ZeRO-1/2: any; ZeRO-3: fewer).

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
   (ZeRO-1/2: ``param_slice_mappings``, where each parameter's fragment lies in each rank's partition; ZeRO-3:
   every parameter split alone, ceil(numel / N) elements per rank, in the order of ``param_shapes``): the fp32
   weights and every state key whose tensor is a whole partition (``exp_avg``, ``exp_avg_sq``, ``x0``; any
   optimizer's). Per-tensor scalars (``step``, ``beta1_prod``), the param groups' scalars (``lr_scale``,
   ``path_cos``, ``index``, ...) and the hooked state are equal on every rank and taken from rank 0.
2. AdaptOpt's pending sums (its deferred statistics, docs/optimizer.md "One step late") are each rank's part of a
   sum that the next step all-reduces. They are totalled over the N writers here; the new run's rank 0 holds the
   total and the other ranks zeros, so the next step's all-reduce over M ranks gives the same total.
3. :func:`load_resharded`, after the engine has loaded the model alone (``load_optimizer_states=False``): each rank
   cuts its partition from the whole tensors with the engine's own map (ZeRO-1/2: each parameter's
   ``_hp_mapping``, which elements of the parameter this rank holds and where in its flat partition; ZeRO-3: each
   parameter's ``ds_tensor`` size), and loads the client optimizer's ``state_dict`` built as if this rank had
   written it (torch's ``load_state_dict``: its hooks restore the clipper and the learner), with the fp32 master
   weights (ZeRO-3: through DeepSpeed's loader of one rank's state, which also sets the model's partitions).

Each new rank reads all N shards: the whole optimizer state passes through each process's host memory once.
ZeRO-3 onto more processes (DeepSpeed loads each rank's own model-state file, which a new rank lacks) and ZeRO-0
bf16 (DeepSpeed's BF16_Optimizer, another layout) are refused before the model loads (adaptopt/checkpointing.py).
"""
from __future__ import annotations

import copy
import math
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
    found = [(int(m.group(2)), p) for p in folder.glob("*zero_pp_rank_*_optim_states.pt")
             if (m := _SHARD.match(p.name))]
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
    """A ZeRO checkpoint's optimizer state, whole: per param group, {name: whole flat tensor} for the fp32 weights
    and for each per-element state key, and the per-tensor scalars; the rest as rank 0 saved it, with the partial
    sums totalled."""

    stage: int  # 1 and 2 share a layout; 3 has its own
    written_by: int
    fp32: list[dict[str, torch.Tensor]]
    tensors: list[dict[str, dict[str, torch.Tensor]]]
    scalars: list[dict]
    client: dict  # the client optimizer's state_dict() without "state"
    engine: dict  # DeepSpeed's own scalars (loss scale, clip value, version)


def consolidate(folder: Path, progress=lambda shards: shards) -> WholeState:
    """Joins the optimizer shards of ``folder`` (``<checkpoint>/pytorch_model``). ``progress`` wraps the shard
    list (a progress bar)."""
    shards = [torch.load(path, map_location="cpu", weights_only=False)["optimizer_state_dict"]
              for path in progress(optimizer_shards(folder))]
    first, world = shards[0], len(shards)
    if "fp32_flat_groups" in first:  # ZeRO-3: one flat partition per sub-group
        stage, clients = 3, [saved["optimizer_state_dict"] for saved in shards]
        flats = [saved["fp32_flat_groups"] for saved in shards]
        sizes = [[flat.numel() for flat in saved] for saved in flats]
        # every parameter is split alone: ceil(numel / N) elements per rank, the last rank's padded
        shapes = torch.load(folder / "zero_pp_rank_0_mp_rank_00_model_states.pt", map_location="cpu",
                            weights_only=False)["param_shapes"]

        def fragments(rank: int, k: int) -> dict[str, tuple[int, int]]:
            found, offset = {}, 0
            for name, shape in shapes[k].items():
                numel = math.prod(shape)
                part = -(-numel // world)
                found[name] = (offset, max(0, min(part, numel - rank * part)))
                offset += part
            return found
    else:  # ZeRO-1/2: one flat partition per param group
        if not isinstance(first.get("base_optimizer_state"), dict) or "param_slice_mappings" not in first:
            raise ValueError(f"{folder}: not a ZeRO checkpoint with its optimizer's whole state_dict (DeepSpeed's "
                             "elastic_checkpoint layout keeps no param groups): cannot be resharded")
        stage, clients = 2, [saved["base_optimizer_state"] for saved in shards]
        flats = [saved["single_partition_of_fp32_groups"] for saved in shards]  # without the last rank's padding
        sizes = [[flat.numel() + pad for flat, pad in zip(saved["single_partition_of_fp32_groups"],
                                                           saved["group_paddings"])] for saved in shards]

        def fragments(rank: int, k: int) -> dict[str, tuple[int, int]]:
            return {name: (f.start, f.numel) for name, f in shards[rank]["param_slice_mappings"][k].items()}

    def join(parts: list[torch.Tensor], k: int, into: dict) -> None:
        """Each parameter's pieces of flat partition k, in rank order (a parameter lies across ranks in order)."""
        pieces: dict[str, list[torch.Tensor]] = {}
        for rank, part in enumerate(parts):
            for name, (start, numel) in fragments(rank, k).items():
                pieces.setdefault(name, []).append(part.narrow(0, start, numel))
        into.update({name: torch.cat(p) for name, p in pieces.items()})

    groups = clients[0]["param_groups"]
    fp32, tensors, scalars = [{} for _ in groups], [{} for _ in groups], [{} for _ in groups]
    for g, group in enumerate(groups):
        for k in group["params"]:  # the flat partitions of this group (ZeRO-3: its sub-groups)
            join([flat[k] for flat in flats], k, fp32[g])
            states = [client["state"].get(k, {}) for client in clients]
            # a per-element tensor has the partition's size (padding included)
            per_element = [key for key in states[0]
                           if all(torch.is_tensor(s[key]) and s[key].dim() == 1 and s[key].numel() == size[k]
                                  for s, size in zip(states, sizes))]
            for key in per_element:
                join([s[key] for s in states], k, tensors[g].setdefault(key, {}))
            # equal on every rank and, under ZeRO-3, in every sub-group of the group (each steps once per update)
            scalars[g] = {key: value for key, value in states[0].items() if key not in per_element}
    client = {key: copy.deepcopy(value) for key, value in clients[0].items() if key != "state"}
    for i, group in enumerate(client["param_groups"]):
        for key in GROUP_PARTIAL_SUMS:
            group[key] = _total([c["param_groups"][i].get(key) for c in clients])
    for hook_key, keys in HOOKED_PARTIAL_SUMS.items():
        if hook_key in client:
            for key in keys:
                client[hook_key][key] = _total([c[hook_key].get(key) for c in clients])
    engine = {key: value for key, value in first.items() if key not in (
        "base_optimizer_state", "optimizer_state_dict", "single_partition_of_fp32_groups", "fp32_flat_groups",
        "param_slice_mappings")}
    return WholeState(stage, world, fp32, tensors, scalars, client, engine)


def _total(parts: list):
    """The sum of the ranks' partial sums (lists of floats), in rank order; None when nothing was pending."""
    if parts[0] is None:
        return None
    return [sum(column) for column in zip(*parts)]


def _zeroed(value):
    return None if value is None else [0.0] * len(value)


def load_resharded(engine, whole: WholeState) -> None:
    """Puts ``whole`` into a ZeRO engine of the checkpoint's stage and any world size whose model is already loaded
    (every rank calls it)."""
    import deepspeed.comm as dist

    zero = engine.optimizer
    stage3 = hasattr(zero, "fp32_partitioned_groups_flat")
    if (whole.stage == 3) != stage3 or not (stage3 or hasattr(zero, "single_partition_of_fp32_groups")):
        raise ValueError(f"the checkpoint holds a ZeRO-{'3' if whole.stage == 3 else '1/2'} optimizer state, but this "
                         f"run's DeepSpeed optimizer is {type(zero).__name__}: resume with the ZeRO stage that "
                         "wrote it")
    if len(zero.optimizer.param_groups) != len(whole.fp32):
        raise ValueError(f"the checkpoint has {len(whole.fp32)} param groups, this run's optimizer "
                         f"{len(zero.optimizer.param_groups)}: resume with the flags that wrote it")
    rank = dist.get_rank(group=zero.dp_process_group)
    client = copy.deepcopy(whole.client)
    if rank != 0:  # the total is rank 0's part; the others add nothing to the next all-reduce
        for group in client["param_groups"]:
            for key in GROUP_PARTIAL_SUMS:
                group[key] = _zeroed(group.get(key))
        for hook_key, keys in HOOKED_PARTIAL_SUMS.items():
            for key in keys:
                if hook_key in client:
                    client[hook_key][key] = _zeroed(client[hook_key].get(key))

    def check(name: str, named: dict, numel: int) -> torch.Tensor:
        if named[name].numel() != numel:
            raise ValueError(f"{name}: {named[name].numel()} elements in the checkpoint, {numel} in this run's "
                             "model: resume with the model that wrote it")
        return named[name]

    if stage3:
        _load_stage3(zero, whole, client, rank, check)
        return
    state = {}
    for i, flat in enumerate(zero.single_partition_of_fp32_groups):
        def cut(named: dict[str, torch.Tensor]) -> torch.Tensor:
            """This rank's flat partition of group i, from whole per-parameter tensors (padding left at zero)."""
            partition = torch.zeros_like(flat)
            for lp in zero.bit16_groups[i]:
                mapping = lp._hp_mapping
                if mapping is None:  # no element of this parameter lies in this rank's partition
                    continue
                source, target = mapping.lp_fragment_address, mapping.hp_fragment_address
                whole_param = check(zero.param_names[lp], named, lp.numel())
                partition.narrow(0, target.start, target.numel).copy_(whole_param.narrow(0, source.start, source.numel))
            return partition

        flat.data.copy_(cut(whole.fp32[i]))
        state[i] = {**copy.deepcopy(whole.scalars[i]), **{key: cut(named) for key, named in whole.tensors[i].items()}}
    zero._load_global_state(whole.engine)  # loss scale and its state, as DeepSpeed's own loaders do first
    zero.optimizer.load_state_dict({"state": state, **client})
    zero._link_all_hp_params()  # the parameters' fragment views must point at the state tensors just loaded


def _load_stage3(zero, whole: WholeState, client: dict, rank: int, check) -> None:
    """ZeRO-3: each parameter is split alone, ``ds_tensor.numel()`` elements per rank; a sub-group's flat partition
    is its parameters' partitions in order. DeepSpeed's own loader of one rank's state (``_rigid_load_state_dict``)
    then sets the optimizer state, the fp32 partitions and the model's partitions from them."""
    flats, state = [], {}
    for group in client["param_groups"]:
        group["params"] = []
    for sub_group, params in enumerate(zero.fp16_groups):
        g = zero.sub_group_to_group_id[sub_group]

        def cut(named: dict[str, torch.Tensor]) -> torch.Tensor:
            partition = torch.zeros_like(zero.fp32_partitioned_groups_flat[sub_group], device="cpu")
            offset = 0
            for p in params:
                part = p.ds_tensor.numel()
                whole_param = check(zero.param_names[p], named, p.ds_numel)
                piece = whole_param[rank * part:min((rank + 1) * part, whole_param.numel())]
                partition.narrow(0, offset, piece.numel()).copy_(piece)
                offset += part
            return partition

        flats.append(cut(whole.fp32[g]))
        client["param_groups"][g]["params"].append(sub_group)  # as _set_fp32_optimizer_param_groups orders them
        state[sub_group] = {**copy.deepcopy(whole.scalars[g]),
                            **{key: cut(named) for key, named in whole.tensors[g].items()}}
    zero._rigid_load_state_dict({**whole.engine, "optimizer_state_dict": {"state": state, **client},
                                 "fp32_flat_groups": flats})
