"""Plain text for causal-LM training: read it, tokenise it, and pack it into fixed-length blocks.

`load_texts(...)` takes one of two sources and returns a ``datasets.DatasetDict`` with "train" and
"validation" splits of one string column, ``text``:

* ``train_file`` / ``validation_file``: local files, by extension

  - ``.txt``: one text per line (a paragraph, a document); blank lines are skipped;
  - ``.jsonl``: one JSON object per line, the text in ``text_column``;
  - ``.json``: a JSON list of such objects (or, as HF's json loader also accepts, JSON lines).

* ``dataset_name`` (+ ``dataset_config_name``): ``datasets.load_dataset`` from the Hub (needs it).

With no validation source, the last ``validation_split_percentage`` % of the training texts are held
out (HF ``run_clm_no_trainer.py`` does the same).

`pack(texts, tokenizer, block_size)` is HF ``run_clm_no_trainer.py``'s ``group_texts``: every non-empty
text is tokenised, the token streams are concatenated (per map batch of 1000 texts) and cut into blocks of
``block_size`` tokens; the remainder of each batch, shorter than a block, is dropped. A text ends
with the tokenizer's EOS token when it has one and the tokenizer does not end texts itself (GPT-2 and
LLaMA tokenizers add none; BERT's WordPiece ends each text with [SEP]), so the model sees where one
document stops and the next begins. Labels are the inputs: the model shifts them by one itself.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

TEXT_SUFFIXES = (".txt", ".json", ".jsonl")
PACK_BATCH = 1000  # texts per group_texts call: HF's default map batch


class TextDataError(ValueError):
    """Text input a user can get wrong (missing file, wrong column, too little text); says what to fix."""


def read_texts(path: str | Path, text_column: str = "text") -> list[str]:
    """The non-empty texts of one .txt/.json/.jsonl file, in file order."""
    path = Path(path)
    if not path.is_file():
        raise TextDataError(f"text file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix not in TEXT_SUFFIXES:
        raise TextDataError(f"{path}: unsupported extension {suffix!r}; use one of {', '.join(TEXT_SUFFIXES)}")
    content = path.read_text(encoding="utf-8-sig")
    if suffix == ".txt":
        texts = [line.strip() for line in content.splitlines()]
        return _non_empty(path, [t for t in texts if t])
    records = None  # (where, record) pairs; where names the line or list item for error messages
    if suffix == ".json":
        try:
            document = json.loads(content)
        except json.JSONDecodeError:
            document = None  # maybe JSON lines under a .json name (HF's json loader accepts both)
        if document is not None:
            if not isinstance(document, list):
                raise TextDataError(f"{path}: expected a JSON list of objects with a {text_column!r} field "
                                    f"(or one object per line), got a JSON {type(document).__name__}")
            records = [(f"item {n}", record) for n, record in enumerate(document, start=1)]
    if records is None:
        records = []
        for n, line in enumerate(content.splitlines(), start=1):
            if line.strip():
                try:
                    records.append((f"line {n}", json.loads(line)))
                except json.JSONDecodeError as err:
                    raise TextDataError(f"{path} line {n}: not valid JSON ({err.msg})") from None
    texts = []
    for where, record in records:
        if not isinstance(record, dict) or text_column not in record:
            found = sorted(record) if isinstance(record, dict) else f"a JSON {type(record).__name__}"
            raise TextDataError(f"{path} {where}: no {text_column!r} field (found {found}); "
                                "pass --text_column with the name of the text field")
        if not isinstance(record[text_column], str):
            raise TextDataError(f"{path} {where}: {text_column!r} is a "
                                f"{type(record[text_column]).__name__}, not a string")
        if record[text_column].strip():
            texts.append(record[text_column])
    return _non_empty(path, texts)


def _non_empty(path: Path, texts: list[str]) -> list[str]:
    if not texts:
        raise TextDataError(f"{path} holds no non-empty text")
    return texts


def load_texts(train_file: str | None = None, validation_file: str | None = None, *, text_column: str = "text",
               dataset_name: str | None = None, dataset_config_name: str | None = None,
               validation_split_percentage: int = 5):
    """DatasetDict(train=..., validation=...) with one column, "text"."""
    import datasets

    if dataset_name:
        raw = datasets.load_dataset(dataset_name, dataset_config_name)
        if text_column not in raw["train"].column_names:
            raise TextDataError(f"{dataset_name}: no column {text_column!r} (columns: "
                                f"{', '.join(raw['train'].column_names)}); pass --text_column")
        splits = {name: _text_only(raw[name], text_column) for name in ("train", "validation") if name in raw}
    else:
        if not train_file:
            raise TextDataError("no training text: pass --train_file (.txt/.json/.jsonl) or --dataset_name")
        splits = {"train": datasets.Dataset.from_dict({"text": read_texts(train_file, text_column)})}
        if validation_file:
            splits["validation"] = datasets.Dataset.from_dict({"text": read_texts(validation_file, text_column)})
    if "validation" not in splits:
        train = splits["train"]
        n_val = len(train) * validation_split_percentage // 100
        if n_val < 1 or n_val >= len(train):
            raise TextDataError(f"cannot hold out {validation_split_percentage}% of {len(train)} training texts for "
                                "validation: pass --validation_file or change --validation_split_percentage")
        splits = {"train": train.select(range(len(train) - n_val)),
                  "validation": train.select(range(len(train) - n_val, len(train)))}
    return datasets.DatasetDict(splits)


def _text_only(split, text_column: str):
    split = split.select_columns([text_column])
    return split if text_column == "text" else split.rename_column(text_column, "text")


def group_texts(examples: dict[str, list[list[int]]], block_size: int) -> dict[str, list[list[int]]]:
    """HF run_clm's group_texts: concatenate the token lists and cut them into ``block_size`` blocks."""
    ids = [token for text in examples["input_ids"] for token in text]
    usable = len(ids) // block_size * block_size  # the short tail of the batch is dropped
    return {"input_ids": [ids[i:i + block_size] for i in range(0, usable, block_size)]}


