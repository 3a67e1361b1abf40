"""adaptopt/data/chat.py on the conversation files of tests/ (chat_train.jsonl, chat_valid.jsonl: real records in
the hub's `messages` format, with bad ones): the default template, targets on the assistant's tokens only,
counted skips, clear errors, and padded batches in which no attention crosses examples."""
import json
from pathlib import Path

import pytest
import torch

from adaptopt.data.chat import (DEFAULT_CHAT_TEMPLATE, IGNORE_INDEX, chat_collator, ensure_chat_template,
                                load_conversations, tokenize_conversation)
from adaptopt.data.text import TextDataError
from adaptopt.models import default_model_path

HERE = Path(__file__).parent
TRAIN, VALID = HERE / "chat_train.jsonl", HERE / "chat_valid.jsonl"


@pytest.fixture()
def tokenizer():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(default_model_path())
    assert ensure_chat_template(tok)  # MiniLM's WordPiece tokenizer has no template: the default is applied
    return tok


def test_the_default_template_renders_the_zephyr_format_with_sep_as_end_of_turn(tokenizer):
    assert tokenizer.chat_template == DEFAULT_CHAT_TEMPLATE and tokenizer.eos_token == "[SEP]"
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
    assert tokenizer.apply_chat_template(messages, tokenize=False) == "<|user|>\nHi[SEP]\n<|assistant|>\nHello.[SEP]\n"
    assert tokenizer.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True).endswith(
        "<|assistant|>\n")
    assert not ensure_chat_template(tokenizer)  # a template already there is kept


def test_targets_are_exactly_the_assistant_turns(tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of Peru?"},
                {"role": "assistant", "content": "Lima."}, {"role": "user", "content": "And of Chile?"},
                {"role": "assistant", "content": "Santiago."}, {"role": "user", "content": "Thanks."}]
    row, reason = tokenize_conversation(messages, tokenizer, max_length=128)
    assert reason is None and len(row["input_ids"]) == len(row["labels"])
    targets = [t for t, label in zip(row["input_ids"], row["labels"]) if label != IGNORE_INDEX]
    assert all(label in (IGNORE_INDEX, t) for t, label in zip(row["input_ids"], row["labels"]))
    # the two answers, each with its end-of-turn [SEP] and the newline after it (no token: WordPiece drops it);
    # no system/user text, no role header, and the trailing user turn is gone from the input
    assert tokenizer.decode(targets) == "lima. [SEP] santiago. [SEP]"
    assert "thanks" not in tokenizer.decode(row["input_ids"])


def test_the_files_bad_records_are_skipped_and_counted_and_the_rest_kept(tokenizer, caplog):
    train, valid, skips = load_conversations(tokenizer, 128, str(TRAIN), str(VALID))
    assert skips == {"train": {"no_assistant_turn": 2, "unknown_role": 1, "too_long": 1},
                     "validation": {"no_assistant_turn": 1, "unknown_role": 0, "too_long": 0}}
    lines = [json.loads(line) for line in TRAIN.read_text().splitlines()]
    assert len(train) == len(lines) - 4 and len(valid) == len(VALID.read_text().splitlines()) - 1
    assert valid["idx"] == list(range(len(valid)))
    assert "training conversations: skipped 4 of 28 conversations" in caplog.text
    assert "too_long means more than 128 tokens" in caplog.text and f"{TRAIN} line" in caplog.text
    # the over-long record fits a longer limit: it was skipped for its length, not cut
    train_long, _, skips_long = load_conversations(tokenizer, 512, str(TRAIN), str(VALID))
    assert skips_long["train"]["too_long"] == 0 and len(train_long) == len(train) + 1
    assert max(len(ids) for ids in train_long["input_ids"]) > 128


@pytest.mark.parametrize("line, message", [
    ('{"text": "plain text"}', "line 2: expected an object with a 'messages' list"),
    ('{"messages": [{"role": "user"}]}', "line 2: turn 1 is not an object with string 'role' and 'content'"),
    ('{"messages": [', "line 2: not valid JSON"),
])
def test_malformed_records_are_errors_that_name_the_line(tokenizer, tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(TRAIN.read_text().splitlines()[0] + "\n" + line + "\n")
    with pytest.raises(TextDataError, match=message):
        load_conversations(tokenizer, 128, str(path), str(VALID))


def test_a_file_with_nothing_usable_is_an_error(tokenizer, tmp_path):
    path = tmp_path / "none.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "Anyone?"}]}) + "\n")
    with pytest.raises(TextDataError, match="no usable conversation among 1"):
        load_conversations(tokenizer, 128, str(path), str(VALID))


def test_padded_batches_leak_no_attention_across_examples(tokenizer):
    """The per-example loss of a padded batch equals each example's loss computed alone."""
    from transformers import LlamaConfig, LlamaForCausalLM

    train, _, _ = load_conversations(tokenizer, 128, str(TRAIN), str(VALID))
    rows = [train[i] for i in range(4)]
    assert len({len(r["input_ids"]) for r in rows}) > 1  # different lengths: the batch is padded
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=256, pad_token_id=tokenizer.pad_token_id)).eval()
    batch = chat_collator(tokenizer.pad_token_id)(rows)
    assert batch["attention_mask"].sum(1).tolist() == [len(r["input_ids"]) for r in rows]
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        for i, row in enumerate(rows):
            n = len(row["input_ids"])
            alone = model(input_ids=torch.tensor([row["input_ids"]])).logits[0]
            torch.testing.assert_close(logits[i, :n], alone, rtol=1e-4, atol=1e-5)
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()
