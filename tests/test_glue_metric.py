"""Tests for the offline GLUE `evaluate` module (adaptopt/metrics/glue_metric.py)."""

import math

import numpy as np
import pytest
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import f1_score, matthews_corrcoef

from adaptopt.data.glue import GLUE_TASKS
from adaptopt.metrics import glue_metric_path

CONFIGS = [*GLUE_TASKS, "mnli_matched", "mnli_mismatched"]


@pytest.fixture(scope="module")
def metric():
    """metric(config) -> the module loaded through evaluate.load, as recipes do; once per config."""
    evaluate = pytest.importorskip("evaluate")  # importing it takes several seconds: do it once
    cache = {}

    def load(config):
        if config not in cache:
            cache[config] = evaluate.load(glue_metric_path(), config_name=config)
        return cache[config]

    return load


# A binary confusion matrix: TP=3, FN=2, FP=1, TN=4 (positive class 1).
REFS = [1, 1, 1, 1, 1, 0, 0, 0, 0, 0]
PREDS = [1, 1, 1, 0, 0, 1, 0, 0, 0, 0]


def test_keys_match_the_task_table(metric):
    for config in CONFIGS:
        task = GLUE_TASKS["mnli" if config.startswith("mnli") else config]
        refs = [0.0, 2.5, 5.0] if task.is_regression else [0, 1, 1]
        assert list(metric(config).compute(predictions=refs, references=refs)) == list(task.metrics), config


def test_mrpc_is_exactly_accuracy_and_f1(metric):
    result = metric("mrpc").compute(predictions=PREDS, references=REFS)
    assert result == {"accuracy": pytest.approx(0.7), "f1": pytest.approx(2 / 3)}
    assert set(result) == {"accuracy", "f1"}


def test_cola_by_hand(metric):
    tp, fn, fp, tn = 3, 2, 1, 4
    mcc = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))  # 10 / sqrt(600)
    f1 = 2 * tp / (2 * tp + fp + fn)  # 6 / 9
    result = metric("cola").compute(predictions=PREDS, references=REFS)
    assert result == pytest.approx({"matthews_correlation": mcc, "accuracy": 0.7, "f1": f1}, abs=1e-12)


def test_binary_f1_is_for_class_1(metric):
    # Swapping which class is "positive" changes F1: TP=4, FN=1, FP=2 for class 0 would give 8/11.
    result = metric("qqp").compute(predictions=PREDS, references=REFS)
    assert result["f1"] == pytest.approx(2 / 3)
    # Never predicting class 1: F1 is 0 (not an exception), accuracy is the share of 0s.
    assert metric("qqp").compute(predictions=[0] * 10, references=REFS) == {"accuracy": 0.5, "f1": 0.0}


def test_mnli_macro_f1_by_hand(metric):
    refs = [0, 0, 1, 1, 2, 2]
    preds = [0, 1, 1, 1, 2, 0]
    # class 0: TP1 FP1 FN1 -> 1/2;  class 1: TP2 FP1 FN0 -> 4/5;  class 2: TP1 FP0 FN1 -> 2/3
    expected = {"accuracy": 4 / 6, "f1": (1 / 2 + 4 / 5 + 2 / 3) / 3}
    for config in ("mnli", "mnli_matched", "mnli_mismatched"):
        assert metric(config).compute(predictions=preds, references=refs) == pytest.approx(expected, abs=1e-12)


def test_mnli_macro_f1_counts_an_absent_class_as_zero(metric):
    # Class 2 appears in neither list; it still counts in the macro average (as 0).
    result = metric("mnli").compute(predictions=[0, 1, 1, 0], references=[0, 1, 0, 0])
    assert result["f1"] == pytest.approx((0.8 + 2 / 3 + 0) / 3)


def test_stsb_by_hand(metric):
    refs = [0.0, 1.0, 2.0, 3.5, 5.0]
    linear = [2 * r + 1 for r in refs]
    result = metric("stsb").compute(predictions=linear, references=refs)
    assert result == pytest.approx({"pearson": 1.0, "spearmanr": 1.0})
    cubic = [r**3 for r in refs]  # same order, not linear
    result = metric("stsb").compute(predictions=cubic, references=refs)
    assert result["spearmanr"] == pytest.approx(1.0) and result["pearson"] < 0.99


def test_against_sklearn_and_scipy(metric):
    rng = np.random.default_rng(0)
    refs2, preds2 = rng.integers(0, 2, 500), rng.integers(0, 2, 500)
    cola = metric("cola").compute(predictions=preds2, references=refs2)
    assert cola["matthews_correlation"] == pytest.approx(matthews_corrcoef(refs2, preds2), abs=1e-12)
    assert cola["f1"] == pytest.approx(f1_score(refs2, preds2), abs=1e-12)
    assert cola["accuracy"] == pytest.approx(np.mean(refs2 == preds2), abs=1e-12)

    refs3, preds3 = rng.integers(0, 3, 500), rng.integers(0, 3, 500)
    mnli = metric("mnli").compute(predictions=preds3, references=refs3)
    assert mnli["f1"] == pytest.approx(f1_score(refs3, preds3, average="macro"), abs=1e-12)

    # float64 all the way: STS-B scores are not rounded to float32 on the way in.
    refs_s = rng.uniform(0, 5, 500)
    preds_s = refs_s + rng.normal(0, 1, 500)
    stsb = metric("stsb").compute(predictions=preds_s, references=refs_s)
    assert stsb["pearson"] == pytest.approx(pearsonr(preds_s, refs_s)[0], abs=1e-12)
    assert stsb["spearmanr"] == pytest.approx(spearmanr(preds_s, refs_s)[0], abs=1e-12)


def test_batches_add_up(metric):
    m = metric("cola")
    for start in range(0, len(REFS), 3):  # as an eval loop does, batch by batch
        m.add_batch(predictions=PREDS[start : start + 3], references=REFS[start : start + 3])
    assert m.compute() == metric("cola").compute(predictions=PREDS, references=REFS)


def test_label_id_outside_the_task(metric):
    with pytest.raises(ValueError, match=r"predictions hold label ids \[2\]; rte has ids 0\.\.1"):
        metric("rte").compute(predictions=[0, 2], references=[0, 1])
    with pytest.raises(ValueError, match=r"references hold label ids \[3\]; mnli has ids 0\.\.2"):
        metric("mnli").compute(predictions=[0, 1], references=[3, 1])


def test_unknown_config():
    evaluate = pytest.importorskip("evaluate")
    expected = "unknown GLUE metric config 'sst-2'; pass config_name= one of cola, sst2, .*stsb"
    with pytest.raises(ValueError, match=expected):
        evaluate.load(glue_metric_path(), config_name="sst-2")
    with pytest.raises(ValueError, match="unknown GLUE metric config 'default'"):  # no config_name given
        evaluate.load(glue_metric_path())
