"""Text-to-text data: GLUE tasks written as T5 writes them, any source/target JSONL, and generated answers
mapped back to labels.

Every example becomes a ``source`` text (the model's input) and a ``target`` text (what it must generate).

**GLUE as T5 writes it** (Raffel et al., 2020, appendix D; T5's ``preprocessors.glue`` and ``stsb``): the
source is the task name, then each text field as ``name: text``, fields in alphabetical order; the target is
the label's name (HF ``glue`` / TFDS label names, `adaptopt.data.glue.GLUE_TASKS`)::

    task   source                                           targets
    cola   cola sentence: ...                               unacceptable, acceptable
    sst2   sst2 sentence: ...                               negative, positive
    mrpc   mrpc sentence1: ... sentence2: ...               not_equivalent, equivalent
    stsb   stsb sentence1: ... sentence2: ...               the score rounded to a multiple of 0.2: "0.0" ... "5.0"
    qqp    qqp question1: ... question2: ...                not_duplicate, duplicate
    mnli   mnli hypothesis: ... premise: ...                entailment, neutral, contradiction
    qnli   qnli question: ... sentence: ...                 entailment, not_entailment
    rte    rte sentence1: ... sentence2: ...                entailment, not_entailment
    wnli   wnli sentence1: ... sentence2: ...               not_entailment, entailment

The STS-B target is T5's ``tf.as_string(tf.round(score * 5) / 5, precision=1)`` on the float32 score:
float32 arithmetic and round-half-to-even, so 2.3 becomes "2.4" (2.3 * 5 is 11.5 in float32).

**Any source/target pairs** (`load_pairs`): ``.jsonl`` files, one JSON object per line, the texts in the
``source_column`` and ``target_column`` fields (other fields are ignored). An empty source or target is
an error that names the file and line.

**Answers back to labels** (`AnswerMap`): a generated text is a GLUE label when, with runs of whitespace
made single spaces, it equals the label's name, or the label's name as the tokenizer gives it back after
encoding and decoding it (an uncased WordPiece tokenizer writes "not_equivalent" back as
"not _ equivalent"). For STS-B an answer is a score when it is a number in [0, 5] (T5 parses it with
``float``) or one of the 26 target strings as the tokenizer gives them back. Anything else is an invalid
answer: it is counted, and scored as wrong (`AnswerMap.score`).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .glue import STSB_SCORE_RANGE, GlueTask, get_task

PAIR_SUFFIX = ".jsonl"
STSB_TARGETS = tuple(f"{k / 5:.1f}" for k in range(26))  # what T5's STS-B targets can be: "0.0", "0.2", ... "5.0"


class Text2TextDataError(ValueError):
    """Text-to-text input a user can get wrong (a missing field, an empty target, an unknown task, a tokenizer
    that cannot tell two labels apart); the message says what and where."""


# ---- GLUE as text-to-text --------------------------------------------------------------------------


def glue_source(task: GlueTask, row: dict) -> str:
    """T5's input text: ``"<task> <field>: <text> <field>: <text>"``, fields in alphabetical order."""
    return " ".join([task.name, *(f"{field}: {row[field]}" for field in sorted(task.text_columns))])


def stsb_target(score: float) -> str:
    """T5's STS-B target: the float32 score rounded half-to-even to a multiple of 0.2, one decimal."""
    rounded = np.round(np.float32(score) * np.float32(5)) / np.float32(5)
    return f"{float(rounded):.1f}"


def glue_target(task: GlueTask, label: int | float) -> str:
    """The target text of a label id (the score for STS-B)."""
    return stsb_target(label) if task.is_regression else task.label_names[label]


def glue_as_text2text(task_name: str, raw):
    """Adds ``source`` and ``target`` columns to every split of `load_glue`'s DatasetDict (label and idx stay)."""
    try:
        task = get_task(task_name)
    except ValueError as err:
        raise Text2TextDataError(str(err)) from None

    def write(batch):
        rows = [dict(zip(batch, values)) for values in zip(*batch.values())]
        return {"source": [glue_source(task, row) for row in rows],
                "target": [glue_target(task, row["label"]) for row in rows]}

    return raw.map(write, batched=True, remove_columns=list(task.text_columns), desc="writing as text-to-text")


# ---- any source/target pairs -------------------------------------------------------------------------


