"""Conversations for chat/instruction fine-tuning: read them, render them with the tokenizer's chat template,
and mark the assistant's tokens as the only targets.

Input: JSON lines (or a JSON list, or hub dataset rows) whose ``messages`` field is a list of turns
``{"role": "system" | "user" | "assistant", "content": "..."}``, the format of the hub's chat datasets
(e.g. HuggingFaceH4/ultrachat_200k)::

    {"messages": [{"role": "user", "content": "Name a prime."}, {"role": "assistant", "content": "7."}]}

Rendering: ``tokenizer.apply_chat_template``. A tokenizer without a template gets ``DEFAULT_CHAT_TEMPLATE``,
the Zephyr format (HuggingFaceH4/zephyr-7b-beta's): each turn is ``<|role|>``, a newline, the content and the
tokenizer's end-of-sequence token, then a newline; the end-of-sequence token is [SEP] for a BERT-style
tokenizer that has none (the template and that token are saved with the model).

Targets: the tokens of each assistant turn, end-of-turn marker included, found by rendering the conversation up
to the turn with ``add_generation_prompt=True`` and up to its end: every other token (system, user, the role
headers) has label -100 and adds nothing to the loss or to the validation loss/perplexity. A template whose
rendering of a prefix is not a prefix of the whole (which would move the targets) is an error.

Bad records, each counted and logged by reason, never cut:
- skipped: ``no_assistant_turn`` (nothing to learn), ``unknown_role`` (a role outside ROLES),
  ``too_long`` (more than ``max_length`` tokens: cutting it would cut or drop targets);
- errors (``TextDataError``, with the file and line): a record that is not an object with a ``messages``
  list, a turn without a string ``role`` and ``content``.
Trailing turns after the last assistant turn carry no target and are dropped from the rendered text.

Batches are padded (right, to the longest conversation of the batch) with an attention mask: every example is
its own sequence, so no attention crosses examples.
"""
from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

import torch

from .text import TextDataError

logger = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")
SKIP_REASONS = ("no_assistant_turn", "unknown_role", "too_long")
IGNORE_INDEX = -100  # torch's cross_entropy ignore_index: the label of a token that is not a target

DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


def ensure_chat_template(tokenizer) -> bool:
    """Gives ``tokenizer`` the default template (and [SEP] as its end-of-sequence token when it has none);
    True when it did. A tokenizer's own template is kept."""
    if tokenizer.chat_template:
        return False
    if tokenizer.eos_token is None:
        if tokenizer.sep_token is None:
            raise TextDataError("the tokenizer has no chat template, no end-of-sequence and no [SEP] token to end "
                                "a turn with: pass a --tokenizer_name that has a chat template")
        tokenizer.eos_token = tokenizer.sep_token
    tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    logger.warning(f"the tokenizer has no chat template: using the default (Zephyr format, turns ending with "
                   f"{tokenizer.eos_token}); it is saved with the model")
    return True


def read_records(path: str | Path) -> list[tuple[str, object]]:
    """(where, record) of every record of a .jsonl/.json file; where names the line or list item."""
    path = Path(path)
    if not path.is_file():
        raise TextDataError(f"conversation file {path} does not exist")
    if path.suffix.lower() not in (".jsonl", ".json"):
        raise TextDataError(f"{path}: conversations are JSON lines (.jsonl) or a JSON list (.json), "
                            f"not {path.suffix!r}")
    content = path.read_text(encoding="utf-8-sig")
    if path.suffix.lower() == ".json":
        try:
            document = json.loads(content)
        except json.JSONDecodeError:
            document = None  # JSON lines under a .json name
        if isinstance(document, list):
            return [(f"{path} item {n}", record) for n, record in enumerate(document, start=1)]
    records = []
    for n, line in enumerate(content.splitlines(), start=1):
        if line.strip():
            try:
                records.append((f"{path} line {n}", json.loads(line)))
            except json.JSONDecodeError as err:
                raise TextDataError(f"{path} line {n}: not valid JSON ({err.msg})") from None
    return records


def checked_messages(where: str, record) -> list[dict]:
    """The record's turns; raises TextDataError for a record or turn of the wrong shape."""
    if not isinstance(record, dict) or not isinstance(record.get("messages"), list):
        found = sorted(record) if isinstance(record, dict) else f"a JSON {type(record).__name__}"
        raise TextDataError(f"{where}: expected an object with a 'messages' list of {{role, content}} turns "
                            f"(found {found})")
    for n, turn in enumerate(record["messages"], start=1):
        if not (isinstance(turn, dict) and isinstance(turn.get("role"), str) and isinstance(turn.get("content"), str)):
            raise TextDataError(f"{where}: turn {n} is not an object with string 'role' and 'content' fields "
                                f"(got {json.dumps(turn)[:80]})")
    return record["messages"]


def _ids(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    # the template writes every special token itself (HF's convention for chat templates)
    return tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]


