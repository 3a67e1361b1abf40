"""report.md: the verdict first, then the tables of each task, the LR sensitivity, the ablation and the
curves, the failed runs, how the numbers were computed, the exact commands and the study file."""
from __future__ import annotations

import math
import os
import shlex
from pathlib import Path

from .config import Study
from .files import write_atomically
from .records import FINAL_TRAIN_LOSS
from .runner import portable_path

ALPHA = 0.05


def fmt_p(p) -> str:
    if p is None or not math.isfinite(p):
        return "n/a"
    return "<0.0001" if p < 1e-4 else f"{p:.4f}"


def _digits(metric: str) -> int:
    return 1 if metric in ("train_time_s", "train_samples_per_second") else 4


def fmt_stat(stat: dict, metric: str) -> str:
    """mean ± std over seeds; the mean alone for one seed; a dash for none."""
    d = _digits(metric)
    if not stat["n"]:
        return "—"
    if stat["n"] == 1 or not math.isfinite(stat["std"]):
        return f"{stat['mean']:.{d}f}"
    return f"{stat['mean']:.{d}f} ± {stat['std']:.{d}f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *["| " + " | ".join(str(c) for c in row) + " |" for row in rows], ""]


def _metric_label(metric: str) -> str:
    return {"train_time_s": "train time (s)", "train_samples_per_second": "samples/s", "train_loss": "train loss",
            FINAL_TRAIN_LOSS: "train loss (last epoch)"}.get(metric, metric)


def write_report(study: Study, summary: dict, plots: dict[str, Path], path: Path, command: list[str],
                 example_run: list[str] | None) -> Path:
    lines = [f"# Optimizer study: {study.config_path.stem}", ""]
    if study.description:
        lines += [study.description, ""]
    runs = summary["runs"]
    counts = f"Runs: **{runs['finished']} finished** of {runs['total']}"
    if runs["failed"]:
        counts += f", **{runs['failed']} failed**"
    if runs["pending"]:
        counts += f", {runs['pending']} not run yet"
    lines += ["Reproduce (resumable: finished runs are skipped):", "", "```bash", shlex.join(command), "```", "",
              f"{counts}. Seeds: {study.seeds}.", ""]
    if runs["pending"] or runs["failed"]:
        lines += ["**This study is not complete.** Every table uses only the finished runs: a mean over fewer seeds "
                  "than the study asks for is a preliminary figure, and a verdict without a p-value is not one.", ""]
    if example_run:
        lines += ["Each run is one process in its own folder (`runs/<name>/`: results.json, train_log.jsonl, run.json "
                  "with its exact command, stdout/stderr logs); for example:", "", "```bash", shlex.join(example_run),
                  "```", ""]
    rel = {name: Path(os.path.relpath(p, path.parent)).as_posix() for name, p in plots.items()}
    lines += _verdict_section(study, summary)
    lines += _optimizer_sections(summary, rel)
    lines += _sweep_section(summary, rel)
    lines += _ablation_section(summary, rel)
    if "loss_curves" in rel or "lr_schedule" in rel:
        lines += ["## Training curves", "",
                  "Training loss per logged update (mean over seeds, band ±1 std), and the learning rate each "
                  "optimizer actually applied (for AdaptOpt: the schedule times its adaptive scale; mean over "
                  "seeds).", ""]
        lines += [f"![{name}]({rel[name]})" for name in ("loss_curves", "lr_schedule") if name in rel] + [""]
    if summary["failed"]:
        lines += ["## Failed runs", "", "Their stderr is in `runs/<name>/stderr.log` (the tail also in run.json); "
                  "they are retried on the next invocation unless `--skip_failed` is given.", ""]
        lines += _table(["run", "exit code", "last error line"],
                        [[f["name"], f["returncode"], f"`{(f['error'] or '').strip()[:200]}`"]
                         for f in summary["failed"]])
    lines += _method_section()
    lines += ["## Study file", "", f"`{portable_path(study.config_path)}`:", "", "```yaml", study.text.rstrip(), "```", ""]
    return write_atomically(path, "\n".join(lines))


