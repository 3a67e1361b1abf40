"""adaptopt/data/text2text.py: GLUE written as T5 writes it (every task, on the real files where they are here),
STS-B's rounded score strings, .jsonl pairs and their errors, and generated answers mapped back to labels through
the real MiniLM WordPiece tokenizer (uncased: it writes "not_equivalent" back as "not _ equivalent")."""
import json

import datasets
import pytest

from adaptopt.data.glue import GLUE_TASKS, load_glue
from adaptopt.data.text2text import (STSB_TARGETS, AnswerMap, Text2TextDataError, glue_as_text2text, glue_source,
                                     glue_target, load_pairs, read_pairs, round_trip, stsb_target)


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from adaptopt.models import default_model_path

    return AutoTokenizer.from_pretrained(default_model_path())


# One row per task with T5's input text for it, written out by hand (Raffel et al. 2020, appendix D).
ROWS = {
    "cola": ({"sentence": "S."}, "cola sentence: S."),
    "sst2": ({"sentence": "S."}, "sst2 sentence: S."),
    "mrpc": ({"sentence1": "A.", "sentence2": "B."}, "mrpc sentence1: A. sentence2: B."),
    "stsb": ({"sentence1": "A.", "sentence2": "B."}, "stsb sentence1: A. sentence2: B."),
    "qqp": ({"question1": "A?", "question2": "B?"}, "qqp question1: A? question2: B?"),
    "mnli": ({"premise": "P.", "hypothesis": "H."}, "mnli hypothesis: H. premise: P."),
    "qnli": ({"question": "Q?", "sentence": "S."}, "qnli question: Q? sentence: S."),
    "rte": ({"sentence1": "A.", "sentence2": "B."}, "rte sentence1: A. sentence2: B."),
    "wnli": ({"sentence1": "A.", "sentence2": "B."}, "wnli sentence1: A. sentence2: B."),
}
TARGETS = {
    "cola": ["unacceptable", "acceptable"], "sst2": ["negative", "positive"],
    "mrpc": ["not_equivalent", "equivalent"], "qqp": ["not_duplicate", "duplicate"],
    "mnli": ["entailment", "neutral", "contradiction"], "qnli": ["entailment", "not_entailment"],
    "rte": ["entailment", "not_entailment"], "wnli": ["not_entailment", "entailment"],
}


@pytest.mark.parametrize("task", list(GLUE_TASKS))
def test_every_task_is_written_as_t5_writes_it(task):
    row, source = ROWS[task]
    assert glue_source(GLUE_TASKS[task], row) == source
    if task != "stsb":
        assert [glue_target(GLUE_TASKS[task], i) for i in range(len(TARGETS[task]))] == TARGETS[task]


def test_real_dev_rows_become_source_and_target(glue_dir):
    mrpc = glue_as_text2text("mrpc", load_glue("mrpc", data_dir=glue_dir))
    first = mrpc["validation"][0]
    assert first["source"] == ("mrpc sentence1: He said the foodservice pie business doesn't fit the company's "
                               "long-term growth strategy. sentence2: \"The foodservice pie business does not fit our "
                               "long-term growth strategy.")
    assert first["target"] == "equivalent" and first["label"] == 1 and first["idx"] == 0
    assert mrpc["validation"].column_names == ["label", "idx", "source", "target"]
    assert set(mrpc["train"]["target"]) == {"equivalent", "not_equivalent"}
    stsb = glue_as_text2text("stsb", load_glue("stsb", data_dir=glue_dir))
    assert stsb["validation"][0]["source"] == ("stsb sentence1: A man with a hard hat is dancing. "
                                               "sentence2: A man wearing a hard hat is dancing.")
    assert set(stsb["train"]["target"]) <= set(STSB_TARGETS)
    assert len(set(stsb["train"]["target"])) == 26  # the real scores reach every step of 0.2


@pytest.mark.parametrize("score, target", [
    (0.0, "0.0"), (5.0, "5.0"), (3.8, "3.8"), (4.1, "4.0"), (3.9, "4.0"),
    (0.5, "0.4"), (1.5, "1.6"),  # x * 5 = 2.5 and 7.5: half to even
    (2.3, "2.4"), (0.7, "0.8"),  # 11.5 and 3.5 in float32 (a float64 product gives 11.4999 and 3.4999: "2.2", "0.6")
])
def test_stsb_target_is_t5s_rounded_score(score, target):
    assert stsb_target(score) == target
    # the score as the GLUE loader stores it (float32) and reads it back (a Python float) gives the same
    stored = datasets.Dataset.from_dict({"label": [score]}, features=datasets.Features(
        {"label": datasets.Value("float32")}))[0]["label"]
    assert stsb_target(stored) == target


@pytest.mark.parametrize("task", list(GLUE_TASKS))
def test_labels_survive_the_tokenizer_both_ways(task, tokenizer):
    """label -> target text -> token ids -> generated text -> label, for every label of every task."""
    spec = GLUE_TASKS[task]
    answers = AnswerMap(spec, tokenizer)
    if spec.is_regression:
        for target in STSB_TARGETS:
            ids = tokenizer(text_target=target)["input_ids"]
            assert answers.label(tokenizer.decode(ids, skip_special_tokens=True)) == float(target)
            assert answers.label(target) == float(target)  # what a T5 SentencePiece tokenizer gives back
        return
    for label in range(len(spec.label_names)):
        target = glue_target(spec, label)
        generated = tokenizer.decode(tokenizer(text_target=target)["input_ids"], skip_special_tokens=True)
        assert answers.label(generated) == label
        assert answers.label(target) == label
        assert answers.label(f"  {generated}\n") == label  # whitespace around an answer does not matter


