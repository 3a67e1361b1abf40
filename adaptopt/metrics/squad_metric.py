"""SQuAD v1.1 and v2.0 exact match and F1 as an `evaluate` module that loads offline.

``evaluate.load("squad")`` and ``evaluate.load("squad_v2")`` fetch their scripts from the Hub, so we
ship our own, with the same inputs and the numbers of the official scripts (percentages, 0-100)::

    from pathlib import Path
    import adaptopt.metrics
    path = str(Path(adaptopt.metrics.__file__).with_name("squad_metric.py"))
    metric = evaluate.load(path)  # SQuAD v1.1
    metric.compute(predictions=[{"id": "q1", "prediction_text": "Denver Broncos"}],
                   references=[{"id": "q1", "answers": {"text": ["Denver Broncos"], "answer_start": [177]}}])
    # {'exact_match': 100.0, 'f1': 100.0}
    metric = evaluate.load(path, config_name="squad_v2")  # SQuAD v2.0: an empty answers list is unanswerable
    metric.compute(predictions=[{"id": "q1", "prediction_text": ""}],
                   references=[{"id": "q1", "answers": {"text": [], "answer_start": []}}])
    # {'exact': 100.0, 'f1': 100.0, 'total': 1, 'NoAns_exact': 100.0, 'NoAns_f1': 100.0, 'NoAns_total': 1}

SQuAD v1.1 (the default config) scores as the official ``evaluate-v1.1.py`` (Rajpurkar et al., 2016):
both strings are lower-cased, stripped of punctuation, of the articles a/an/the and of extra
whitespace; exact match is string equality after that, F1 the harmonic mean of precision and recall
of the bag of words; each question takes its best score over its gold answers, and the results are
means over questions.

SQuAD v2.0 (``config_name="squad_v2"``) scores as the official ``evaluate-v2.0.py`` (Rajpurkar, Jia
and Liang, 2018) with no no-answer probabilities: the same normalisation, but gold answers that
normalise to nothing are dropped, a question with no gold answer left (an unanswerable one) has the
gold answer "", and F1 between an empty and a non-empty answer is 0 (1 when both are empty). So the
empty prediction scores 1 on an unanswerable question and 0 on an answerable one. It returns
``exact, f1, total`` over all questions, and the same three prefixed ``HasAns_`` over the questions
with gold answers and ``NoAns_`` over those without, each only when there are such questions, as
the official script does.

`evaluate` copies this file into its module cache and imports it from there, so it must stay
self-contained (no imports from `adaptopt`).
"""

import re
import string
from collections import Counter

import datasets
import evaluate

_CITATION = """\
@inproceedings{rajpurkar-etal-2016-squad,
  title={{SQ}u{AD}: 100,000+ Questions for Machine Comprehension of Text},
  author={Rajpurkar, Pranav and Zhang, Jian and Lopyrev, Konstantin and Liang, Percy},
  booktitle={EMNLP},
  year={2016}
}
@inproceedings{rajpurkar-etal-2018-know,
  title={Know What You Don't Know: Unanswerable Questions for {SQ}u{AD}},
  author={Rajpurkar, Pranav and Jia, Robin and Liang, Percy},
  booktitle={ACL},
  year={2018}
}
"""

_DESCRIPTION = """\
SQuAD v1.1 exact match and F1 (percent), computed as the official evaluate-v1.1.py computes them; with
config_name="squad_v2", the SQuAD v2.0 figures of the official evaluate-v2.0.py.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: list of {"id": question id, "prediction_text": the predicted answer}.
    references: list of {"id": question id, "answers": {"text": [gold answers], "answer_start": [...]}}.
        Every reference needs exactly one prediction with its id (the official scripts score a
        missing one as 0 or leave it out; here it is an error, since a recipe that drops a question
        has a bug). SQuAD v2.0 (config_name="squad_v2"): empty "text" for an unanswerable question,
        whose right prediction is "".
Returns:
    SQuAD v1.1: {"exact_match": percent, "f1": percent}
    SQuAD v2.0: {"exact": percent, "f1": percent, "total": questions, "HasAns_exact", "HasAns_f1",
        "HasAns_total" (answerable questions), "NoAns_exact", "NoAns_f1", "NoAns_total" (unanswerable
        ones)}; the HasAns_ / NoAns_ entries only when there are such questions.
"""