def pack(texts, tokenizer, block_size: int):
    """A Dataset of ``block_size``-token blocks (column input_ids) from a Dataset with a "text" column."""
    eos = tokenizer.eos_token_id

    def tokenize(batch):
        texts = [t for t in batch["text"] if t.strip()]  # hub corpora (wikitext) hold many empty lines
        # verbose=False: texts longer than the tokenizer's model_max_length are fine here, since they are cut
        # into blocks below; without it transformers warns once about "sequence length" for nothing.
        ids = tokenizer(texts, return_attention_mask=False, return_token_type_ids=False, verbose=False)["input_ids"]
        if eos is not None:
            ids = [t if t and t[-1] == eos else t + [eos] for t in ids]
        return {"input_ids": ids}

    tokenized = texts.map(tokenize, batched=True, remove_columns=texts.column_names, desc="tokenizing")
    return tokenized.map(group_texts, batched=True, batch_size=PACK_BATCH, fn_kwargs={"block_size": block_size},
                         desc=f"packing into blocks of {block_size}")


def pack_splits(raw, tokenizer, block_size: int, max_train_blocks: int | None = None,
                max_eval_blocks: int | None = None):
    """(train blocks, validation blocks with an "idx" column); raises TextDataError if a split has no block."""
    train, validation = pack(raw["train"], tokenizer, block_size), pack(raw["validation"], tokenizer, block_size)
    for name, blocks in (("training", train), ("validation", validation)):
        if len(blocks) == 0:
            raise TextDataError(f"the {name} text is shorter than one block of {block_size} tokens: give more text "
                                "or a smaller --block_size")
    if max_train_blocks is not None:
        train = train.select(range(min(max_train_blocks, len(train))))
    if max_eval_blocks is not None:
        validation = validation.select(range(min(max_eval_blocks, len(validation))))
    # idx lets evaluation prove it saw every block exactly once under any number of processes
    validation = validation.add_column("idx", list(range(len(validation))))
    return train, validation


def collate_blocks(rows: list[dict]) -> dict[str, torch.Tensor]:
    """Stacks blocks; labels are the inputs (causal-LM models shift them by one themselves)."""
    input_ids = torch.tensor([row["input_ids"] for row in rows], dtype=torch.long)
    batch = {"input_ids": input_ids, "labels": input_ids.clone()}
    if "idx" in rows[0]:
        batch["idx"] = torch.tensor([row["idx"] for row in rows], dtype=torch.long)
    return batch
