"""The optimizer study: a grid of optimizers x tasks x seeds (x learning rates, x ablation variants)
run through the real recipes, then the papers' tables, statistics, plots and a Markdown report.

    python -m adaptopt.study --config studies/glue.yaml      # see --help

config.py     the study file (YAML) -> the grid of runs
runner.py     one `accelerate launch` subprocess per run; resumable, N at a time, failures recorded
records.py    what a run left on disk (results.json, train_log.jsonl, run.json)
stats.py      mean +- std, 95% CI, ANOVA, Tukey HSD, Welch's t-test
aggregate.py  the tables (summary.json)
plots.py      loss curves, applied LR, metric bars, LR sensitivity, ablation (PNG)
report.py     report.md

Needs the `study` extra (scipy, statsmodels, matplotlib, pyyaml) on top of the recipes.
"""
from .config import RunSpec, Study, StudyConfigError, load_study

__all__ = ["RunSpec", "Study", "StudyConfigError", "load_study"]