def tokenize_conversation(messages: list[dict], tokenizer, max_length: int) -> tuple[dict | None, str | None]:
    """({"input_ids", "labels"}, None), or (None, the skip reason)."""
    if any(turn["role"] not in ROLES for turn in messages):
        return None, "unknown_role"
    last = max((i for i, turn in enumerate(messages) if turn["role"] == "assistant"), default=None)
    if last is None:
        return None, "no_assistant_turn"
    messages = messages[:last + 1]
    input_ids = _ids(tokenizer, messages)
    if len(input_ids) > max_length:
        return None, "too_long"
    labels = [IGNORE_INDEX] * len(input_ids)
    for i, turn in enumerate(messages):
        if turn["role"] != "assistant":
            continue
        prompt, through = _ids(tokenizer, messages[:i], add_generation_prompt=True), _ids(tokenizer, messages[:i + 1])
        if input_ids[:len(prompt)] != prompt or input_ids[:len(through)] != through:
            raise TextDataError("the chat template renders a conversation's beginning differently from the whole "
                                "conversation, so the assistant's tokens cannot be located; use a template whose "
                                "rendering of the first turns is a prefix of the full rendering")
        labels[len(prompt):len(through)] = input_ids[len(prompt):len(through)]
    return {"input_ids": input_ids, "labels": labels}, None


def tokenize_split(records: list[tuple[str, object]], tokenizer, max_length: int, name: str):
    """(a Dataset with input_ids and labels, Counter of skip reasons) for one split's records."""
    from datasets import Dataset

    rows, skipped, examples = [], Counter(), {}
    for where, record in records:
        row, reason = tokenize_conversation(checked_messages(where, record), tokenizer, max_length)
        if row is None:
            skipped[reason] += 1
            examples.setdefault(reason, where)
        else:
            rows.append(row)
    if skipped:
        logger.warning(f"{name}: skipped {sum(skipped.values())} of {len(records)} conversations: "
                       + ", ".join(f"{n} {reason} (first: {examples[reason]})" for reason, n in skipped.items())
                       + (f"; too_long means more than {max_length} tokens (--block_size)" if skipped["too_long"]
                          else ""))
    if not rows:
        raise TextDataError(f"{name}: no usable conversation among {len(records)} ({dict(skipped)}); each needs an "
                            f"assistant turn, roles among {', '.join(ROLES)}, and at most {max_length} tokens")
    return Dataset.from_dict({"input_ids": [r["input_ids"] for r in rows], "labels": [r["labels"] for r in rows]}), \
        skipped


def load_conversations(tokenizer, max_length: int, train_file: str | None = None, validation_file: str | None = None,
                       *, dataset_name: str | None = None, dataset_config_name: str | None = None,
                       validation_split_percentage: int = 5, max_train_samples: int | None = None,
                       max_eval_samples: int | None = None):
    """(train Dataset, validation Dataset with an "idx" column, {"train": skips, "validation": skips})."""
    if dataset_name:
        import datasets

        raw = datasets.load_dataset(dataset_name, dataset_config_name)
        splits = {name: [(f"{dataset_name} {name} row {n}", row) for n, row in enumerate(raw[name])]
                  for name in ("train", "validation") if name in raw}
    else:
        splits = {"train": read_records(train_file)}
        if validation_file:
            splits["validation"] = read_records(validation_file)
    if "validation" not in splits:
        train = splits["train"]
        n_val = len(train) * validation_split_percentage // 100
        if n_val < 1 or n_val >= len(train):
            raise TextDataError(f"cannot hold out {validation_split_percentage}% of {len(train)} conversations for "
                                "validation: pass --validation_file or change --validation_split_percentage")
        splits = {"train": train[:len(train) - n_val], "validation": train[len(train) - n_val:]}
    train, train_skips = tokenize_split(splits["train"], tokenizer, max_length, "training conversations")
    validation, valid_skips = tokenize_split(splits["validation"], tokenizer, max_length, "validation conversations")
    if max_train_samples is not None:
        train = train.select(range(min(max_train_samples, len(train))))
    if max_eval_samples is not None:
        validation = validation.select(range(min(max_eval_samples, len(validation))))
    # idx lets evaluation prove it saw every conversation exactly once under any number of processes
    validation = validation.add_column("idx", list(range(len(validation))))
    skips = {"train": {r: train_skips[r] for r in SKIP_REASONS}, "validation": {r: valid_skips[r] for r in SKIP_REASONS}}
    return train, validation, skips


def chat_collator(pad_token_id: int):
    """Pads a batch to its longest conversation: pad tokens are masked from attention and from the loss."""

    def collate(rows: list[dict]) -> dict[str, torch.Tensor]:
        length = max(len(row["input_ids"]) for row in rows)
        input_ids = torch.full((len(rows), length), pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, row in enumerate(rows):
            n = len(row["input_ids"])
            input_ids[i, :n] = torch.tensor(row["input_ids"])
            labels[i, :n] = torch.tensor(row["labels"])
            attention_mask[i, :n] = 1
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        if "idx" in rows[0]:
            batch["idx"] = torch.tensor([row["idx"] for row in rows], dtype=torch.long)
        return batch

    return collate
