"""Fixtures for the text-to-text tests: a tiny random T5 and source/target pairs cut from the real GLUE files."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from conftest import GLUE


def save_tiny_t5(out: Path) -> Path:
    """A 2+2-layer, 64-wide T5 with random weights and the MiniLM WordPiece tokenizer, saved as a pretrained
    checkpoint is. The tokenizer has no EOS token: [SEP], which ends each of its texts, plays that part,
    and [PAD] starts the decoder as <pad> does in T5."""
    import torch
    from transformers import AutoTokenizer, T5Config, T5ForConditionalGeneration

    from adaptopt.models import default_model_path

    tokenizer = AutoTokenizer.from_pretrained(default_model_path())
    config = T5Config(vocab_size=len(tokenizer), d_model=64, d_kv=16, num_heads=4, d_ff=128, num_layers=2,
                      num_decoder_layers=2, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.sep_token_id,
                      decoder_start_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    T5ForConditionalGeneration(config).save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_t5(tmp_path_factory) -> Path:
    return save_tiny_t5(tmp_path_factory.mktemp("tiny-t5"))


def write_domain_pairs(out: Path, train_per_domain: int = 1600, valid_per_domain: int = 100) -> tuple[Path, Path]:
    """A task a tiny random T5 learns in a few dozen updates: tell a movie review (an SST-2 sentence of 12 words
    or more, so that length alone does not give it away) from a news sentence (MRPC's sentence1). Train pairs
    come from the train files, validation pairs from the dev files; half of each is "movie"."""
    from adaptopt.data.glue import load_glue

    out.mkdir(parents=True, exist_ok=True)
    sst2, mrpc = load_glue("sst2", data_dir=GLUE), load_glue("mrpc", data_dir=GLUE)
    paths = []
    for split, name, n in (("train", "train", train_per_domain), ("validation", "valid", valid_per_domain)):
        movies = [s for s in sst2[split]["sentence"] if len(s.split()) >= 12][:n]
        news = list(mrpc[split]["sentence1"][:n])
        assert len(movies) == len(news) == n
        rows = [{"source": s, "target": "movie"} for s in movies] + [{"source": s, "target": "news"} for s in news]
        random.Random(0).shuffle(rows)
        paths.append(out / f"{name}.jsonl")
        paths[-1].write_text("".join(json.dumps(r) + "\n" for r in rows))
    return paths[0], paths[1]


@pytest.fixture(scope="session")
def domain_pairs(tmp_path_factory, glue_dir) -> tuple[Path, Path]:
    return write_domain_pairs(tmp_path_factory.mktemp("domain"))