def read_pairs(path: str | Path, source_column: str = "source", target_column: str = "target"
               ) -> tuple[list[str], list[str]]:
    """(sources, targets) of a .jsonl file, in file order; blank lines are skipped."""
    path = Path(path)
    if path.suffix.lower() != PAIR_SUFFIX:
        raise Text2TextDataError(f"{path}: source/target pairs are read from {PAIR_SUFFIX} files (one JSON object "
                                 f"per line with {source_column!r} and {target_column!r} fields), not {path.suffix!r}")
    if not path.is_file():
        raise Text2TextDataError(f"{path}: file not found")
    sources, targets = [], []
    for n, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise Text2TextDataError(f"{path} line {n}: not valid JSON ({err.msg})") from None
        if not isinstance(record, dict):
            raise Text2TextDataError(f"{path} line {n}: expected a JSON object, got a JSON {type(record).__name__}")
        for column, flag in ((source_column, "--source_column"), (target_column, "--target_column")):
            if column not in record:
                raise Text2TextDataError(f"{path} line {n}: no {column!r} field (found {sorted(record)}); pass "
                                         f"{flag} with the name of the field that holds it")
            value = record[column]
            if not isinstance(value, str):
                raise Text2TextDataError(f"{path} line {n}: {column!r} is a {type(value).__name__}, not a string")
            if not value.strip():
                what = "target: the model would learn to generate nothing" if column == target_column else "source"
                raise Text2TextDataError(f"{path} line {n}: empty {what}; fix or drop the line")
        sources.append(record[source_column])
        targets.append(record[target_column])
    if not sources:
        raise Text2TextDataError(f"{path} holds no source/target pairs")
    return sources, targets


def load_pairs(train_file: str | Path, validation_file: str | Path, *, source_column: str = "source",
               target_column: str = "target", source_prefix: str = ""):
    """DatasetDict(train=..., validation=...) with columns source, target and idx (the row's index)."""
    import datasets

    splits = {}
    for split, path in (("train", train_file), ("validation", validation_file)):
        sources, targets = read_pairs(path, source_column, target_column)
        splits[split] = datasets.Dataset.from_dict({"source": [source_prefix + s for s in sources], "target": targets,
                                                    "idx": list(range(len(sources)))})
    return datasets.DatasetDict(splits)


# ---- generated answers -> labels ---------------------------------------------------------------------


def canonical(text: str) -> str:
    """Text with leading/trailing whitespace dropped and inner runs of whitespace made one space."""
    return " ".join(text.split())


def round_trip(tokenizer, text: str) -> str:
    """``text`` as the model can generate it: encoded as a target, decoded without special tokens."""
    return canonical(tokenizer.decode(tokenizer(text_target=text)["input_ids"], skip_special_tokens=True))


class AnswerMap:
    """Maps generated texts to a GLUE task's labels (ids, or scores for STS-B); see the module docstring."""

    def __init__(self, task: GlueTask, tokenizer):
        self.task = task
        words = STSB_TARGETS if task.is_regression else task.label_names
        values = [float(w) for w in words] if task.is_regression else list(range(len(words)))
        self.table: dict[str, int | float] = {}
        for word, value in zip(words, values):
            for key in {canonical(word), round_trip(tokenizer, word)}:
                if self.table.setdefault(key, value) != value:
                    other = words[values.index(self.table[key])]
                    raise Text2TextDataError(
                        f"{task.name}: the tokenizer gives back the targets {other!r} and {word!r} as the same text "
                        f"{key!r}, so generated answers cannot tell them apart; use a tokenizer that encodes both")

    def label(self, text: str) -> int | float | None:
        """The label id (the score for STS-B) a generated text names, or None for an invalid answer."""
        key = canonical(text)
        if key in self.table:
            return self.table[key]
        if self.task.is_regression:
            try:
                score = float(key)
            except ValueError:
                return None
            low, high = STSB_SCORE_RANGE
            return score if low <= score <= high else None  # (also rejects nan)
        return None

    def score(self, texts: list[str], references: list) -> tuple[list, int]:
        """(predictions for the GLUE metric, number of invalid answers).

        An invalid answer is scored as wrong: as the next label id after the reference's (so never the
        reference), or for STS-B as the end of [0, 5] farthest from the reference score."""
        predictions, invalid = [], 0
        for text, reference in zip(texts, references, strict=True):
            value = self.label(text)
            if value is None:
                invalid += 1
                if self.task.is_regression:
                    low, high = STSB_SCORE_RANGE
                    value = low if reference >= (low + high) / 2 else high
                else:
                    value = (reference + 1) % len(self.task.label_names)
            predictions.append(value)
        return predictions, invalid
