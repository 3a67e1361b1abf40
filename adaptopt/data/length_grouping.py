"""Length-grouped training batches: transformers' ``LengthGroupedSampler`` (what the Trainer's
``group_by_length=True`` uses) with its order a function of (seed, epoch), so that runs repeat and resume.

Why: with dynamic padding a batch is as long as its longest example. Random batches of SST-2 sentences carry
about 3x the tokens of the sentences themselves; grouping by length brings that to about 1.05x, and the model's
forward and backward shrink with it. transformers' grouping keeps the randomness that training needs: a seeded
permutation, cut into mega-batches of up to 50 batches, each sorted by length (longest first), the batch holding
the longest example moved to the front (so that running out of memory shows at the first step).

Resume and sharding: accelerate's ``DataLoaderShard.set_epoch`` reaches this sampler (also through
``skip_first_batches``' ``SkipBatchSampler`` and, with several processes, ``BatchSamplerShard``, which hand every
process every N-th batch of the one order). Each process draws the same order from (seed, epoch) alone, so a run
resumed mid-epoch (adaptopt/checkpointing.py ``resume_position``) continues with the batches it would have had, at
any number of DDP processes.
"""
from __future__ import annotations

import argparse

import torch
from transformers.trainer_pt_utils import LengthGroupedSampler


class SeededLengthGroupedSampler(LengthGroupedSampler):
    """``LengthGroupedSampler`` whose permutation is drawn from ``seed + epoch`` (``set_epoch``), not from a
    generator that advances from epoch to epoch (which a resumed run could not replay).

    ``lengths``: tokens per example; ``batch_size``: the batch each process takes (the per-device batch)."""

    def __init__(self, lengths: list[int], batch_size: int, seed: int):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        super().__init__(batch_size, lengths=list(lengths), generator=torch.Generator())
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        self.generator.manual_seed(self.seed + self.epoch)
        return super().__iter__()


def padded_tokens_ratio(lengths: list[int], batches: list[list[int]]) -> float:
    """Tokens the batches hold once padded to their longest example, over the examples' own tokens (1.0: no
    padding). The measure grouping by length lowers."""
    padded = sum(max(lengths[i] for i in batch) * len(batch) for batch in batches)
    return padded / sum(lengths[i] for batch in batches for i in batch)


def add_group_by_length_args(group: argparse._ArgumentGroup, default: bool) -> None:
    """--group_by_length / --no_group_by_length, ``default`` on or off (the recipe's --help says which)."""
    state = "on" if default else "off"
    group.add_argument("--group_by_length", dest="group_by_length", action="store_true", default=default,
                       help="training batches of examples of similar length, in a seeded random order (transformers' "
                            "LengthGroupedSampler, as the Trainer's group_by_length): less padding, faster steps. "
                            f"Default: {state}")
    group.add_argument("--no_group_by_length", dest="group_by_length", action="store_false",
                       help="training batches drawn uniformly at random (HF Trainer's default, and what the studies "
                            "in studies/ run)")


def groups_by_length(args: argparse.Namespace) -> bool:
    """Whether the run groups its batches: asked, and not padded to one length (where grouping changes nothing)."""
    return args.group_by_length and not getattr(args, "pad_to_max_length", False)


def training_order(args: argparse.Namespace, dataset) -> dict:
    """The training DataLoader's order arguments: the seeded length-grouping sampler (lengths from the tokenized
    ``input_ids``), or ``shuffle=True`` (which accelerate turns into its seedable sampler)."""
    if not groups_by_length(args):
        return dict(shuffle=True)
    lengths = [len(ids) for ids in dataset["input_ids"]]
    return dict(sampler=SeededLengthGroupedSampler(lengths, args.per_device_train_batch_size, args.seed))