def _verdict_section(study: Study, summary: dict) -> list[str]:
    verdicts = {t: s["verdict"] for t, s in summary["tasks"].items() if s.get("verdict")}
    if not verdicts:
        return []
    cand, base = study.candidate, study.baseline
    lines = [f"## Verdict: {cand} at its default LR vs {base} at its best swept LR", "",
             f"{cand} runs at its study LR ({study.default_lr(cand):g}); {base}'s LR is the one, among "
             f"{', '.join(f'{lr:g}' for lr in next(iter(verdicts.values()))['baseline_lrs'])}, with the best mean "
             f"dev metric, picked on the same dev set (an advantage for {base}); while runs are missing, only the "
             "LRs with the most finished seeds compete. p: Welch's t-test over seeds, two-sided.", ""]
    rows, sentences = [], []
    for task, v in verdicts.items():
        c = v["at_default"]
        if c is None:
            rows.append([task, v["metric"], "—", "—", "—", "—", "—", "not enough finished runs"])
            continue
        rows.append([task, v["metric"], f"{c['baseline_lr']:g}", *_pair_cells(c, v["metric"]),
                     _verdict_cell(c, len(study.seeds))])
        sentences.append(_sentence(task, v, c, cand, base))
    lines += _table(["task", "metric", f"{base} best LR", f"{cand} (default LR)", base, "difference", "Welch p",
                     "matches or beats?"], rows)
    lines += [f"- {s}" for s in sentences] + [""]
    lines += _untuned_table(study, verdicts)
    best = {t: v["at_best"] for t, v in verdicts.items() if v.get("at_best")}
    if best:
        lines += ["Both at their best swept LR (each picked on the dev set):", ""]
        lines += _table(["task", f"{cand} LR", f"{base} LR", cand, base, "difference", "Welch p"],
                        [[t, f"{c['candidate_lr']:g}", f"{c['baseline_lr']:g}", *_pair_cells(c, verdicts[t]["metric"])]
                         for t, c in best.items()])
    same = [(t, c) for t, v in verdicts.items() for c in v.get("at_same_lr") or []]
    if same:
        lines += ["Both at the same LR, for each LR both were run at: no LR is picked on the dev set here, so neither "
                  "side has a selection advantage; it separates the optimizer from its LR. p is not adjusted for the "
                  f"{len(same)} rows: were there no real difference, about {len(same) * ALPHA:.1f} of them would still "
                  f"fall below {ALPHA} by chance.", ""]
        lines += _table(["task", "lr", cand, base, "difference", "Welch p"],
                        [[t, f"{c['candidate_lr']:g}", *_pair_cells(c, verdicts[t]["metric"])] for t, c in same])
    return lines


def _untuned_table(study: Study, verdicts: dict) -> list[str]:
    """The candidate and each peer at its study setting (no LR chosen on the dev set) against the baseline at
    its best swept LR, closest first."""
    if not study.peers:
        return []
    base, margin = study.baseline, study.margin
    judge = (f"within {margin:g} of {base}'s best?" if margin else f"matches or beats {base}'s best?")
    lines = [f"Every optimizer as a user would run it without an LR sweep (its study setting: AdaptOpt at its "
             f"defaults, the peers at their authors' recommended settings) against {base} at its best swept LR"
             + (f"; a shortfall of at most {margin:g} counts as a match" if margin else "") + ":", ""]
    rows = []
    for task, v in verdicts.items():
        for c in sorted(v.get("untuned") or [], key=lambda c: abs(c["diff"])):
            ok = c["within_margin"] if margin else c["matches_or_beats"]
            rows.append([task, c["optimizer"], f"{c['candidate_lr']:g}", f"{c['baseline_lr']:g}",
                         *_pair_cells(c, v["metric"]), _verdict_cell(dict(c, matches_or_beats=ok), len(study.seeds))])
    return lines + _table(["task", "optimizer", "its lr", f"{base} best LR", "mean", base, "difference", "Welch p",
                           judge], rows)


def _pair_cells(c: dict, metric: str) -> list[str]:
    """The cells every candidate-vs-baseline table shares: both sides' mean ± std, the difference and Welch p."""
    return [fmt_stat(c["candidate"], metric), fmt_stat(c["baseline"], metric), f"{c['diff']:+.4f}",
            fmt_p((c["welch"] or {}).get("p"))]


def _verdict_cell(c: dict, n_seeds: int) -> str:
    """Bold yes/no once both sides have every seed the study asks for. Before that the sign of a difference
    between one or two runs a side is mostly noise, so the cell says how preliminary it is instead."""
    word = "yes" if c["matches_or_beats"] else "no"
    n_cand, n_base = c["candidate"]["n"], c["baseline"]["n"]
    if n_cand < n_seeds or n_base < n_seeds:
        return f"{word} (preliminary: {n_cand} vs {n_base} of {n_seeds} seeds)"
    return f"**{word}**"


def _sentence(task: str, v: dict, c: dict, cand: str, base: str) -> str:
    p = (c["welch"] or {}).get("p")
    significant = p is not None and math.isfinite(p) and p < ALPHA
    how = "matches or beats" if c["matches_or_beats"] else "falls short of"
    evidence = (f"the difference is significant (p = {fmt_p(p)} < {ALPHA})" if significant else
                f"the difference is not significant (p = {fmt_p(p)})" if p is not None and math.isfinite(p) else
                "no test (fewer than 2 seeds on a side, or no variance)")
    return (f"**{task}**: {cand} {how} {base} on {v['metric']} ({c['candidate']['mean']:.4f} vs "
            f"{c['baseline']['mean']:.4f} at lr {c['baseline_lr']:g}, {c['candidate']['n']} vs {c['baseline']['n']} "
            f"seeds); {evidence}.")


