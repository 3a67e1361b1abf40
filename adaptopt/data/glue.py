"""GLUE tasks: what each one is, and how to load it as a `datasets.DatasetDict`.

`load_glue(task, ...)` takes exactly one of three sources:

* ``data_dir``: the original GLUE distribution, the layout ``download_glue_data.py`` writes::

      <data_dir>/CoLA/train.tsv  dev.tsv
      <data_dir>/SST-2/ MRPC/ STS-B/ QQP/ QNLI/ RTE/ WNLI/   (train.tsv, dev.tsv)
      <data_dir>/MNLI/train.tsv  dev_matched.tsv  dev_mismatched.tsv

  The files are tab-separated with no quoting: a ``"`` is literal text, so they are read with
  ``csv.QUOTE_NONE``. MRPC files start with a UTF-8 BOM, so every file is read as ``utf-8-sig``.
  The fields we use, by header name (CoLA has no header):

  ======  ===================================================  ================================
  task    TSV fields used (text..., label)                     label values in the file
  ======  ===================================================  ================================
  CoLA    no header, 4 fields: source, label, mark, sentence   0, 1
  SST-2   sentence, label                                      0, 1
  MRPC    #1 String, #2 String, Quality                        0, 1
  STS-B   sentence1, sentence2, score (fields 7, 8, 9 of 10)   float score in [0, 5]
  QQP     question1, question2, is_duplicate                   0, 1
  MNLI    sentence1, sentence2, gold_label                     entailment, neutral, contradiction
  QNLI    question, sentence, label                            entailment, not_entailment
  RTE     sentence1, sentence2, label                          entailment, not_entailment
  WNLI    sentence1, sentence2, label                          0, 1
  ======  ===================================================  ================================

  A row with the wrong number of fields is an error, except in QQP, whose public files hold a
  few broken rows: those are skipped and counted in a logged warning. A task folder without
  ``train.tsv`` gives a DatasetDict without a "train" split (QNLI here ships only dev.tsv); a
  missing dev file is an error.

* ``train_file`` / ``validation_file``: csv, json or jsonl files (chosen by extension, read
  with `datasets.load_dataset` like HF's ``run_glue_no_trainer.py``) with the task's text
  columns and ``label`` (a label id, a label name, or the STS-B score). Other columns are dropped.

* ``hub_name``: ``datasets.load_dataset(hub_name, task)``, e.g. ``"nyu-mll/glue"`` (needs the Hub).

Every split comes out with the same columns: the task's text columns (named as in the HF
``glue`` dataset), ``label`` (a `ClassLabel` id in HF ``glue`` order, or a float32 score for
STS-B) and ``idx`` (the row's index in its split, so evaluation coverage can be checked exactly).
"""

from __future__ import annotations

import csv
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets

logger = logging.getLogger(__name__)

GLUE_DIR_ENV = "GLUE_DIR"
STSB_SCORE_RANGE = (0.0, 5.0)


class GlueDataError(ValueError):
    """GLUE input that cannot be used as given; the message says what is wrong and where."""


@dataclass(frozen=True)
class GlueTask:
    """One GLUE task as a recipe sees it.

    Attributes:
        name: task name, as the HF ``glue`` dataset config ("cola", "sst2", ...).
        dir_name: the task's folder in the original GLUE distribution ("CoLA", "SST-2", ...).
        text_columns: the one or two text columns, with HF ``glue`` names.
        label_names: class names in label-id order (HF ``glue`` order); None for STS-B, a
            regression on a similarity score in [0, 5].
        validation_splits: names of the labelled evaluation split(s).
        metrics: keys the GLUE metric (`adaptopt.metrics.glue_metric_path`) returns for this
            task; the ones GLUE reports officially come first.
    """

    name: str
    dir_name: str
    text_columns: tuple[str, ...]
    label_names: tuple[str, ...] | None
    validation_splits: tuple[str, ...]
    metrics: tuple[str, ...]

    @property
    def is_regression(self) -> bool:
        return self.label_names is None

    @property
    def num_labels(self) -> int:
        """Size of the model's output head (1 for regression)."""
        return 1 if self.label_names is None else len(self.label_names)


_VAL = ("validation",)
_ACC_F1 = ("accuracy", "f1")
_NLI2 = ("entailment", "not_entailment")

