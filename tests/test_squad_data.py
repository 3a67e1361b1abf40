"""adaptopt/data/squad.py: loading the real SQuAD files, windows and their labels, and answers back
from logits (a round trip through oracle logits on the real data), with hand-built decoding cases;
SQuAD v2.0 (unanswerable questions, null score threshold) the same ways."""
import json
from collections import Counter

import numpy as np
import pytest

from adaptopt.data.squad import (SquadDataError, best_answers, eval_features, is_squad_v2_file, load_squad,
                                 read_squad_file, train_features)


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from adaptopt.models import default_model_path

    return AutoTokenizer.from_pretrained(default_model_path())


def test_real_halves_load_whole_and_disjoint(squad_dir):
    raw = load_squad(squad_dir / "test-v1.1-part.json", squad_dir / "dev-v1.1-part.json")
    assert (len(raw["train"]), len(raw["validation"])) == (5609, 4961)  # data/README.md
    assert raw["train"].column_names == ["id", "title", "context", "question", "answers"]
    assert not set(raw["train"]["id"]) & set(raw["validation"]["id"])
    first = raw["validation"][0]
    assert first["title"] == "Super_Bowl_50" and first["answers"]["text"][0] == "Denver Broncos"


def windows(rows, tokenizer, **size):
    import datasets

    ds = datasets.Dataset.from_list(rows)
    train = ds.map(lambda b: train_features(b, tokenizer, **size), batched=True, remove_columns=ds.column_names)
    evals = ds.map(lambda b, i: eval_features(b, tokenizer, indices=i, **size), batched=True, with_indices=True,
                   remove_columns=ds.column_names)
    return ds, train, evals


def test_oracle_logits_from_the_labels_decode_to_the_gold_answers(squad_dir, tokenizer):
    """Logits that peak at each training window's labels must decode to the first gold answer. Short
    windows (96 tokens, stride 24) put many answers across window edges and many windows on one question."""
    rows = read_squad_file(squad_dir / "dev-v1.1-part.json")[:600]
    ds, train, evals = windows(rows, tokenizer, max_length=96, stride=24)
    assert train["input_ids"] == evals["input_ids"]  # the same windows, labelled and unlabelled
    assert len(evals) > 2 * len(ds)  # several windows per question
    assert 0 < np.mean(np.array(train["start_positions"]) == 0) < 0.9  # [CLS]: answer not in that window
    starts, ends = [], []
    for s, e, ids in zip(train["start_positions"], train["end_positions"], train["input_ids"]):
        a, b = np.zeros(len(ids)), np.zeros(len(ids))
        a[s], b[e] = 10.0, 10.0
        starts.append(a)
        ends.append(b)
    answers = best_answers(ds, evals, starts, ends, max_answer_length=30)
    gold = {r["id"]: r["answers"]["text"][0] for r in rows}
    exact = sum(answers[q] == gold[q] for q in gold)
    assert exact >= 0.98 * len(rows), exact
    for q, g in gold.items():
        # The only misses: a gold answer that starts or ends inside a word piece (the span is the whole
        # piece, so it contains the answer), or one longer than max_answer_length.
        assert g in answers[q] or len(tokenizer(g, add_special_tokens=False)["input_ids"]) > 30, (g, answers[q])


def make_unanswerable(data: dict, article: int, donor: int, n: int) -> list[str]:
    """SQuAD v2.0 from v1.1 (the real v2.0 set is not available here): moves the first n questions of
    article ``donor`` into the paragraphs of article ``article`` (round robin) as unanswerable ones,
    ``"is_impossible": true`` with no answers; they are about another article, so the paragraph cannot
    answer them. Returns their ids; ``data`` (official layout) is changed in place."""
    moved = []
    for paragraph in data["data"][donor]["paragraphs"]:
        take = paragraph["qas"][:n - len(moved)]
        paragraph["qas"] = paragraph["qas"][len(take):]
        moved += take
    targets = data["data"][article]["paragraphs"]
    for i, qa in enumerate(moved):
        targets[i % len(targets)]["qas"].append(dict(qa, answers=[], is_impossible=True))
    data["version"] = "v2.0"
    return [qa["id"] for qa in moved]