def _optimizer_sections(summary: dict, plots: dict[str, str]) -> list[str]:
    lines = ["## Optimizers per task", "",
             "Each optimizer at its study LR (the papers' default unless the study file sets one), all other settings "
             "shared. mean ± std over seeds. Peak LR applied: the largest learning rate among the updates each run "
             "logged, mean over seeds (AdaptOpt: the schedule times its learned scale; Prodigy and D-Adapt: their "
             "estimate d times lr and the schedule). Train loss (last epoch): the mean training loss over each "
             "run's last epoch, from its train_log.jsonl.", ""]
    for task, s in summary["tasks"].items():
        metrics, primary = s["metrics"], s["primary_metric"]
        lines += [f"### {task} (ranked by {primary}, {'higher' if s['higher_is_better'] else 'lower'} is better)", ""]
        curves = s.get("curves") or {}
        lines += _table(["optimizer", "lr", "peak LR applied", "seeds", *[_metric_label(m) for m in metrics]],
                        [[g["optimizer"], f"{g['learning_rate']:g}", _peak_lr(curves.get(g["optimizer"])),
                          f"{g['n_finished']}" + (f" ({g['n_failed']} failed)" if g["n_failed"] else ""),
                          *[fmt_stat(g["stats"][m], m) for m in metrics]] for g in s["optimizers"]])
        anova_rows = [[_metric_label(m), f"{a['F']:.3f}" if math.isfinite(a["F"]) else "n/a", fmt_p(a["p"]),
                       f"{a['df_between']}, {a['df_within']}", len(a["groups"])]
                      for m in metrics if (a := s["anova"].get(m))]
        if anova_rows:
            lines += ["One-way ANOVA between optimizers:", ""]
            lines += _table(["metric", "F", "p", "df", "groups"], anova_rows)
        tk = s["tukey"].get(primary)
        if tk:
            lines += [f"Tukey HSD on {primary}: adjusted p of each pair (family-wise α = {ALPHA}; **bold**: "
                      "significant; differences and their CIs in `summary.json`):", ""]
            lines += _tukey_matrix(tk, [g["optimizer"] for g in s["optimizers"]])
        if "metric_bars" in plots:
            lines += [""]
    if "metric_bars" in plots:
        lines += [f"![metric bars]({plots['metric_bars']})", "",
                  "Tukey HSD for every metric (and all numbers above) are in `summary.json`.", ""]
    return lines


def _peak_lr(curve: dict | None) -> str:
    return f"{curve['lr_peak']:.2g}" if curve and curve.get("lr_peak") is not None else "—"


def _tukey_matrix(rows: list[dict], order: list[str]) -> list[str]:
    """Pairs as an upper-triangular matrix in the study's optimizer order: 21 pairs of 7 fit on one screen."""
    p = {}
    for r in rows:
        cell = fmt_p(r["p"])
        p[r["a"], r["b"]] = p[r["b"], r["a"]] = f"**{cell}**" if r["reject"] else cell
    names = [n for n in order if any(n in pair for pair in p)]
    return _table(["", *names[1:]], [[a, *[p.get((a, b), "") if j > i else "" for j, b in enumerate(names[1:], 1)]]
                                     for i, a in enumerate(names[:-1])])


def _sweep_section(summary: dict, plots: dict[str, str]) -> list[str]:
    if not any(s["lr_sensitivity"] for s in summary["tasks"].values()):
        return []
    lines = ["## Learning-rate sensitivity", ""]
    for task, s in summary["tasks"].items():
        primary = s["primary_metric"]
        rows = [[opt, f"{r['learning_rate']:g}", r["n_finished"], fmt_stat(r["stats"][primary], primary),
                 fmt_stat(r["stats"][FINAL_TRAIN_LOSS], FINAL_TRAIN_LOSS) if FINAL_TRAIN_LOSS in r["stats"] else "—"]
                for opt, rs in s["lr_sensitivity"].items() for r in rs]
        lines += [f"### {task}", ""] + _table(["optimizer", "lr", "seeds", primary, _metric_label(FINAL_TRAIN_LOSS)],
                                              rows)
    spreads = [(task, opt, sp) for task, s in summary["tasks"].items() for opt, sp in s.get("lr_spread", {}).items()]
    if spreads:
        lines += ["How far each swept optimizer's mean moves across the learning rates it was given (the LRs with "
                  "the most finished seeds): what choosing its LR is worth, or costs, on these tasks.", ""]
        lines += _table(["task", "optimizer", "LRs (seeds)", "lowest mean (LR)", "highest mean (LR)", "spread"],
                        [[task, opt, f"{', '.join(f'{lr:g}' for lr in sp['lrs'])} ({sp['seeds']})",
                          f"{sp['low']:.4f} ({sp['low_lr']:g})", f"{sp['high']:.4f} ({sp['high_lr']:g})",
                          f"{sp['spread']:.4f}"] for task, opt, sp in spreads])
    if "lr_sensitivity" in plots:
        lines += [f"![lr sensitivity]({plots['lr_sensitivity']})", ""]
        unswept = {c["optimizer"] for s in summary["tasks"].values() for c in (s.get("verdict") or {}).get("untuned", [])
                   if c["optimizer"] not in s["lr_sensitivity"]}
        if unswept:
            lines += [f"Dashed lines: {', '.join(sorted(unswept))}, run without an LR of their own (mean; band: "
                      "95% CI); one far outside the swept lines' range is named with its mean in a box instead.", ""]
    return lines