GLUE_TASKS: dict[str, GlueTask] = {
    t.name: t
    for t in [
        GlueTask("cola", "CoLA", ("sentence",), ("unacceptable", "acceptable"), _VAL,
                 ("matthews_correlation", "accuracy", "f1")),
        GlueTask("sst2", "SST-2", ("sentence",), ("negative", "positive"), _VAL, _ACC_F1),
        GlueTask("mrpc", "MRPC", ("sentence1", "sentence2"), ("not_equivalent", "equivalent"), _VAL, _ACC_F1),
        GlueTask("stsb", "STS-B", ("sentence1", "sentence2"), None, _VAL, ("pearson", "spearmanr")),
        GlueTask("qqp", "QQP", ("question1", "question2"), ("not_duplicate", "duplicate"), _VAL, _ACC_F1),
        GlueTask("mnli", "MNLI", ("premise", "hypothesis"), ("entailment", "neutral", "contradiction"),
                 ("validation_matched", "validation_mismatched"), _ACC_F1),
        GlueTask("qnli", "QNLI", ("question", "sentence"), _NLI2, _VAL, _ACC_F1),
        GlueTask("rte", "RTE", ("sentence1", "sentence2"), _NLI2, _VAL, _ACC_F1),
        GlueTask("wnli", "WNLI", ("sentence1", "sentence2"), ("not_entailment", "entailment"), _VAL, _ACC_F1),
    ]
}


@dataclass(frozen=True)
class _TsvLayout:
    """Where a task's columns sit in its original GLUE TSV files."""

    sources: tuple[str, ...]  # TSV field name of each text column, then of the label
    label_values: tuple[str, ...] | None  # label strings in label-id order; None: a float score
    fields: tuple[str, ...] | None = None  # names of a header-less file's fields; None: line 1 is the header
    dev_files: tuple[str, ...] = ("dev.tsv",)  # one per GlueTask.validation_splits
    skip_malformed: bool = False  # only QQP: its public files hold a few rows with missing fields


_01 = ("0", "1")
_TSV_LAYOUTS: dict[str, _TsvLayout] = {
    "cola": _TsvLayout(("sentence", "label"), _01, fields=("source", "label", "mark", "sentence")),
    "sst2": _TsvLayout(("sentence", "label"), _01),
    "mrpc": _TsvLayout(("#1 String", "#2 String", "Quality"), _01),
    "stsb": _TsvLayout(("sentence1", "sentence2", "score"), None),
    "qqp": _TsvLayout(("question1", "question2", "is_duplicate"), _01, skip_malformed=True),
    # MNLI train has 12 fields and dev 16 (label1..label5); reading by header name covers both.
    "mnli": _TsvLayout(("sentence1", "sentence2", "gold_label"), ("entailment", "neutral", "contradiction"),
                       dev_files=("dev_matched.tsv", "dev_mismatched.tsv")),
    "qnli": _TsvLayout(("question", "sentence", "label"), _NLI2),
    "rte": _TsvLayout(("sentence1", "sentence2", "label"), _NLI2),
    "wnli": _TsvLayout(("sentence1", "sentence2", "label"), _01),
}


def get_task(name: str) -> GlueTask:
    """The `GlueTask` called `name`; raises `GlueDataError` listing the valid names."""
    try:
        return GLUE_TASKS[name]
    except KeyError:
        raise GlueDataError(f"unknown GLUE task {name!r}; valid tasks: {', '.join(GLUE_TASKS)}") from None


def glue_dir_from_env() -> str | None:
    """The folder named by the ``GLUE_DIR`` environment variable, or None if it is unset or empty."""
    return os.environ.get(GLUE_DIR_ENV) or None


def check_glue_source(parser, args) -> None:
    """One GLUE data source among --data_dir (default $GLUE_DIR), --train_file with --validation_file and
    --dataset_name, for every recipe that reads GLUE; ``parser.error`` names what is wrong."""
    sources = [s for s in ("data_dir", "train_file", "dataset_name") if getattr(args, s)]
    if args.validation_file and "train_file" not in sources:
        sources.append("validation_file")
    if len(sources) > 1 and set(sources) != {"train_file", "validation_file"}:
        parser.error(f"give one data source, not several: got --{' and --'.join(sources)}")
    if not sources:
        args.data_dir = glue_dir_from_env()
        if args.data_dir is None:
            parser.error("no data: pass --data_dir (or set GLUE_DIR) to the folder holding CoLA/, SST-2/, ..., "
                         "or --train_file/--validation_file, or --dataset_name nyu-mll/glue")
    if args.train_file and not args.validation_file:
        parser.error("--train_file needs --validation_file (the dev metrics are the result)")