def test_v2_oracle_logits_decode_to_no_answer_for_unanswerable_questions(squad_dir, tokenizer, tmp_path):
    """SQuAD v2.0 round trip: every window of an unanswerable question is labelled [CLS], and logits that
    peak at the labels decode to "" for those and to the v1.1 answer for the others, though windows of
    an answerable question without its answer peak at [CLS] too (the null score is their minimum)."""
    data = json.loads((squad_dir / "dev-v1.1-part.json").read_text())
    data["data"] = data["data"][:3]
    data["data"][0]["paragraphs"] = data["data"][0]["paragraphs"][:20]
    impossible = set(make_unanswerable(data, 0, 2, 80))
    (tmp_path / "v2.json").write_text(json.dumps(data))
    assert is_squad_v2_file(tmp_path / "v2.json")
    rows = read_squad_file(tmp_path / "v2.json", version_2_with_negative=True)
    rows = [r for r in rows if r["title"] == "Super_Bowl_50"]  # its own questions and the moved ones
    assert sum(r["id"] in impossible for r in rows) == 80 and all(
        (not r["answers"]["text"]) == (r["id"] in impossible) for r in rows)
    ds, train, evals = windows(rows, tokenizer, max_length=96, stride=24)
    assert train["input_ids"] == evals["input_ids"]
    example_of = list(evals["example_index"])
    labels = list(zip(train["start_positions"], train["end_positions"]))
    assert all(labels[f] == (0, 0) for f, i in enumerate(example_of) if rows[i]["id"] in impossible)
    # answerable questions over several windows, of which some lack the answer: [CLS] there too
    windows_of = Counter(example_of)
    assert sum(windows_of[i] > 1 and rows[i]["id"] not in impossible for i in windows_of) > 50
    starts, ends = [], []
    for (s, e), ids in zip(labels, train["input_ids"]):
        a, b = np.zeros(len(ids)), np.zeros(len(ids))
        a[s], b[e] = 10.0, 10.0
        starts.append(a)
        ends.append(b)
    v2 = best_answers(ds, evals, starts, ends, version_2_with_negative=True)
    v1 = best_answers(ds, evals, starts, ends)
    for q in v2:
        if q in impossible:
            assert v2[q] == ""
        else:  # every answer is wholly in some window here: the v1.1 answer, 98% the gold one (test above)
            assert v2[q] == v1[q] != "", q


def test_long_questions_are_cut_to_leave_the_context_room(tokenizer):
    question = "which of the many long words in this question is the one that matters " * 4
    context = "alpha beta gamma delta " * 40
    rows = [dict(id="q", title="", question=question, context=context,
                 answers=dict(text=["gamma"], answer_start=[context.index("gamma")]))]
    _, train, evals = windows(rows, tokenizer, max_length=64, stride=16, max_question_length=20)
    first = train[0]
    assert first["input_ids"].index(tokenizer.sep_token_id) == 21  # [CLS] + 20 question tokens
    assert tokenizer.decode(first["input_ids"][first["start_positions"]:first["end_positions"] + 1]) == "gamma"
    assert all(len(ids) <= 64 for ids in train["input_ids"])
    with pytest.raises(SquadDataError, match="leaves no room for the question"):
        windows(rows, tokenizer, max_length=40, stride=37)


# -- decoding, on hand-built windows -------------------------------------------------------------------
CONTEXT = "aa bb cc dd ee"
# token k of the window covers CONTEXT[3k-3 : 3k-1] for k = 1..5; tokens 0 and 6 are outside the context
OFFSETS = [None, [0, 2], [3, 5], [6, 8], [9, 11], [12, 14], None]


def decode(start, end, windows_of=(0,), offsets=None, **kw):
    import datasets

    examples = datasets.Dataset.from_list([dict(id="q0", context=CONTEXT)])
    features = datasets.Dataset.from_list([dict(example_index=e, offset_mapping=offsets or OFFSETS)
                                           for e in windows_of])
    return best_answers(examples, features, [np.asarray(s, float) for s in start],
                        [np.asarray(e, float) for e in end], **kw)["q0"]


