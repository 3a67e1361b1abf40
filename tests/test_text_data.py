"""adaptopt/data/text.py: reading txt/json/jsonl, the held-out validation split, tokenising and packing
into blocks (HF group_texts), with the real MiniLM WordPiece tokenizer."""
import json

import pytest

from adaptopt.data.text import TextDataError, collate_blocks, group_texts, load_texts, pack, pack_splits, read_texts


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from adaptopt.models import default_model_path

    return AutoTokenizer.from_pretrained(default_model_path())


TEXTS = [f"Paragraph number {i} says something about topic {i * 7 % 5}." for i in range(40)]


def test_the_three_formats_read_the_same_texts(tmp_path):
    (tmp_path / "a.txt").write_text("\n".join(TEXTS[:3]) + "\n\n   \n")  # blank lines are not texts
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(TEXTS[:3])))
    (tmp_path / "a.json").write_text(json.dumps([{"text": t} for t in TEXTS[:3]]))
    (tmp_path / "lines.json").write_text((tmp_path / "a.jsonl").read_text())  # JSON lines named .json
    (tmp_path / "b.jsonl").write_text("".join(json.dumps({"body": t}) + "\n" for t in TEXTS[:3]))
    for name in ("a.txt", "a.jsonl", "a.json", "lines.json"):
        assert read_texts(tmp_path / name) == TEXTS[:3], name
    assert read_texts(tmp_path / "b.jsonl", text_column="body") == TEXTS[:3]


def test_errors_name_the_file_the_place_and_the_fix(tmp_path):
    (tmp_path / "obj.json").write_text(json.dumps({"data": []}))
    (tmp_path / "num.json").write_text(json.dumps([{"text": "ok"}, {"text": 3}]))
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(TextDataError, match="obj.json: expected a JSON list of objects"):
        read_texts(tmp_path / "obj.json")
    with pytest.raises(TextDataError, match="num.json item 2: 'text' is a int, not a string"):
        read_texts(tmp_path / "num.json")
    with pytest.raises(TextDataError, match="empty.txt holds no non-empty text"):
        read_texts(tmp_path / "empty.txt")


def test_without_a_validation_file_the_last_percent_of_texts_is_held_out(tmp_path):
    (tmp_path / "t.txt").write_text("\n".join(TEXTS) + "\n")
    raw = load_texts(str(tmp_path / "t.txt"), validation_split_percentage=10)
    assert raw["train"]["text"] == TEXTS[:36] and raw["validation"]["text"] == TEXTS[36:]
    with pytest.raises(TextDataError, match="cannot hold out 1% of 40"):
        load_texts(str(tmp_path / "t.txt"), validation_split_percentage=1)


def test_group_texts_cuts_the_concatenation_and_drops_the_short_tail():
    out = group_texts({"input_ids": [[1, 2, 3], [4, 5], [6, 7, 8, 9]]}, block_size=4)
    assert out == {"input_ids": [[1, 2, 3, 4], [5, 6, 7, 8]]}  # 9 is the tail


def test_blocks_are_the_token_stream_in_order(tokenizer):
    from datasets import Dataset

    stream = [t for text in TEXTS for t in tokenizer(text)["input_ids"]]  # [CLS] ... [SEP] per text
    with_blanks = TEXTS[:20] + ["", "   "] + TEXTS[20:]  # empty lines (as in hub corpora) add no tokens
    blocks = pack(Dataset.from_dict({"text": with_blanks}), tokenizer, block_size=16)
    assert len(blocks) == len(stream) // 16
    assert [t for row in blocks["input_ids"] for t in row] == stream[:len(blocks) * 16]


def test_an_eos_token_the_tokenizer_does_not_add_ends_every_text(tokenizer):
    """GPT-2/LLaMA-style tokenizers add no end marker: the EOS token is appended so documents stay apart."""
    from datasets import Dataset

    tok = tokenizer.__class__.from_pretrained(tokenizer.name_or_path, eos_token="[unused0]")
    eos = tok.eos_token_id
    stream = [t for text in TEXTS[:5] for t in tok(text)["input_ids"] + [eos]]
    blocks = pack(Dataset.from_dict({"text": TEXTS[:5]}), tok, block_size=8)
    assert [t for row in blocks["input_ids"] for t in row] == stream[:len(blocks) * 8]
    assert stream.count(eos) == 5


def test_pack_splits_numbers_the_validation_blocks_and_collate_builds_labels(tokenizer, tmp_path):
    (tmp_path / "t.txt").write_text("\n".join(TEXTS) + "\n")
    raw = load_texts(str(tmp_path / "t.txt"), str(tmp_path / "t.txt"))
    train, valid = pack_splits(raw, tokenizer, 16, max_train_blocks=5, max_eval_blocks=7)
    assert len(train) == 5 and valid["idx"] == list(range(7)) and "idx" not in train.column_names
    batch = collate_blocks([valid[i] for i in range(3)])
    assert batch["input_ids"].shape == (3, 16) and batch["idx"].tolist() == [0, 1, 2]
    assert batch["labels"].equal(batch["input_ids"]) and batch["labels"].data_ptr() != batch["input_ids"].data_ptr()
    with pytest.raises(TextDataError, match="shorter than one block of 4096 tokens"):
        pack_splits(raw, tokenizer, 4096)