def test_uncased_wordpiece_writes_labels_back_spaced(tokenizer):
    """The reason labels are matched through the tokenizer's own round trip, not as written."""
    assert round_trip(tokenizer, "not_equivalent") == "not _ equivalent"
    assert round_trip(tokenizer, "3.8") == "3. 8"


def test_answers_that_are_no_label_are_invalid_and_scored_wrong(tokenizer):
    mrpc = AnswerMap(GLUE_TASKS["mrpc"], tokenizer)
    for text in ["", "maybe", "equivalent equivalent", "not", "Equivalent", "not_equivalent."]:
        assert mrpc.label(text) is None, text
    predictions, invalid = mrpc.score(["equivalent", "maybe", "", "not _ equivalent"], [1, 1, 0, 0])
    assert predictions == [1, 0, 1, 0] and invalid == 2  # an invalid answer is never the reference
    mnli = AnswerMap(GLUE_TASKS["mnli"], tokenizer)
    predictions, invalid = mnli.score(["x", "x", "x", "neutral"], [0, 1, 2, 2])
    assert predictions == [1, 2, 0, 1] and invalid == 3

    stsb = AnswerMap(GLUE_TASKS["stsb"], tokenizer)
    assert stsb.label("3.85") == 3.85 and stsb.label(" 4 ") == 4.0  # any number in [0, 5], as T5's float()
    for text in ["", "high", "5.2", "-0.2", "nan", "3. 85"]:
        assert stsb.label(text) is None, text
    predictions, invalid = stsb.score(["2.4", "high", "high", "7"], [2.3, 4.0, 1.0, 2.5])
    assert predictions == [2.4, 0.0, 5.0, 0.0] and invalid == 3  # the far end of [0, 5] from the reference


def test_a_tokenizer_that_cannot_tell_labels_apart_is_refused(tmp_path):
    """A word-level tokenizer that knows neither label name writes both back as [UNK]."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    word_level = Tokenizer(models.WordLevel({"[UNK]": 0, "[PAD]": 1, "yes": 2}, unk_token="[UNK]"))
    word_level.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=word_level, unk_token="[UNK]", pad_token="[PAD]")
    with pytest.raises(Text2TextDataError, match="'not_equivalent' and 'equivalent' as the same text"):
        AnswerMap(GLUE_TASKS["mrpc"], tokenizer)


def test_an_unknown_task_names_the_valid_ones(glue_dir):
    raw = load_glue("rte", data_dir=glue_dir)
    with pytest.raises(Text2TextDataError, match="unknown GLUE task 'rtee'; valid tasks: cola, sst2"):
        glue_as_text2text("rtee", raw)


# ---- .jsonl pairs ------------------------------------------------------------------------------------


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_pairs_load_with_their_columns_prefix_and_idx(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl",
                        [{"q": "Where?", "a": "Here.", "id": 7}, "", {"q": "Who?", "a": "Me"}])
    valid = write_jsonl(tmp_path / "valid.jsonl", [{"q": "When?", "a": "Now"}])
    assert read_pairs(train, "q", "a") == (["Where?", "Who?"], ["Here.", "Me"])  # the blank line is skipped
    raw = load_pairs(train, valid, source_column="q", target_column="a", source_prefix="question: ")
    assert raw["train"].column_names == ["source", "target", "idx"]
    assert raw["train"]["source"] == ["question: Where?", "question: Who?"] and raw["train"]["idx"] == [0, 1]
    assert raw["validation"][0] == {"source": "question: When?", "target": "Now", "idx": 0}


@pytest.mark.parametrize("case, rows, message", [
    ("empty_target", [{"source": "a", "target": "b"}, {"source": "c", "target": "  "}],
     r"pairs.jsonl line 2: empty target: the model would learn to generate nothing"),
    ("empty_source", [{"source": "", "target": "b"}], r"pairs.jsonl line 1: empty source"),
    ("missing_field", [{"input": "a", "target": "b"}],
     r"line 1: no 'source' field \(found \['input', 'target'\]\); pass --source_column"),
    ("not_text", [{"source": "a", "target": 3}], r"line 1: 'target' is a int, not a string"),
    ("bad_json", ['{"source": "a", "target": '], r"line 1: not valid JSON"),
    ("not_an_object", ['["a", "b"]'], r"line 1: expected a JSON object, got a JSON list"),
    ("no_pairs", ["", "  "], r"holds no source/target pairs"),
])
def test_bad_pairs_name_the_file_the_line_and_the_fix(case, rows, message, tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    with pytest.raises(Text2TextDataError, match=message):
        read_pairs(path)


def test_pairs_need_an_existing_jsonl_file(tmp_path):
    with pytest.raises(Text2TextDataError, match="nope.jsonl: file not found"):
        read_pairs(tmp_path / "nope.jsonl")
    (tmp_path / "pairs.csv").write_text("source,target\na,b\n")
    with pytest.raises(Text2TextDataError, match=r"read from .jsonl files .* not '.csv'"):
        read_pairs(tmp_path / "pairs.csv")
