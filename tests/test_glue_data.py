"""Tests for adaptopt.data.glue: the real GLUE files, csv/json files, and every user error."""

import json
import logging
import os
import re
from pathlib import Path

import datasets
import pytest

from adaptopt.data.glue import _TSV_LAYOUTS, GLUE_TASKS, GlueDataError, glue_dir_from_env, load_glue

GLUE_DIR = Path(os.environ.get("GLUE_DIR") or Path(__file__).resolve().parents[2] / "shared/data/glue")

# task -> {split: (rows, label counts by id)}. Label counts are the official GLUE figures; they
# also pin the string -> id order (e.g. RTE "entailment" is 0).
REAL = {
    "cola": {"train": (8551, {0: 2528, 1: 6023}), "validation": (1043, {0: 322, 1: 721})},
    "sst2": {"train": (67349, {0: 29780, 1: 37569}), "validation": (872, {0: 428, 1: 444})},
    "mrpc": {"train": (3668, {0: 1194, 1: 2474}), "validation": (408, {0: 129, 1: 279})},
    "stsb": {"train": (5749, None), "validation": (1500, None)},
    "rte": {"train": (2490, {0: 1249, 1: 1241}), "validation": (277, {0: 146, 1: 131})},
    "wnli": {"train": (635, {0: 323, 1: 312}), "validation": (71, {0: 40, 1: 31})},
    "qnli": {"validation": (5463, {0: 2702, 1: 2761})},  # only dev.tsv is shipped here
}


@pytest.fixture(scope="module")
def real_glue():
    """Load each real task at most once (SST-2 train is the slow one)."""
    if not GLUE_DIR.is_dir():
        pytest.skip(f"real GLUE data not found at {GLUE_DIR} (set GLUE_DIR to the folder holding CoLA/, SST-2/, ...)")
    cache = {}

    def load(task):
        if task not in cache:
            cache[task] = load_glue(task, data_dir=GLUE_DIR)
        return cache[task]

    return load


# ---- the real GLUE files ----------------------------------------------------------------------


@pytest.mark.parametrize("task", list(REAL))
def test_real_task_loads(real_glue, task):
    spec, ds = GLUE_TASKS[task], real_glue(task)
    assert set(ds) == set(REAL[task])  # QNLI: no "train" split
    for split, (rows, label_counts) in REAL[task].items():
        d = ds[split]
        assert d.num_rows == rows
        assert d.column_names == [*spec.text_columns, "label", "idx"]
        assert d["idx"] == list(range(rows))
        assert all(isinstance(t, str) and t for c in spec.text_columns for t in d[c])
        labels = d["label"]
        if spec.is_regression:
            assert d.features["label"] == datasets.Value("float32")
            assert 0.0 <= min(labels) and max(labels) <= 5.0
            assert any(x != int(x) for x in labels)  # real scores, not rounded to classes
        else:
            assert d.features["label"] == datasets.ClassLabel(names=list(spec.label_names))
            assert {i: labels.count(i) for i in set(labels)} == label_counts


def test_real_mrpc_bom_and_literal_quotes(real_glue):
    # Without utf-8-sig the header's first field is "\ufeffQuality" and the label is not found.
    # Quotes are text (QUOTE_NONE): this row opens a quote it never closes.
    row = real_glue("mrpc")["validation"][0]
    assert row["label"] == 1
    assert row["sentence2"] == '"The foodservice pie business does not fit our long-term growth strategy.'


def test_real_stsb_reads_score_column_by_header(real_glue):
    d = real_glue("stsb")["validation"]
    assert d[0]["sentence1"] == "A man with a hard hat is dancing."
    assert d[0]["label"] == 5.0
    assert d[-1]["label"] == 0.0
    assert sum(d["label"]) == pytest.approx(3545.8613, abs=1e-2)


# ---- synthetic GLUE folders: MNLI, QQP and the error cases -------------------------------------