def test_best_span_is_the_highest_start_plus_end_over_windows():
    assert decode([[0, 1, 5, 0, 0, 0, 0]], [[0, 0, 0, 4, 1, 0, 0]]) == "bb cc"
    # a second window of the same question with a higher-scoring span wins
    assert decode([[0, 1, 5, 0, 0, 0, 0], [0, 0, 0, 0, 0, 6, 0]],
                  [[0, 0, 0, 4, 1, 0, 0], [0, 0, 0, 0, 0, 4, 0]], windows_of=(0, 0)) == "ee"


def test_invalid_spans_are_never_chosen():
    # the best start (dd) is after the best end (cc): the best valid pair is (bb, cc)
    assert decode([[-9, 1, 2, -9, 9, -9, -9]], [[-9, -9, -9, 3, -9, -9, -9]]) == "bb cc"
    # the best logits sit on [CLS] and [SEP], outside the context
    assert decode([[9, 0, 1, 0, 0, 0, 9]], [[9, 0, 0, 1, 0, 0, 9]]) == "bb cc"
    # (aa, ee) scores 10 but has 5 tokens: the best span of at most 3 is (cc, ee), 7
    assert decode([[0, 5, 0, 2, 0, 0, 0]], [[0, 0, 0, 1, 0, 5, 0]], max_answer_length=3) == "cc dd ee"
    # logits beyond the window's own tokens (padding of a batch) are not read
    assert decode([[0, 1, 0, 0, 0, 0, 0, 99]], [[0, 1, 0, 0, 0, 0, 0, 99]]) == "aa"


def test_n_best_limits_the_candidates_and_no_valid_span_gives_the_empty_answer():
    # with n_best=1 only the top start (dd) and the top end (aa) are tried: no valid span
    assert decode([[0, 0, 0, 0, 3, 0, 0]], [[0, 3, 0, 0, 0, 1, 0]], n_best=1) == ""
    # n_best=2 adds the second-best end (ee)
    assert decode([[0, 0, 0, 0, 3, 0, 0]], [[0, 3, 0, 0, 0, 1, 0]], n_best=2) == "dd ee"


# -- SQuAD v2.0: the null score against the best span ----------------------------------------------------
def test_v2_answers_nothing_when_cls_beats_the_best_span_by_more_than_the_threshold():
    # null score 3 + 3 = 6; the best span (aa, bb) 2 + 2 = 4: null - best = 2
    cls_wins = ([[3, 2, 0, 0, 0, 0, 0]], [[3, 0, 2, 0, 0, 0, 0]])
    assert decode(*cls_wins, version_2_with_negative=True) == ""
    assert decode(*cls_wins, version_2_with_negative=True, null_score_diff_threshold=1.5) == ""
    assert decode(*cls_wins, version_2_with_negative=True, null_score_diff_threshold=2.0) == "aa bb"  # not above it
    assert decode(*cls_wins) == "aa bb"  # SQuAD v1.1: [CLS] is never an answer
    # a real span that beats [CLS]: 5 + 5 = 10 against 1 + 1 = 2
    span_wins = ([[1, 5, 0, 0, 0, 0, 0]], [[1, 0, 5, 0, 0, 0, 0]])
    assert decode(*span_wins, version_2_with_negative=True) == "aa bb"
    # ... unless the threshold is below -8
    assert decode(*span_wins, version_2_with_negative=True, null_score_diff_threshold=-8.5) == ""
    assert decode(*span_wins, version_2_with_negative=True, null_score_diff_threshold=-7.5) == "aa bb"


def test_v2_null_score_is_the_lowest_over_the_windows_of_a_question():
    # window 1: [CLS] 5 + 5 = 10 beats its best span (bb) 3 + 3 = 6; window 2: [CLS] 0 + 0, its span (ee) 4 + 4
    one = ([0, 0, 0, 0, 0, 4, 0], [0, 0, 0, 0, 0, 4, 0])
    two = ([5, 0, 3, 0, 0, 0, 0], [5, 0, 3, 0, 0, 0, 0])
    assert decode([two[0]], [two[1]], version_2_with_negative=True) == ""  # window 1 alone: no answer
    # together the null score is min(10, 0) = 0 and the best span ee (8): the answer is ee, in either order
    assert decode([two[0], one[0]], [two[1], one[1]], windows_of=(0, 0), version_2_with_negative=True) == "ee"
    assert decode([one[0], two[0]], [one[1], two[1]], windows_of=(0, 0), version_2_with_negative=True) == "ee"
    # the best span comes from one window and the null score from another: min null 0 (window 2) against
    # window 1's span bb (9 + 9 = 18) when window 2's best span scores only 1 + 1
    three = ([5, 0, 9, 0, 0, 0, 0], [5, 0, 9, 0, 0, 0, 0])
    four = ([0, 0, 0, 0, 0, 1, 0], [0, 0, 0, 0, 0, 1, 0])
    assert decode([three[0], four[0]], [three[1], four[1]], windows_of=(0, 0), version_2_with_negative=True) == "bb"


