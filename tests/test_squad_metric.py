"""The offline SQuAD `evaluate` module (adaptopt/metrics/squad_metric.py), loaded as the recipe loads it,
against values worked out by hand from the official evaluate-v1.1.py and evaluate-v2.0.py rules."""
from pathlib import Path

import pytest

import adaptopt.metrics


PATH = str(Path(adaptopt.metrics.__file__).with_name("squad_metric.py"))


@pytest.fixture(scope="module")
def metric():
    evaluate = pytest.importorskip("evaluate")  # importing it takes several seconds: do it once
    return evaluate.load(PATH)


@pytest.fixture(scope="module")
def metric_v2():
    evaluate = pytest.importorskip("evaluate")
    return evaluate.load(PATH, config_name="squad_v2")


def score(metric, pairs):
    """pairs: [(prediction, [gold answers])] -> the metric's result ([] as gold: unanswerable)."""
    predictions = [{"id": f"q{i}", "prediction_text": p} for i, (p, _) in enumerate(pairs)]
    references = [{"id": f"q{i}", "answers": {"text": gold, "answer_start": [0] * len(gold)}}
                  for i, (_, gold) in enumerate(pairs)]
    return metric.compute(predictions=predictions, references=references)


def test_normalisation_ignores_case_punctuation_articles_and_spacing(metric):
    assert score(metric, [("The  Denver Broncos!", ["denver broncos"])]) == {"exact_match": 100.0, "f1": 100.0}
    assert score(metric, [("an apple", ["Apple."])]) == {"exact_match": 100.0, "f1": 100.0}
    # "theory" keeps its "the": articles go only as whole words
    assert score(metric, [("theory", ["ory"])]) == {"exact_match": 0.0, "f1": 0.0}


def test_f1_is_over_the_bag_of_words_and_the_best_gold_answer_counts(metric):
    # precision 2/3, recall 1: F1 0.8
    assert score(metric, [("Denver Broncos team", ["Denver Broncos"])]) == \
        pytest.approx({"exact_match": 0.0, "f1": 80.0})
    # repeated words count as often as they are shared: precision 1/2, recall 1/1
    assert score(metric, [("very very", ["very"])])["f1"] == pytest.approx(100 * 2 * 0.5 / 1.5)
    # the best of the gold answers: exact on the second one
    assert score(metric, [("Santa Clara", ["Levi's Stadium", "Santa Clara, California", "Santa Clara"])]) == \
        {"exact_match": 100.0, "f1": 100.0}
    # mean over questions, in percent
    assert score(metric, [("p", ["p"]), ("b", ["c"]), ("x y", ["x z"]), ("q", ["q"])]) == \
        pytest.approx({"exact_match": 50.0, "f1": (100 + 0 + 50 + 100) / 4})
    # the official script's quirk, kept: an answer of only articles normalises to "", exact but F1 0
    assert score(metric, [("The", ["a"])]) == {"exact_match": 100.0, "f1": 0.0}


def test_every_question_needs_exactly_one_prediction(metric):
    refs = [{"id": "q1", "answers": {"text": ["a"], "answer_start": [0]}},
            {"id": "q2", "answers": {"text": ["b"], "answer_start": [0]}}]
    with pytest.raises(ValueError, match="1 questions have no prediction, e.g. 'q2'"):
        metric.compute(predictions=[{"id": "q1", "prediction_text": "a"}, {"id": "q3", "prediction_text": "b"}],
                       references=refs)
    with pytest.raises(ValueError, match="two predictions for question 'q1'"):
        metric.compute(predictions=[{"id": "q1", "prediction_text": "a"}, {"id": "q1", "prediction_text": "b"}],
                       references=refs)
    # a question without gold answers is SQuAD v2.0: the v1.1 config says so instead of scoring it
    with pytest.raises(ValueError, match="question 'q1' has no gold answer: .* config_name='squad_v2'"):
        metric.compute(predictions=[{"id": "q1", "prediction_text": ""}],
                       references=[{"id": "q1", "answers": {"text": [], "answer_start": []}}])