def load_glue(
    task: str,
    *,
    data_dir: str | os.PathLike | None = None,
    train_file: str | os.PathLike | None = None,
    validation_file: str | os.PathLike | None = None,
    hub_name: str | None = None,
) -> datasets.DatasetDict:
    """Load GLUE `task` from exactly one source (see the module docstring for the formats).

    Returns a DatasetDict with "train" (if the source has it) and the task's
    `validation_splits`. With files, `validation_file` is required and becomes the task's first
    validation split (for MNLI: "validation_matched"). Raises `GlueDataError` for unusable input.
    """
    spec = get_task(task)
    given = [
        name
        for name, value in [
            ("data_dir", data_dir),
            ("train_file/validation_file", train_file or validation_file),
            ("hub_name", hub_name),
        ]
        if value is not None
    ]
    if len(given) != 1:
        raise GlueDataError(
            "give exactly one GLUE data source: data_dir, train_file/validation_file or hub_name; "
            f"got {', '.join(given) if given else 'none'}"
        )
    if data_dir is not None:
        return _load_glue_dir(spec, Path(data_dir))
    if hub_name is not None:
        return _load_hub(spec, hub_name)
    if validation_file is None:
        raise GlueDataError(f"validation_file is required with train_file (got train_file={str(train_file)!r})")
    splits = {}
    if train_file is not None:
        splits["train"] = _read_table_file(spec, Path(train_file))
    splits[spec.validation_splits[0]] = _read_table_file(spec, Path(validation_file))
    return datasets.DatasetDict(splits)


# ---- original GLUE TSV distribution ---------------------------------------------------------


def _load_glue_dir(task: GlueTask, data_dir: Path) -> datasets.DatasetDict:
    hint = (f"{GLUE_DIR_ENV} / --data_dir must point at the folder holding CoLA/, SST-2/, MRPC/, ... "
            "(the original GLUE distribution)")
    if not data_dir.is_dir():
        raise GlueDataError(f"GLUE data folder {data_dir} does not exist; {hint}")
    task_dir = data_dir / task.dir_name
    if not task_dir.is_dir():
        if (data_dir / "dev.tsv").exists() or (data_dir / "train.tsv").exists():
            hint += f" -- {data_dir} looks like a task folder itself; pass its parent"
        raise GlueDataError(f"expected the {task.name} files in {task_dir}, which does not exist; {hint}")

    layout = _TSV_LAYOUTS[task.name]
    splits = {}
    train_path = task_dir / "train.tsv"
    if train_path.is_file():
        splits["train"] = _read_tsv(task, layout, train_path)
    else:  # some copies ship dev only (QNLI here); whether that is fatal is the caller's call
        logger.info("%s not found: %s has no train split", train_path, task.name)
    for split, file_name in zip(task.validation_splits, layout.dev_files):
        path = task_dir / file_name
        if not path.is_file():
            raise GlueDataError(f"{path} not found: it holds the {split} split of {task.name}")
        splits[split] = _read_tsv(task, layout, path)
    return datasets.DatasetDict(splits)


def _read_tsv(task: GlueTask, layout: _TsvLayout, path: Path) -> datasets.Dataset:
    texts: dict[str, list[str]] = {c: [] for c in task.text_columns}
    labels: list[Any] = []
    skipped = 0
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        fields = list(layout.fields) if layout.fields else next(reader, None)
        if fields is None:
            raise GlueDataError(f"{path} is empty; expected a GLUE {task.dir_name} file")
        missing = [s for s in layout.sources if s not in fields]
        if missing:
            raise GlueDataError(
                f"{path}: the header has no field(s) {missing}; a GLUE {task.dir_name} file has a header "
                f"with {list(layout.sources)}, this one has {fields}"
            )
        positions = [fields.index(s) for s in layout.sources]
        for row in reader:
            if not row:  # a blank line carries no example
                continue
            if len(row) != len(fields):
                if layout.skip_malformed:
                    skipped += 1
                    continue
                raise GlueDataError(
                    f"{path}, line {reader.line_num}: expected {len(fields)} tab-separated fields, "
                    f"found {len(row)}"
                )
            *row_texts, raw_label = (row[p] for p in positions)
            for column, text in zip(task.text_columns, row_texts):
                texts[column].append(text)
            labels.append(_parse_tsv_label(raw_label, layout, f"{path}, line {reader.line_num}"))
    if skipped:
        logger.warning("%s: skipped %d malformed row(s) with the wrong number of fields", path, skipped)
    return _to_dataset(task, texts, labels)