def write_tsv(path: Path, lines: list[list[str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join("\t".join(fields) + "\n" for fields in lines), encoding="utf-8")


RTE_HEADER = ["index", "sentence1", "sentence2", "label"]


def write_rte(root: Path, dev_rows: list[list[str]]) -> None:
    write_tsv(root / "RTE" / "train.tsv", [RTE_HEADER, ["0", "A b.", "A.", "entailment"]])
    write_tsv(root / "RTE" / "dev.tsv", [RTE_HEADER, *dev_rows])


def test_mnli_layout_train_12_fields_dev_16_fields(tmp_path):
    head = ["index", "promptID", "pairID", "genre", "s1_bin", "s2_bin", "s1_parse", "s2_parse",
            "sentence1", "sentence2"]
    train = [[*head, "label1", "gold_label"],
             ["0", "1", "1e", "gov", "-", "-", "-", "-", "P one.", "H one.", "neutral", "neutral"],
             ["1", "2", "2c", "gov", "-", "-", "-", "-", "P two.", "H two.", "contradiction", "contradiction"]]
    dev = [[*head, "label1", "label2", "label3", "label4", "label5", "gold_label"],
           ["0", "3", "3e", "fic", "-", "-", "-", "-", "P three.", "H three.", *["entailment"] * 6]]
    write_tsv(tmp_path / "MNLI" / "train.tsv", train)
    write_tsv(tmp_path / "MNLI" / "dev_matched.tsv", dev)
    write_tsv(tmp_path / "MNLI" / "dev_mismatched.tsv", dev)
    ds = load_glue("mnli", data_dir=tmp_path)
    assert set(ds) == {"train", "validation_matched", "validation_mismatched"}
    assert ds["train"]["premise"] == ["P one.", "P two."]
    assert ds["train"]["hypothesis"] == ["H one.", "H two."]
    assert ds["train"]["label"] == [1, 2]  # neutral, contradiction
    assert ds["validation_mismatched"][0] == {"premise": "P three.", "hypothesis": "H three.", "label": 0, "idx": 0}


def test_qqp_skips_malformed_rows_with_a_warning(tmp_path, caplog):
    header = ["id", "qid1", "qid2", "question1", "question2", "is_duplicate"]
    rows = [header, ["0", "1", "2", "Q1?", "Q2?", "1"], ["1", "3", "4", "broken"], ["2", "5", "6", "Q5?", "Q6?", "0"]]
    write_tsv(tmp_path / "QQP" / "train.tsv", rows)
    write_tsv(tmp_path / "QQP" / "dev.tsv", rows[:2])
    with caplog.at_level(logging.WARNING, logger="adaptopt.data.glue"):
        ds = load_glue("qqp", data_dir=tmp_path)
    assert ds["train"]["question1"] == ["Q1?", "Q5?"]
    assert ds["train"]["label"] == [1, 0]
    assert ds["train"]["idx"] == [0, 1]  # idx counts kept rows
    assert "skipped 1 malformed row" in caplog.text


def test_malformed_row_raises_outside_qqp(tmp_path):
    write_rte(tmp_path, [["0", "A.", "B.", "entailment"], ["1", "only two"]])
    with pytest.raises(GlueDataError, match=r"RTE/dev\.tsv, line 3: expected 4 tab-separated fields, found 2"):
        load_glue("rte", data_dir=tmp_path)


def test_label_outside_label_set(tmp_path):
    write_rte(tmp_path, [["0", "A.", "B.", "maybe"]])
    expected = r"dev\.tsv, line 2: label 'maybe' is not one of \['entailment', 'not_entailment'\]"
    with pytest.raises(GlueDataError, match=expected):
        load_glue("rte", data_dir=tmp_path)


@pytest.mark.parametrize("score", ["7.5", "-1", "high", "nan"])
def test_stsb_score_outside_range(tmp_path, score):
    head = ["index", "genre", "filename", "year", "old_index", "source1", "source2", "sentence1", "sentence2", "score"]
    write_tsv(tmp_path / "STS-B" / "dev.tsv", [head, ["0", "g", "f", "y", "0", "n", "n", "A.", "B.", score]])
    with pytest.raises(GlueDataError, match=rf"line 2: label '{score}' is not an STS-B score, a number in \[0, 5\]"):
        load_glue("stsb", data_dir=tmp_path)


def test_header_without_needed_fields(tmp_path):
    write_tsv(tmp_path / "SST-2" / "dev.tsv", [["text", "label"], ["good .", "1"]])
    with pytest.raises(GlueDataError, match=r"header has no field\(s\) \['sentence'\]"):
        load_glue("sst2", data_dir=tmp_path)


def test_missing_train_gives_no_train_split(tmp_path):
    write_tsv(tmp_path / "WNLI" / "dev.tsv", [RTE_HEADER, ["0", "A.", "B.", "1"]])
    assert set(load_glue("wnli", data_dir=tmp_path)) == {"validation"}


def test_missing_dev_file(tmp_path):
    write_tsv(tmp_path / "RTE" / "train.tsv", [RTE_HEADER, ["0", "A.", "B.", "entailment"]])
    with pytest.raises(GlueDataError, match=r"RTE/dev\.tsv not found: it holds the validation split of rte"):
        load_glue("rte", data_dir=tmp_path)


def test_missing_data_dir(tmp_path):
    missing = tmp_path / "nope"
    expected = re.escape(f"{missing} does not exist; GLUE_DIR / --data_dir must point at the folder holding CoLA/")
    with pytest.raises(GlueDataError, match=expected):
        load_glue("rte", data_dir=missing)


def test_missing_task_dir(tmp_path):
    expected = rf"expected the rte files in {re.escape(str(tmp_path / 'RTE'))}, which does not exist; GLUE_DIR"
    with pytest.raises(GlueDataError, match=expected):
        load_glue("rte", data_dir=tmp_path)


def test_task_dir_passed_as_data_dir(tmp_path):
    write_rte(tmp_path, [["0", "A.", "B.", "entailment"]])
    with pytest.raises(GlueDataError, match="looks like a task folder itself; pass its parent"):
        load_glue("rte", data_dir=tmp_path / "RTE")


def test_unknown_task():
    expected = "unknown GLUE task 'sst-2'; valid tasks: cola, sst2, mrpc, stsb, qqp, mnli, qnli, rte, wnli"
    with pytest.raises(GlueDataError, match=expected):
        load_glue("sst-2", data_dir="/unused")


@pytest.mark.parametrize(
    "kwargs, got",
    [({}, "none"), ({"data_dir": "d", "hub_name": "nyu-mll/glue"}, "data_dir, hub_name"),
     ({"data_dir": "d", "validation_file": "v.csv"}, "data_dir, train_file/validation_file")],
)
def test_exactly_one_source(kwargs, got):
    with pytest.raises(GlueDataError, match=f"give exactly one GLUE data source.*; got {got}$"):
        load_glue("rte", **kwargs)


def test_train_file_needs_validation_file(tmp_path):
    with pytest.raises(GlueDataError, match="validation_file is required with train_file"):
        load_glue("rte", train_file=tmp_path / "train.csv")


# ---- csv / json files ------------------------------------------------------------------------


def test_csv_files(tmp_path):
    (tmp_path / "train.csv").write_text(
        'sentence1,sentence2,label,extra\n"A, quoted.",B.,entailment,x\nC.,D.,1,y\n', encoding="utf-8")
    (tmp_path / "dev.csv").write_text("sentence1,sentence2,label\nE.,F.,0\n", encoding="utf-8")
    ds = load_glue("rte", train_file=tmp_path / "train.csv", validation_file=tmp_path / "dev.csv")
    assert set(ds) == {"train", "validation"}
    assert ds["train"].column_names == ["sentence1", "sentence2", "label", "idx"]  # "extra" dropped
    assert ds["train"]["sentence1"] == ["A, quoted.", "C."]
    assert ds["train"]["label"] == [0, 1]  # a label name or an id
    assert ds["validation"][0] == {"sentence1": "E.", "sentence2": "F.", "label": 0, "idx": 0}
    assert ds["train"].features == ds["validation"].features


def test_json_and_jsonl_files(tmp_path):
    rows = [{"sentence1": "A.", "sentence2": "B.", "label": 4.2}, {"sentence1": "C.", "sentence2": "D.", "label": 0}]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    (tmp_path / "dev.json").write_text(json.dumps(rows), encoding="utf-8")
    ds = load_glue("stsb", train_file=str(tmp_path / "train.jsonl"), validation_file=str(tmp_path / "dev.json"))
    for split in ("train", "validation"):
        assert ds[split]["label"] == pytest.approx([4.2, 0.0])
        assert ds[split].features["label"] == datasets.Value("float32")
        assert ds[split]["idx"] == [0, 1]


def test_mnli_validation_file_is_the_matched_split(tmp_path):
    (tmp_path / "dev.jsonl").write_text(json.dumps({"premise": "P.", "hypothesis": "H.", "label": "neutral"}) + "\n")
    ds = load_glue("mnli", validation_file=tmp_path / "dev.jsonl")
    assert set(ds) == {"validation_matched"}
    assert ds["validation_matched"]["label"] == [1]


def test_file_missing_columns(tmp_path):
    (tmp_path / "dev.csv").write_text("sentence,target\nA.,1\n", encoding="utf-8")
    with pytest.raises(GlueDataError, match=r"dev\.csv: missing column\(s\) \['sentence1', 'sentence2', 'label'\]"):
        load_glue("mrpc", validation_file=tmp_path / "dev.csv")


@pytest.mark.parametrize("label", ["2", "equal", "-1"])
def test_file_label_outside_label_set(tmp_path, label):
    (tmp_path / "dev.csv").write_text(f"sentence1,sentence2,label\nA.,B.,1\nC.,D.,{label}\n", encoding="utf-8")
    with pytest.raises(GlueDataError, match=r"dev\.csv, row 2: label .* is not valid for mrpc; use an id in 0\.\.1 "
                                            r"or a name in \['not_equivalent', 'equivalent'\]"):
        load_glue("mrpc", validation_file=tmp_path / "dev.csv")


def test_file_empty_text_cell(tmp_path):
    (tmp_path / "dev.csv").write_text("sentence,label\ngood.,1\n,0\n", encoding="utf-8")
    with pytest.raises(GlueDataError, match=r"dev\.csv, row 2: 'sentence' is None, expected text"):
        load_glue("sst2", validation_file=tmp_path / "dev.csv")


def test_file_not_found_and_bad_extension(tmp_path):
    with pytest.raises(GlueDataError, match=r"dev\.csv: file not found"):
        load_glue("sst2", validation_file=tmp_path / "dev.csv")
    with pytest.raises(GlueDataError, match=r"unsupported file type '\.tsv'; use \.csv, \.json, \.jsonl"):
        load_glue("sst2", validation_file=tmp_path / "dev.tsv")


# ---- the task table --------------------------------------------------------------------------


def test_task_table_is_consistent():
    assert list(GLUE_TASKS) == ["cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte", "wnli"]
    assert set(_TSV_LAYOUTS) == set(GLUE_TASKS)
    for name, task in GLUE_TASKS.items():
        layout = _TSV_LAYOUTS[name]
        assert task.name == name
        assert len(layout.dev_files) == len(task.validation_splits)
        assert len(layout.sources) == len(task.text_columns) + 1
        assert task.is_regression == (layout.label_values is None) == (name == "stsb")
        if not task.is_regression:
            assert len(layout.label_values) == len(task.label_names) == task.num_labels
    assert GLUE_TASKS["stsb"].num_labels == 1


def test_glue_dir_from_env(monkeypatch):
    monkeypatch.setenv("GLUE_DIR", "/data/glue")
    assert glue_dir_from_env() == "/data/glue"
    monkeypatch.setenv("GLUE_DIR", "")
    assert glue_dir_from_env() is None
    monkeypatch.delenv("GLUE_DIR")
    assert glue_dir_from_env() is None
