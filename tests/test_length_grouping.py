"""adaptopt/data/length_grouping.py: length-grouped batches, seeded by (seed, epoch), through accelerate's
DataLoader preparation as the recipes use it (1 and 2 processes, resumed mid-epoch at either count)."""
import csv
import sys

import pytest
import torch
from accelerate.data_loader import prepare_data_loader, skip_first_batches
from torch.utils.data import DataLoader

from adaptopt.data.length_grouping import SeededLengthGroupedSampler, padded_tokens_ratio

BATCH = 8


def sst2_lengths(glue_dir, n: int = 1200) -> list[int]:
    """Words per sentence of the first n real SST-2 training sentences (the spread of lengths the recipe sees)."""
    csv.field_size_limit(sys.maxsize)
    with open(glue_dir / "SST-2" / "train.tsv", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[:n]
    return [len(r["sentence"].split()) for r in rows]


def epoch_batches(loader, epoch: int) -> list[list[int]]:
    loader.set_epoch(epoch)
    return [batch.tolist() for batch in loader]


def loader_for(lengths, seed: int, processes: int = 1, rank: int = 0):
    """The recipe's training loader (its own generator, the sampler) after accelerate's prepare for ``rank`` of
    ``processes``; the dataset is the example indices, so a batch shows which examples it holds."""
    dl = DataLoader(list(range(len(lengths))), batch_size=BATCH, generator=torch.Generator().manual_seed(seed),
                    sampler=SeededLengthGroupedSampler(lengths, BATCH, seed))
    return prepare_data_loader(dl, num_processes=processes, process_index=rank, put_on_device=False,
                               use_seedable_sampler=True)


def test_batches_are_grouped_by_length_and_cover_every_example_once_per_epoch(glue_dir):
    lengths = sst2_lengths(glue_dir)
    loader = loader_for(lengths, seed=1)
    for epoch in (0, 1):
        batches = epoch_batches(loader, epoch)
        assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
        grouped = padded_tokens_ratio(lengths, batches)
        shuffled = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(epoch)).tolist()
        uniform = padded_tokens_ratio(lengths, [shuffled[i:i + BATCH] for i in range(0, len(lengths), BATCH)])
        # real sentences: random batches pad to about twice their tokens, grouped ones barely at all
        assert uniform > 1.5 and grouped < 1.1, (uniform, grouped)
        # transformers' grouping: the batch with the longest example first (out of memory shows at once)
        assert max(lengths[i] for i in batches[0]) == max(lengths)


def test_the_order_is_a_function_of_seed_and_epoch():
    lengths = torch.randint(1, 60, (400,), generator=torch.Generator().manual_seed(0)).tolist()
    a, b = loader_for(lengths, seed=3), loader_for(lengths, seed=3)
    assert epoch_batches(a, 1) == epoch_batches(b, 1)  # two runs of one seed: the same batches
    assert epoch_batches(a, 0) != epoch_batches(a, 1)  # each epoch its own order
    assert epoch_batches(a, 1) == epoch_batches(a, 1) == epoch_batches(b, 1)  # replayable (what resume needs)
    assert epoch_batches(a, 1) != epoch_batches(loader_for(lengths, seed=4), 1)
    with pytest.raises(ValueError, match="batch_size must be at least 1"):
        SeededLengthGroupedSampler(lengths, 0, seed=3)


@pytest.mark.parametrize("written_by,resumed_by", [(1, 1), (2, 2), (2, 1), (1, 2)])
def test_a_resume_mid_epoch_continues_with_the_uninterrupted_runs_batches(written_by, resumed_by):
    """Every process takes every N-th batch of the one grouped order, so N processes that each did b batches
    consumed its first b x N (adaptopt/checkpointing.py resume_position); a resume skips them, as the training
    loop does (skip_first_batches, then set_epoch), at the writing or at another process count."""
    from adaptopt.checkpointing import resume_position

    lengths = torch.randint(1, 60, (320,), generator=torch.Generator().manual_seed(1)).tolist()  # 40 batches
    epoch, done = 1, 6  # each writing process had done 6 batches of epoch 1
    whole = epoch_batches(loader_for(lengths, seed=7), epoch)  # the uninterrupted one-process order
    for rank in range(written_by):  # what each writing process saw: every N-th batch of that order
        assert epoch_batches(loader_for(lengths, 7, written_by, rank), epoch) == whole[rank::written_by]
    skip = resume_position(dict(completed_steps=done, batches_in_epoch=done, num_processes=written_by), resumed_by)
    rest = []
    for rank in range(resumed_by):
        fresh = loader_for(lengths, 7, resumed_by, rank)
        fresh.set_epoch(epoch)
        skipping = skip_first_batches(fresh, skip)
        rest.append(epoch_batches(skipping, epoch))
    merged = [batch for step in zip(*rest) for batch in step]  # rank 0's, rank 1's, ... batch of each step
    assert merged == whole[done * written_by:]


# recipe -> its default (recipes/glue.py groups by default; squad.py and seq2seq.py on request, until a dev metric
# with grouping is checked for them: docs/recipes.md)
RECIPE_DEFAULTS = {"glue": True, "squad": False, "seq2seq": False}


def recipe(name: str):
    from conftest import REPO

    sys.path.insert(0, str(REPO / "recipes"))
    return __import__(name)


@pytest.mark.parametrize("name", list(RECIPE_DEFAULTS))
def test_each_recipe_says_in_its_help_whether_it_groups_by_default(name, capsys):
    with pytest.raises(SystemExit):
        recipe(name).parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    default = "on" if RECIPE_DEFAULTS[name] else "off"
    assert "--group_by_length" in text and "--no_group_by_length" in text
    assert f"LengthGroupedSampler, as the Trainer's group_by_length): less padding, faster steps. Default: {default}" \
        in text


@pytest.mark.parametrize("flag,grouped", [(None, True), ("--no_group_by_length", False)])
def test_the_glue_recipes_training_loader_groups_its_real_sentences(flag, grouped, glue_dir, tiny_bert, tmp_path):
    """recipes/glue.py's own loader on the real SST-2 sentences, before accelerate (which keeps the sampler): the
    flag decides the order, the lengths are the tokenized ones, and the padding falls as grouping promises."""
    from transformers import AutoTokenizer

    glue = recipe("glue")
    args = glue.parse_args(["--task_name", "sst2", "--data_dir", str(glue_dir), "--output_dir", str(tmp_path),
                            "--max_train_samples", "2560", "--max_eval_samples", "8", "--seed", "5",
                            *([flag] if flag else [])])
    args.mixed_precision = "no"
    train, _ = glue.build_dataloaders(args, glue.load_data(args), AutoTokenizer.from_pretrained(tiny_bert))
    assert isinstance(train.sampler, SeededLengthGroupedSampler) is grouped
    lengths = [len(ids) for ids in train.dataset["input_ids"]]
    seen = []
    for batch in train:  # the collated batches: padded to their longest example
        seen.append(batch["input_ids"].shape)
    if grouped:
        assert train.sampler.lengths == lengths and train.sampler.seed == 5
        batches = list(torch.utils.data.BatchSampler(train.sampler, args.per_device_train_batch_size, False))
        assert [torch.Size([len(b), max(lengths[i] for i in b)]) for b in batches] == seen
        assert padded_tokens_ratio(lengths, batches) < 1.2, padded_tokens_ratio(lengths, batches)
    assert sum(s[0] for s in seen) == 2560
    padded = sum(s[0] * s[1] for s in seen) / sum(lengths)
    assert (padded < 1.2) is grouped, padded  # (random batches: about 2x)
