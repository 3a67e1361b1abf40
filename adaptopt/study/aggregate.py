"""The papers' tables from the runs' results: per task, each optimizer's mean +- std over seeds,
ANOVA and Tukey HSD between optimizers, LR sensitivity, the ablation, and the verdict.

Which runs feed which table (all from the grid in config.py):
- optimizer table, ANOVA, Tukey, curves: every optimizer at its study LR (the papers' default unless
  the YAML sets one), all parts on;
- LR sensitivity: every learning rate of the swept optimizers, all parts on;
- ablation: the ablation optimizer at its study LR, each variant, against the full one;
- verdict: the candidate (AdaptOpt) at its study LR against the baseline (AdamW) at the swept LR
  with the best mean primary metric (among the LRs with the most finished seeds, see _best_lr). That LR
  is picked on the same dev set it is scored on, which flatters the baseline; the candidate gets no such
  pick. The study's ``peers`` (optimizers a user would pick instead of sweeping) are judged the same way;
- LR spread: for each swept optimizer, how far its mean moves across the LRs it was given (the cost of
  not choosing its LR).

The output is a plain dict (JSON-able): report.py and plots.py read it, summary.json stores it.
"""
from __future__ import annotations

import numpy as np

from . import stats
from .config import FULL, Study
from .records import FINAL_TRAIN_LOSS, RunRecord
from .runner import FAILED, FINISHED

# Numbers every run has besides its dev metrics (results.json; the loss from train_log.jsonl, see
# records.final_train_loss); compared across optimizers too.
COST_METRICS = (FINAL_TRAIN_LOSS, "train_time_s", "train_samples_per_second")
LOWER_IS_BETTER = {"train_loss", FINAL_TRAIN_LOSS, "train_time_s", "peak_memory_mb", "loss", "eval_loss", "perplexity"}


def eval_metric_names(records: list[RunRecord]) -> list[str]:
    """The dev metrics the recipe reported (its eval/ log keys), in the recipe's order."""
    names: list[str] = []
    for record in records:
        if record.status != FINISHED:
            continue
        _, evals = record.train_log()
        if evals:
            for key in list(evals.values())[-1]:
                name = key.removeprefix("eval/")
                if key.startswith("eval/") and name not in names and record.value(name) is not None:
                    names.append(name)
    return names


def summarize(study: Study, records: list[RunRecord]) -> dict:
    by_task = {task: [r for r in records if r.spec.task == task] for task in study.tasks}
    counts = {s: sum(r.status == s for r in records) for s in (FINISHED, FAILED)}
    return dict(
        runs=dict(total=len(records), finished=counts[FINISHED], failed=counts[FAILED],
                  pending=len(records) - counts[FINISHED] - counts[FAILED]),
        failed=[dict(name=r.spec.name, returncode=(r.info or {}).get("returncode"), error=(r.info or {}).get("error"))
                for r in records if r.status == FAILED],
        tasks={task: _task_summary(study, task, recs) for task, recs in by_task.items() if recs},
    )


def _values(records: list[RunRecord], metric: str) -> list[float]:
    return [v for r in records if r.status == FINISHED and (v := r.value(metric)) is not None]


def _group(records: list[RunRecord], metrics: list[str]) -> dict:
    return dict(n_finished=sum(r.status == FINISHED for r in records),
                n_failed=sum(r.status == FAILED for r in records),
                seeds=[r.spec.seed for r in records if r.status == FINISHED],
                stats={m: stats.describe(_values(records, m)) for m in metrics})


def _task_summary(study: Study, task: str, records: list[RunRecord]) -> dict:
    evals = eval_metric_names(records)
    primary = study.primary_metric(task) or (evals[0] if evals else "train_loss")
    metrics = [primary, *[m for m in evals if m != primary], *[m for m in COST_METRICS if m != primary]]

    def runs(optimizer: str, lr: float, variant: str = FULL) -> list[RunRecord]:
        return [r for r in records if r.spec.optimizer == optimizer and r.spec.learning_rate == lr
                and r.spec.variant == variant]

    main = {opt: runs(opt, study.default_lr(opt)) for opt in study.optimizers}
    summary = dict(primary_metric=primary, higher_is_better=primary not in LOWER_IS_BETTER, metrics=metrics)
    summary["optimizers"] = [dict(optimizer=opt, learning_rate=study.default_lr(opt), **_group(recs, metrics))
                             for opt, recs in main.items()]
    summary["anova"] = {m: stats.anova({opt: _values(recs, m) for opt, recs in main.items()}) for m in metrics}
    summary["tukey"] = {m: stats.tukey({opt: _values(recs, m) for opt, recs in main.items()}) for m in metrics}

    summary["lr_sensitivity"] = {
        opt: [dict(learning_rate=lr, **_group(runs(opt, lr), metrics)) for lr in _lrs(study, opt)]
        for opt in study.lr_sweep}
    summary["lr_spread"] = {opt: spread for opt in study.lr_sweep
                            if (spread := _spread(summary["lr_sensitivity"][opt], primary))}

    if study.ablation:
        opt, lr = study.ablation_optimizer, study.default_lr(study.ablation_optimizer)
        full = runs(opt, lr)
        rows = [dict(variant=FULL, flags={}, **_group(full, metrics), welch={})]
        for variant, flags in study.ablation.items():
            recs = runs(opt, lr, variant)
            rows.append(dict(variant=variant, flags=flags, **_group(recs, metrics),
                             welch={m: stats.welch(_values(recs, m), _values(full, m)) for m in metrics}))
        summary["ablation"] = dict(optimizer=opt, learning_rate=lr, rows=rows)

    if study.candidate and study.baseline:
        summary["verdict"] = _verdict(study, records, primary, runs)
    summary["curves"] = {opt: _curves(recs) for opt, recs in main.items()}
    return summary