# -- SQuAD v2.0 (config_name="squad_v2"), as evaluate-v2.0.py with no no-answer probabilities -----------------
def test_v2_splits_answerable_and_unanswerable_questions(metric_v2):
    result = score(metric_v2, [
        ("Denver Broncos", ["Denver Broncos"]),  # answerable, exact: 1 / 1
        ("", ["Santa Clara"]),  # answerable, answered nothing: 0 / 0
        ("", []),  # unanswerable, answered nothing: 1 / 1
        ("Denver", []),  # unanswerable, answered something: 0 / 0
        ("Broncos team", ["Denver Broncos"]),  # answerable, precision 1/2, recall 1/2: 0 / 0.5
    ])
    assert result == pytest.approx({
        "exact": 100 * 2 / 5, "f1": 100 * 2.5 / 5, "total": 5,
        "HasAns_exact": 100 * 1 / 3, "HasAns_f1": 100 * 1.5 / 3, "HasAns_total": 3,
        "NoAns_exact": 100 * 1 / 2, "NoAns_f1": 100 * 1 / 2, "NoAns_total": 2,
    })
    assert isinstance(result["total"], int) and isinstance(result["NoAns_total"], int)


def test_v2_leaves_out_a_group_without_questions(metric_v2):
    # all answerable: the v1.1 numbers under the v2.0 names, and no NoAns_ entries (as the official script)
    pairs = [("Denver Broncos team", ["Denver Broncos"]), ("Santa Clara", ["Levi's Stadium", "Santa Clara"])]
    assert score(metric_v2, pairs) == pytest.approx({"exact": 50.0, "f1": 90.0, "total": 2, "HasAns_exact": 50.0,
                                                    "HasAns_f1": 90.0, "HasAns_total": 2})
    # all unanswerable: no HasAns_ entries
    assert score(metric_v2, [("", []), ("", []), ("x", []), ("", [])]) == {
        "exact": 75.0, "f1": 75.0, "total": 4, "NoAns_exact": 75.0, "NoAns_f1": 75.0, "NoAns_total": 4}


def test_v2_empty_answers_score_one_only_against_an_empty_gold(metric_v2, metric):
    # F1 of an empty and a non-empty answer is 0 whichever is empty; both empty: 1
    assert score(metric_v2, [("", ["x"])]) == pytest.approx(
        {"exact": 0.0, "f1": 0.0, "total": 1, "HasAns_exact": 0.0, "HasAns_f1": 0.0, "HasAns_total": 1})
    # a prediction that normalises to nothing ("the", punctuation) is no answer: right on an unanswerable question
    assert score(metric_v2, [("The", []), (" ?! ", [])])["f1"] == 100.0
    # gold answers that normalise to nothing are dropped, leaving "" as the gold answer: the v1.1 quirk
    # ("The" against "a": exact but F1 0) scores 1 / 1 here, yet the question still counts as answerable
    assert score(metric, [("The", ["a"])]) == {"exact_match": 100.0, "f1": 0.0}
    assert score(metric_v2, [("The", ["a"])]) == {"exact": 100.0, "f1": 100.0, "total": 1, "HasAns_exact": 100.0,
                                                  "HasAns_f1": 100.0, "HasAns_total": 1}
    # ... and only those are dropped: "a" beside "Broncos" leaves "Broncos", which "" does not match
    assert score(metric_v2, [("", ["a", "Broncos"])])["f1"] == 0.0
    assert score(metric_v2, [("the Broncos", ["a", "Broncos"])])["exact"] == 100.0


def test_v2_answerable_questions_score_as_in_v1(metric_v2, metric):
    """On answerable questions with non-empty predictions v2.0 and v1.1 agree (the normalisation, the
    bag-of-words F1 and the best gold answer are the same)."""
    pairs = [("very very", ["very"]), ("x y", ["x z"]), ("The  Denver Broncos!", ["denver broncos"]),
             ("Santa Clara", ["Levi's Stadium", "Santa Clara, California"]), ("theory", ["ory"])]
    v1, v2 = score(metric, pairs), score(metric_v2, pairs)
    assert v2["exact"] == pytest.approx(v1["exact_match"]) and v2["f1"] == pytest.approx(v1["f1"])
    assert v2["f1"] == pytest.approx(100 * (2 / 3 + 0.5 + 1 + 0.8 + 0) / 5)
    with pytest.raises(ValueError, match="1 questions have no prediction, e.g. 'q1'"):
        metric_v2.compute(predictions=[{"id": "q0", "prediction_text": ""}, {"id": "q2", "prediction_text": ""}],
                          references=[{"id": f"q{i}", "answers": {"text": [], "answer_start": []}} for i in (0, 1)])