def _ablation_section(summary: dict, plots: dict[str, str]) -> list[str]:
    tasks = {t: s["ablation"] for t, s in summary["tasks"].items() if s.get("ablation")}
    if not tasks:
        return []
    first = next(iter(tasks.values()))
    lines = ["## Ablation", "",
             f"{first['optimizer']} at lr {first['learning_rate']:g} with each adaptive component removed; "
             "difference and Welch p against the full optimizer.", ""]
    for task, ab in tasks.items():
        primary = summary["tasks"][task]["primary_metric"]
        full_mean = ab["rows"][0]["stats"][primary]["mean"]
        rows = []
        for r in ab["rows"]:
            w = r["welch"].get(primary)
            flags = " ".join(f"--{k}" + ("" if v is True else f" {v}") for k, v in r["flags"].items()) or "(all on)"
            measured = r["variant"] != "full" and r["stats"][primary]["n"]
            diff = r["stats"][primary]["mean"] - full_mean if measured else None
            rows.append([r["variant"], f"`{flags}`", r["n_finished"], fmt_stat(r["stats"][primary], primary),
                         f"{diff:+.4f}" if diff is not None and math.isfinite(diff) else "—",
                         fmt_p(w["p"]) if w else "—",
                         fmt_stat(r["stats"]["train_time_s"], "train_time_s")
                         if "train_time_s" in r["stats"] else "—"])
        lines += [f"### {task}", ""] + _table(
            ["variant", "flags", "seeds", primary, "difference vs full", "Welch p", "train time (s)"], rows)
    if "ablation" in plots:
        lines += [f"![ablation]({plots['ablation']})", ""]
    return lines


def _method_section() -> list[str]:
    return ["## How the numbers are computed", "",
            "- Each number is a dev-set metric from the run's `results.json` (the evaluation after the last update). "
            "A correlation (Pearson, Spearman, Matthews) that is undefined because the run predicted one constant "
            "value (NaN in results.json) counts as 0, no correlation, as scikit-learn reports Matthews' in that case.",
            "- mean ± std: sample standard deviation (ddof = 1) over seeds; 95% CI (error bars): the t interval "
            "mean ± t(0.975, n−1)·std/√n, which is wide for 3 seeds (t = 4.30).",
            "- One-way ANOVA: `scipy.stats.f_oneway`; Tukey HSD: `statsmodels` `pairwise_tukeyhsd` (p adjusted for "
            "all pairs); Welch's t-test: `scipy.stats.ttest_ind(equal_var=False)`, two-sided. Groups with fewer than "
            "2 finished seeds are left out of the tests. With 3 seeds only large differences can be significant: "
            "'not significant' is not 'equal'.",
            "- Train time is the training loop only (evaluation excluded), as the recipe measures it; runs sharing "
            "the cores (`--jobs` > 1) each get cores/jobs threads. It is wall-clock time, so it also counts whatever "
            "else the machine was running: a std of a few percent means the runs had the machine to themselves, a "
            "larger one that load varied between them, and the time columns then say little about the optimizers. "
            "A benchmark that times the optimizers side by side in one process is the fair speed comparison.",
            "- Every optimizer runs its fast implementation (the recipes' `--optimizer_impl auto`): for AdaptOpt on "
            "a CPU its native C++ update where it builds, else its compiled update (the same math, both held to the "
            "float64 reference by the tests; a run recorded before the native update existed used the compiled "
            "one), torch's fused kernels for adam, adamw, sgd, momentum and adagrad, foreach for rmsprop (torch "
            "has no fused one). AdaptOpt's one-time build or compilation is not in its train time: the recipe "
            "does it before the loop.",
            "- The seed sets weight init of the classifier head, data order, dropout and any training subsample.", ""]