_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(text: str) -> str:
    """Lower case, no punctuation, no articles, single spaces (the official normalisation)."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match_score(prediction: str, ground_truth: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(ground_truth))


def f1_score(prediction: str, ground_truth: str) -> float:
    prediction_tokens = normalize_answer(prediction).split()
    truth_tokens = normalize_answer(ground_truth).split()
    same = sum((Counter(prediction_tokens) & Counter(truth_tokens)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(prediction_tokens), same / len(truth_tokens)
    return 2 * precision * recall / (precision + recall)


class SquadMetric(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({
                "predictions": {"id": datasets.Value("string"), "prediction_text": datasets.Value("string")},
                "references": {"id": datasets.Value("string"),
                               "answers": datasets.Sequence({"text": datasets.Value("string"),
                                                             "answer_start": datasets.Value("int32")})},
            }),
            reference_urls=["https://rajpurkar.github.io/SQuAD-explorer/"],
        )

    def _compute(self, predictions, references):
        if not references:
            raise ValueError("no predictions to score")
        answer = {}
        for p in predictions:
            if p["id"] in answer:
                raise ValueError(f"two predictions for question {p['id']!r}")
            answer[p["id"]] = p["prediction_text"]
        missing = [r["id"] for r in references if r["id"] not in answer]
        if missing:
            raise ValueError(f"{len(missing)} questions have no prediction, e.g. {missing[0]!r}")
        if self.config_name == "squad_v2":
            return _squad_v2_scores(answer, references)
        exact = f1 = 0.0
        for ref in references:
            truths = ref["answers"]["text"]
            if not truths:
                raise ValueError(f"question {ref['id']!r} has no gold answer: score SQuAD v2.0 (unanswerable "
                                 "questions) with config_name='squad_v2'")
            exact += max(exact_match_score(answer[ref["id"]], t) for t in truths)
            f1 += max(f1_score(answer[ref["id"]], t) for t in truths)
        return {"exact_match": 100.0 * exact / len(references), "f1": 100.0 * f1 / len(references)}


# -- SQuAD v2.0, as evaluate-v2.0.py ------------------------------------------------------------------------
def f1_score_v2(prediction: str, ground_truth: str) -> float:
    """evaluate-v2.0.py's compute_f1: if either answer is empty after normalisation, 1 if both are, else 0."""
    prediction_tokens = normalize_answer(prediction).split()
    truth_tokens = normalize_answer(ground_truth).split()
    if not prediction_tokens or not truth_tokens:
        return float(prediction_tokens == truth_tokens)
    return f1_score(prediction, ground_truth)


def _squad_v2_scores(answer: dict, references) -> dict:
    exact, f1, has_answer = {}, {}, {}
    for ref in references:
        qid = ref["id"]
        has_answer[qid] = bool(ref["answers"]["text"])
        # gold answers that normalise to nothing are dropped; none left: the gold answer is "" (no answer)
        truths = [t for t in ref["answers"]["text"] if normalize_answer(t)] or [""]
        exact[qid] = max(exact_match_score(answer[qid], t) for t in truths)
        f1[qid] = max(f1_score_v2(answer[qid], t) for t in truths)

    def means(qids):
        return {"exact": 100.0 * sum(exact[q] for q in qids) / len(qids),
                "f1": 100.0 * sum(f1[q] for q in qids) / len(qids), "total": len(qids)}

    results = means(list(exact))
    for prefix, answerable in (("HasAns", True), ("NoAns", False)):
        qids = [q for q in exact if has_answer[q] == answerable]
        if qids:  # the official script leaves out a group with no questions
            results.update({f"{prefix}_{k}": v for k, v in means(qids).items()})
    return results