def _spread(rows: list[dict], metric: str) -> dict | None:
    """Lowest and highest mean over the LRs of one optimizer, among the LRs with the most finished seeds (as
    _best_lr compares them); None with fewer than two such LRs."""
    most = max((r["stats"][metric]["n"] for r in rows), default=0)
    means = {r["learning_rate"]: r["stats"][metric]["mean"] for r in rows if most and r["stats"][metric]["n"] == most}
    if len(means) < 2:
        return None
    low, high = min(means, key=means.get), max(means, key=means.get)
    return dict(seeds=most, lrs=sorted(means), low_lr=low, low=means[low], high_lr=high, high=means[high],
                spread=means[high] - means[low])


def _lrs(study: Study, optimizer: str) -> list[float]:
    return sorted({*study.lr_sweep.get(optimizer, []), study.default_lr(optimizer)})


def _best_lr(study: Study, optimizer: str, metric: str, runs) -> float | None:
    """The LR whose mean over seeds is best, among the LRs with the most finished seeds; None when no LR of
    this optimizer has a finished run.

    Only LRs with equally many seeds compete: the best of several noisy means is biased towards the
    noisiest, so in a study still accumulating runs a 1-seed LR would win by luck against 3-seed ones.
    In a finished study every LR has every seed and this is the plain best mean."""
    values = {lr: v for lr in _lrs(study, optimizer) if (v := _values(runs(optimizer, lr), metric))}
    if not values:
        return None
    most = max(len(v) for v in values.values())
    means = {lr: np.mean(v) for lr, v in values.items() if len(v) == most}
    pick = min if metric in LOWER_IS_BETTER else max
    return pick(means, key=means.get)


def _verdict(study: Study, records, metric: str, runs) -> dict:
    """Candidate at its default LR (and at its own best LR) against the baseline at its best LR; and the two at
    each LR both were run at, the one comparison in which no LR was picked on the dev set."""
    cand, base = study.candidate, study.baseline
    base_lr = _best_lr(study, base, metric, runs)
    sign = -1.0 if metric in LOWER_IS_BETTER else 1.0

    def compare(cand_lr, base_lr=base_lr, cand=cand):
        if cand_lr is None or base_lr is None:
            return None
        a, b = _values(runs(cand, cand_lr), metric), _values(runs(base, base_lr), metric)
        if not a or not b:
            return None
        diff = float(np.mean(a) - np.mean(b))
        return dict(optimizer=cand, candidate_lr=cand_lr, baseline_lr=base_lr, candidate=stats.describe(a),
                    baseline=stats.describe(b), diff=diff, matches_or_beats=sign * diff >= 0,
                    within_margin=sign * diff >= -study.margin, welch=stats.welch(a, b))

    untuned = [c for opt in [cand, *study.peers] if (c := compare(study.default_lr(opt), cand=opt))]
    return dict(metric=metric, candidate=cand, baseline=base, baseline_lrs=_lrs(study, base), margin=study.margin,
                untuned=untuned,
                at_default=compare(study.default_lr(cand)),
                at_best=compare(_best_lr(study, cand, metric, runs)) if cand in study.lr_sweep else None,
                at_same_lr=[c for lr in sorted(set(_lrs(study, cand)) & set(_lrs(study, base)))
                            if study.same_lr and (c := compare(lr, lr))])


def _curves(records: list[RunRecord]) -> dict | None:
    """Training loss and applied LR per logged step, mean (and std) over the finished seeds.

    Only steps every seed logged are kept, so each point is a mean over the same seeds. A logged loss is
    the mean over the updates since the previous log line; the last line of a run often covers only a few
    (on SST-2's subsample: one update on an 8-example batch), so it is far noisier than the rest of the
    curve. Points whose window is shorter than half the usual one are left out."""
    logs = [r.train_log()[0] for r in records if r.status == FINISHED]
    logs = [log for log in logs if log]
    if not logs:
        return None
    steps = sorted(set.intersection(*(set(log) for log in logs)))
    windows = np.diff([0, *steps])
    steps = [step for step, window in zip(steps, windows) if 2 * window >= np.median(windows)]
    loss = np.array([[log[s]["train/loss"] for s in steps] for log in logs], dtype=float)
    lr = np.array([[log[s].get("train/lr", np.nan) for s in steps] for log in logs], dtype=float)
    # Each run's largest applied LR over all its logged updates (the learning-rate-free optimizers set their
    # own: what level did they pick?), mean over seeds; None where no run logged one.
    peaks = [max(lrs) for log in logs if (lrs := [row["train/lr"] for row in log.values() if "train/lr" in row])]
    return dict(step=steps, seeds=len(logs), loss_mean=loss.mean(0).tolist(),
                loss_std=(loss.std(0, ddof=1) if len(logs) > 1 else np.zeros(len(steps))).tolist(),
                lr_mean=lr.mean(0).tolist(), lr_peak=float(np.mean(peaks)) if peaks else None)
