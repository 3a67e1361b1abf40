"""Evaluation metrics shipped as local `evaluate` modules, so they load without the Hub.

Nothing here imports `evaluate` (slow to import); callers load a module by its path::

    metric = evaluate.load(glue_metric_path(), config_name="sst2")
"""

from pathlib import Path


def glue_metric_path() -> str:
    """Absolute path of the GLUE `evaluate` module (config_name: a GLUE task name, or mnli_matched/mnli_mismatched)."""
    return str(Path(__file__).resolve().with_name("glue_metric.py"))