def test_v2_without_a_valid_span_the_answer_is_empty_whatever_the_null_score():
    # n_best=1 leaves no valid span (as in the v1.1 case above), and [CLS] scores far below everything
    assert decode([[-50, 0, 0, 0, 3, 0, 0]], [[-50, 3, 0, 0, 0, 1, 0]], n_best=1, version_2_with_negative=True) == ""


# -- input a user can get wrong ----------------------------------------------------------------------------
def squad_json(tmp_path, qas, version="1.1", name="s.json"):
    doc = {"version": version, "data": [{"title": "T", "paragraphs": [{"context": "The cat sat.", "qas": qas}]}]}
    (tmp_path / name).write_text(json.dumps(doc))
    return tmp_path / name


def qa(qid="q1", text="cat", start=4):
    return {"id": qid, "question": "Who sat?", "answers": [{"text": text, "answer_start": start}]}


@pytest.mark.parametrize("case,message", [
    ("missing", "does not exist"),
    ("v2", "a SQuAD v2.0 file with unanswerable questions (its version is '2.0'): read it with "
           "version_2_with_negative"),
    ("v2_marked", "a SQuAD v2.0 file with unanswerable questions (question 'q1' is marked is_impossible)"),
    ("no_answer", "has no answer: every SQuAD v1.1 question needs one"),
    ("misplaced", "answer 'cat' is not at answer_start 5"),
    ("duplicate_id", "appears twice"),
    ("not_json", "not valid JSON"),
    ("wrong_layout", "missing 'paragraphs'"),
])
def test_bad_files_name_the_problem(tmp_path, case, message):
    path = tmp_path / "bad.json"
    if case == "v2":
        squad_json(tmp_path, [qa()], version="2.0", name=path.name)
    elif case == "v2_marked":  # a 1.1 file with an is_impossible question is v2.0 all the same
        squad_json(tmp_path, [{"id": "q1", "question": "Who?", "answers": [], "is_impossible": True}],
                   name=path.name)
    elif case == "no_answer":
        squad_json(tmp_path, [{"id": "q1", "question": "Who?", "answers": []}], name=path.name)
    elif case == "misplaced":  # "The cat sat."[5:8] is "at "
        squad_json(tmp_path, [qa(start=5)], name=path.name)
    elif case == "duplicate_id":
        squad_json(tmp_path, [qa(), qa()], name=path.name)
    elif case == "not_json":
        path.write_text("{oops")
    elif case == "wrong_layout":
        path.write_text(json.dumps({"data": [{"title": "T"}]}))
    with pytest.raises(SquadDataError, match=message.replace("(", r"\(").replace(")", r"\)")):
        read_squad_file(path)


def test_flat_jsonl_rows_load_like_the_nested_layout(tmp_path):
    nested = read_squad_file(squad_json(tmp_path, [qa(), qa("q2", "The cat", 0)]))
    (tmp_path / "flat.jsonl").write_text("\n".join(json.dumps(r) for r in nested))
    assert read_squad_file(tmp_path / "flat.jsonl") == nested
    assert nested[1]["answers"] == {"text": ["The cat"], "answer_start": [0]}


# -- SQuAD v2.0 files -------------------------------------------------------------------------------------
def unanswerable(qid="q2"):
    return {"id": qid, "question": "Who stood?", "answers": [], "is_impossible": True}