def _parse_tsv_label(raw: str, layout: _TsvLayout, where: str) -> int | float:
    if layout.label_values is None:
        return _parse_score(raw, where)
    try:
        return layout.label_values.index(raw)
    except ValueError:
        raise GlueDataError(f"{where}: label {raw!r} is not one of {list(layout.label_values)}") from None


def _parse_score(raw: Any, where: str) -> float:
    low, high = STSB_SCORE_RANGE
    try:
        score = float(raw)
    except (TypeError, ValueError):
        score = math.nan
    if isinstance(raw, bool) or not low <= score <= high:  # also rejects nan
        raise GlueDataError(f"{where}: label {raw!r} is not an STS-B score, a number in [{low:g}, {high:g}]")
    return score


# ---- csv / json files -----------------------------------------------------------------------

_FILE_BUILDERS = {".csv": "csv", ".json": "json", ".jsonl": "json"}


def _read_table_file(task: GlueTask, path: Path) -> datasets.Dataset:
    builder = _FILE_BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise GlueDataError(f"{path}: unsupported file type {path.suffix!r}; use {', '.join(_FILE_BUILDERS)}")
    if not path.is_file():
        raise GlueDataError(f"{path}: file not found")
    table = datasets.load_dataset(builder, data_files=str(path), split="train").to_dict()

    needed = [*task.text_columns, "label"]
    missing = [c for c in needed if c not in table]
    if missing:
        raise GlueDataError(
            f"{path}: missing column(s) {missing}; a {task.name} file needs {needed}, this one has {list(table)}"
        )
    for column in task.text_columns:
        for i, text in enumerate(table[column]):
            if not isinstance(text, str):  # e.g. an empty csv cell, which arrives as None
                raise GlueDataError(f"{path}, row {i + 1}: {column!r} is {text!r}, expected text")
    labels = [_parse_file_label(task, value, f"{path}, row {i + 1}") for i, value in enumerate(table["label"])]
    return _to_dataset(task, {c: table[c] for c in task.text_columns}, labels)


def _parse_file_label(task: GlueTask, value: Any, where: str) -> int | float:
    """A label id (int, integral float or digit string) or a label name; the score for STS-B."""
    if task.label_names is None:
        return _parse_score(value, where)
    names = task.label_names
    if isinstance(value, str) and value in names:
        return names.index(value)
    label_id = None
    if isinstance(value, int) and not isinstance(value, bool):
        label_id = value
    elif isinstance(value, float) and value.is_integer():
        label_id = int(value)
    elif isinstance(value, str) and value.strip().isdigit():
        label_id = int(value)
    if label_id is None or not 0 <= label_id < len(names):
        raise GlueDataError(
            f"{where}: label {value!r} is not valid for {task.name}; "
            f"use an id in 0..{len(names) - 1} or a name in {list(names)}"
        )
    return label_id


# ---- shared ----------------------------------------------------------------------------------


def _features(task: GlueTask) -> datasets.Features:
    if task.label_names is None:
        label = datasets.Value("float32")  # as in the HF glue dataset
    else:
        label = datasets.ClassLabel(names=list(task.label_names))
    text = {c: datasets.Value("string") for c in task.text_columns}
    return datasets.Features({**text, "label": label, "idx": datasets.Value("int32")})


def _to_dataset(task: GlueTask, texts: dict[str, list[str]], labels: list[Any]) -> datasets.Dataset:
    columns = {**texts, "label": labels, "idx": list(range(len(labels)))}
    return datasets.Dataset.from_dict(columns, features=_features(task))


def _load_hub(task: GlueTask, hub_name: str) -> datasets.DatasetDict:
    # The Hub's glue already has our column names, ClassLabel labels and idx; drop the unlabelled test split.
    raw = datasets.load_dataset(hub_name, task.name)
    keep = [*task.text_columns, "label", "idx"]
    return datasets.DatasetDict(
        {split: raw[split].select_columns(keep) for split in ("train", *task.validation_splits) if split in raw}
    )
