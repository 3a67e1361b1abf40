"""GLUE metric as an `evaluate` module that loads offline.

``evaluate.load("glue")`` fetches its script from the Hub, so we ship our own. Load it by path::

    from adaptopt.metrics import glue_metric_path
    metric = evaluate.load(glue_metric_path(), config_name="mrpc")
    metric.compute(predictions=[0, 1, 1], references=[0, 1, 0])  # {'accuracy': 0.667, 'f1': 0.667}

`evaluate` copies this file into its module cache and imports it from there, so it must stay
self-contained (no imports from `adaptopt`). tests/test_glue_metric.py checks that its keys
match `adaptopt.data.glue.GLUE_TASKS[task].metrics`.
"""

import datasets
import evaluate
import numpy as np
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

_CITATION = """\
@inproceedings{wang2019glue,
  title={{GLUE}: A Multi-Task Benchmark and Analysis Platform for Natural Language Understanding},
  author={Wang, Alex and Singh, Amanpreet and Michael, Julian and Hill, Felix and Levy, Omer and Bowman, Samuel R.},
  booktitle={ICLR},
  year={2019}
}
"""

_DESCRIPTION = """\
GLUE metrics per task (config name). The official GLUE metric(s) come first; the others are extras.

  cola                                  matthews_correlation, accuracy, f1 (binary, positive class 1)
  sst2, qnli, rte, wnli                 accuracy, f1 (binary, positive class 1)
  mrpc, qqp                             accuracy, f1 (binary, positive class 1: both are official)
  mnli, mnli_matched, mnli_mismatched   accuracy, f1 (macro average over the 3 classes)
  stsb                                  pearson, spearmanr

Label ids follow the HF `glue` dataset. Computed with scikit-learn and scipy. Pearson/Spearman
are nan when predictions or references are constant.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: predicted label ids (int), or predicted scores (float) for stsb.
    references: gold label ids (int), or gold scores (float) for stsb.
Returns:
    dict of floats, keyed by the metric names listed for the config.
Example:
    >>> metric = evaluate.load(glue_metric_path(), config_name="mrpc")
    >>> metric.compute(predictions=[0, 1], references=[0, 1])
    {'accuracy': 1.0, 'f1': 1.0}
"""

# Number of classes of each classification config; label ids must lie in range(n).
_NUM_CLASSES = {
    "cola": 2, "sst2": 2, "mrpc": 2, "qqp": 2, "qnli": 2, "rte": 2, "wnli": 2,
    "mnli": 3, "mnli_matched": 3, "mnli_mismatched": 3,
}
CONFIG_NAMES = (*_NUM_CLASSES, "stsb")


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class GlueMetric(evaluate.Metric):
    def _info(self):
        if self.config_name not in CONFIG_NAMES:
            raise ValueError(
                f"unknown GLUE metric config {self.config_name!r}; pass config_name= one of {', '.join(CONFIG_NAMES)}"
            )
        dtype = "float64" if self.config_name == "stsb" else "int64"
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value(dtype), "references": datasets.Value(dtype)}),
            reference_urls=["https://gluebenchmark.com/"],
            # No format="numpy": datasets' numpy formatter turns float64 into float32, which would
            # round the STS-B correlations. We get Python lists and make float64 arrays ourselves.
        )

    def _compute(self, predictions, references):
        if len(references) == 0:
            raise ValueError("no predictions to score")
        predictions, references = np.asarray(predictions), np.asarray(references)
        if self.config_name == "stsb":
            return {
                "pearson": float(pearsonr(predictions, references)[0]),
                "spearmanr": float(spearmanr(predictions, references)[0]),
            }

        n = _NUM_CLASSES[self.config_name]
        for name, values in (("predictions", predictions), ("references", references)):
            bad = sorted(set(np.unique(values).tolist()) - set(range(n)))
            if bad:  # e.g. a 3-way head on a binary task; sklearn would fail with a vaguer message
                raise ValueError(f"{name} hold label ids {bad}; {self.config_name} has ids 0..{n - 1}")
        # Pass the full label set so a class never predicted still counts (as 0) in macro F1.
        if n == 2:
            f1 = f1_score(references, predictions, average="binary", pos_label=1, zero_division=0)
        else:
            f1 = f1_score(references, predictions, labels=list(range(n)), average="macro", zero_division=0)
        result = {"accuracy": float(accuracy_score(references, predictions)), "f1": float(f1)}
        if self.config_name == "cola":
            result = {"matthews_correlation": float(matthews_corrcoef(references, predictions)), **result}
        return result