def test_v2_files_load_with_unanswerable_questions_as_empty_answers(tmp_path):
    path = squad_json(tmp_path, [dict(qa(), is_impossible=False), unanswerable()], version="v2.0")
    assert is_squad_v2_file(path)
    rows = read_squad_file(path, version_2_with_negative=True)
    assert [r["answers"] for r in rows] == [{"text": ["cat"], "answer_start": [4]}, {"text": [], "answer_start": []}]
    raw = load_squad(validation_file=str(path), version_2_with_negative=True)["validation"]
    assert raw["answers"][1] == {"text": [], "answer_start": []}
    # a v1.1 file read in v2.0 mode loads as it does in v1.1 mode
    v1 = squad_json(tmp_path, [qa()], name="v1.json")
    assert not is_squad_v2_file(v1)
    assert read_squad_file(v1, version_2_with_negative=True) == read_squad_file(v1)
    # is_impossible alone makes a file v2.0; flat rows, missing and broken files are not recognised as v2.0
    assert is_squad_v2_file(squad_json(tmp_path, [unanswerable()], name="marked.json"))
    (tmp_path / "flat.jsonl").write_text(json.dumps(dict(rows[1], context="The cat sat.")))
    (tmp_path / "broken.json").write_text("{oops")
    assert not any(is_squad_v2_file(tmp_path / name) for name in ("flat.jsonl", "nope.json", "broken.json"))


@pytest.mark.parametrize("case,message", [
    ("impossible_with_answers", "question 'q1' is marked is_impossible but has answers"),
    ("unmarked_no_answer", "question 'q2' has no answer and is not marked \"is_impossible\": true"),
    ("misplaced", "answer 'cat' is not at answer_start 5"),
])
def test_bad_v2_files_name_the_problem(tmp_path, case, message):
    if case == "impossible_with_answers":
        qas = [dict(qa(), is_impossible=True)]
    elif case == "unmarked_no_answer":  # in v2.0 too an answerable question needs its answers
        qas = [qa(), {"id": "q2", "question": "Who stood?", "answers": []}]
    else:
        qas = [qa(start=5), unanswerable()]
    path = squad_json(tmp_path, qas, version="v2.0")
    with pytest.raises(SquadDataError, match=message.replace("(", r"\(").replace(")", r"\)")):
        read_squad_file(path, version_2_with_negative=True)


def test_flat_rows_without_answers_need_version_2_with_negative(tmp_path):
    rows = [dict(id="q1", question="Who sat?", context="The cat sat.", answers=dict(text=["cat"], answer_start=[4])),
            dict(id="q2", question="Who stood?", context="The cat sat.", answers=dict(text=[], answer_start=[]),
                 is_impossible=True, plausible_answers=[{"text": "cat", "answer_start": 4}])]  # not read
    (tmp_path / "flat.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(SquadDataError, match="question 'q2' has no answer: .* or pass --version_2_with_negative"):
        read_squad_file(tmp_path / "flat.jsonl")
    rows = read_squad_file(tmp_path / "flat.jsonl", version_2_with_negative=True)
    assert [r["answers"]["text"] for r in rows] == [["cat"], []] and "is_impossible" not in rows[1]
    raw = load_squad(train_file=str(tmp_path / "flat.jsonl"), version_2_with_negative=True)
    assert raw["train"]["answers"] == [r["answers"] for r in rows]


def test_unanswerable_questions_point_at_cls_in_every_window_and_leave_the_others_as_in_v1(tokenizer):
    context = "alpha beta gamma delta " * 40
    answerable = dict(id="a", title="", question="which one?", context=context,
                      answers=dict(text=["gamma"], answer_start=[context.index("gamma", 400)]))
    impossible = dict(id="n", title="", question="which one?", context=context, answers=dict(text=[], answer_start=[]))
    _, both, _ = windows([answerable, impossible], tokenizer, max_length=64, stride=16)
    _, alone, _ = windows([answerable], tokenizer, max_length=64, stride=16)
    half = len(both) // 2
    assert half > 3 and len(both) == 2 * len(alone)  # the same context: as many windows each
    assert both[:half] == alone[:]  # the answerable question's windows and labels are unchanged
    assert set(zip(both["start_positions"][half:], both["end_positions"][half:])) == {(0, 0)}
    assert max(alone["start_positions"]) > 0  # while the answerable one has its answer in some window
