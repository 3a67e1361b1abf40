"""Where a partitioned (zero.Init) load's peak above its partition comes from, on CPU ranks (gloo).

    python -m torch.distributed.run --nproc_per_node 2 benchmarks/zero3_load_peak.py

Two measurements on each of 2 ranks, private (anonymous) resident memory sampled every millisecond
(adaptopt.memory.private_memory_mb):

1. The load: recipes/clm.py's llama-250m built from its config inside DeepSpeed's zero.Init (what the recipes
   do under a ZeRO-3 config), with glibc returning freed memory as the recipes have it
   (adaptopt.memory.freed_memory_returned). Every ``GatheredParameters`` block (transformers initialises and
   loads a partitioned model module by module inside one) labels the samples taken during it with the number
   of elements it gathers, so the peak is attributed to the gather it happened in.
2. One gather of the largest tensor (the 30,522 x 1,024 embedding, 31.3M elements) three ways: torch's
   ``all_gather_into_tensor`` (what DeepSpeed's ZeRO-3 calls), ``all_gather`` into views of one output, and one
   in-place ``broadcast`` per owner's chunk. The first two cost twice the output on gloo (a second, flat
   buffer); the broadcast writes in place.
"""
import argparse
import sys
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "recipes"))

from adaptopt.memory import PrivatePeak, freed_memory_returned, private_memory_mb  # noqa: E402


class LabelledPeak(PrivatePeak):
    """adaptopt.memory.PrivatePeak sampled every millisecond that also keeps the ``label`` current at its peak."""

    def __init__(self):
        super().__init__(interval=0.001)
        self.label, self.where = "start", None

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            now = private_memory_mb()
            if now is not None and now > self.peak_mb:
                self.peak_mb, self.where = now, self.label

    @property
    def rise_mb(self) -> float:
        return self.peak_mb - self.start_mb


def label_gathers(sampler: LabelledPeak):
    """Tags the samples taken inside each DeepSpeed GatheredParameters block with the elements it gathers."""
    from deepspeed.runtime.zero.partition_parameters import GatheredParameters

    enter, leave = GatheredParameters.__enter__, GatheredParameters.__exit__

    def labelled_enter(self):
        n = sum(getattr(p, "ds_numel", 0) for p in (self.params or []))
        sampler.label = f"gathering {n / 1e6:.1f}M elements"
        return enter(self)

    def labelled_exit(self, *exc):
        out = leave(self, *exc)
        sampler.label = "between gathers"
        return out

    GatheredParameters.__enter__, GatheredParameters.__exit__ = labelled_enter, labelled_exit


def load_peak(rank: int) -> None:
    import clm
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.integrations import HfDeepSpeedConfig

    tokenizer = AutoTokenizer.from_pretrained(clm.default_model_path())
    config = clm.model_config(argparse.Namespace(model_name_or_path=None, config_name="llama-250m",
                                                 trust_remote_code=False), tokenizer)
    # transformers holds this config by weak reference and builds inside zero.Init while it lives (what
    # accelerate registers for the recipes under a ZeRO-3 config)
    zero3 = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}}
    ds_config = HfDeepSpeedConfig(zero3)  # noqa: F841
    with LabelledPeak() as sampler:
        label_gathers(sampler)
        with freed_memory_returned():
            sampler.label = "building"
            model = AutoModelForCausalLM.from_config(config)
        sampler.label = "built"
    after = private_memory_mb() - sampler.start_mb
    partition = sum(p.ds_tensor.numel() * p.ds_tensor.element_size() for p in model.parameters()) / 2**20
    print(f"rank {rank} load: partition {partition:.0f} MiB; private memory after the load +{after:.0f} MiB, "
          f"peak +{sampler.rise_mb:.0f} MiB while {sampler.where}", flush=True)


def gather_peaks(rank: int, world: int, n: int = 30_522 * 1_024) -> None:
    n -= n % world
    shard = torch.randn(n // world)

    def into_tensor(out):
        dist.all_gather_into_tensor(out, shard)

    def into_views(out):
        dist.all_gather(list(out.chunk(world)), shard)

    def broadcasts(out):
        for owner, chunk in enumerate(out.chunk(world)):
            if owner == rank:
                chunk.copy_(shard)
            dist.broadcast(chunk, src=owner)

    for name, gather in (("all_gather_into_tensor", into_tensor), ("all_gather into views", into_views),
                         ("broadcast per owner", broadcasts)):
        dist.barrier()
        with LabelledPeak() as sampler:
            out = torch.zeros(n)
            gather(out)
        assert torch.equal(out.chunk(world)[rank], shard)
        print(f"rank {rank} gather of {n / 1e6:.1f}M fp32 ({n * 4 / 2**20:.0f} MiB), {name}: "
              f"peak +{sampler.rise_mb:.0f} MiB",
              flush=True)
        del out


def main() -> None:
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    load_peak(rank)
    dist.barrier()
    gather_peaks(rank, world)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
