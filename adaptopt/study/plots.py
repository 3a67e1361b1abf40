"""The study's figures (PNG, matplotlib's Agg backend: no display needed), one subplot per task.

    loss_curves.png     training loss per logged update, mean over seeds (band: +- 1 std)
    lr_schedule.png     the LR each optimizer actually applied (AdaptOpt: schedule x adaptive scale), log scale
    metric_bars.png     primary dev metric per optimizer, mean with 95% CI, each seed as a dot
    lr_sensitivity.png  primary dev metric vs learning rate for the swept optimizers, mean with 95% CI; the
                        study's peers (run without an LR of their own) as dashed lines with their 95% CI
    ablation.png        primary dev metric per ablation variant, mean with 95% CI

A figure whose data is absent (no sweep, no ablation, no finished run) is not written; write_plots
returns the ones it wrote.
"""
from __future__ import annotations

import io
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import NullLocator  # noqa: E402

from .files import write_atomically  # noqa: E402

PLOTS = ("loss_curves", "lr_schedule", "metric_bars", "lr_sensitivity", "ablation")


def _colors(names: list[str]) -> dict[str, str]:
    """One colour per optimizer, the same in every figure."""
    palette = plt.get_cmap("tab10").colors
    return {name: palette[i % len(palette)] for i, name in enumerate(names)}


# Optimizers that share a default LR (sgd, momentum, adagrad at 1e-2) draw the same schedule: distinct
# dashes keep every one visible where the lines coincide.
_DASHES = ("-", "--", ":", "-.")


def _style(colors: dict, name: str) -> dict:
    i = list(colors).index(name)
    return dict(color=colors[name], linestyle=_DASHES[i % len(_DASHES)], lw=1.6)


def _figure(tasks: list[str]):
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.2 * len(tasks), 4.0), squeeze=False)
    return fig, dict(zip(tasks, axes[0]))


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=110)
    plt.close(fig)
    return write_atomically(path, png.getvalue())


def _finite(x) -> float:
    return x if x is not None and math.isfinite(x) else 0.0  # an undefined CI (1 seed) draws no error bar


def write_plots(summary: dict, out_dir: Path) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    tasks = list(summary["tasks"])
    if not tasks:
        return {}
    optimizers = [row["optimizer"] for row in summary["tasks"][tasks[0]]["optimizers"]]
    swept = {o for t in tasks for o in summary["tasks"][t]["lr_sensitivity"]}
    colors = _colors(optimizers + sorted(swept - set(optimizers)))
    written = {}
    for name, draw in (("loss_curves", _loss_curves), ("lr_schedule", _lr_schedule), ("metric_bars", _metric_bars),
                       ("lr_sensitivity", _lr_sensitivity), ("ablation", _ablation)):
        fig, axes = _figure(tasks)
        drawn = {task: draw(summary["tasks"][task], ax, colors, task) for task, ax in axes.items()}
        if any(drawn.values()):
            for task in (t for t, ok in drawn.items() if not ok):  # a partial study: say so, not empty axes
                _no_runs(axes[task], task)
            written[name] = _save(fig, out_dir / f"{name}.png")
        else:
            plt.close(fig)
    return written


def _no_runs(ax, title: str) -> None:
    ax.clear()
    ax.set_title(title)
    ax.text(0.5, 0.5, "no finished runs for this plot yet", ha="center", va="center", transform=ax.transAxes, color="0.4")
    ax.set_axis_off()


def _loss_curves(task: dict, ax, colors, title: str) -> bool:
    drawn = False
    for opt, curve in task["curves"].items():
        if not curve:
            continue
        mean, std = curve["loss_mean"], curve["loss_std"]
        ax.plot(curve["step"], mean, label=f"{opt} (n={curve['seeds']})", **_style(colors, opt))
        ax.fill_between(curve["step"], [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                        color=colors[opt], alpha=0.15, lw=0)
        drawn = True
    ax.set(title=f"{title}: training loss", xlabel="update", ylabel="loss (mean over seeds)")
    if drawn:
        ax.legend(fontsize=7)
    return drawn


def _lr_schedule(task: dict, ax, colors, title: str) -> bool:
    drawn = False
    for opt, curve in task["curves"].items():
        if curve and any(v > 0 for v in curve["lr_mean"] if math.isfinite(v)):
            # a log axis cannot show the schedule's final 0: the line ends at the last positive LR instead
            lr = [v if v > 0 else math.nan for v in curve["lr_mean"]]
            ax.plot(curve["step"], lr, label=opt, **_style(colors, opt))
            drawn = True
    ax.set(title=f"{title}: learning rate applied", xlabel="update", ylabel="lr (mean over seeds)")
    if drawn:
        ax.set_yscale("log")  # the optimizers' LRs span 1e-5 (adam) to 1e-2 (sgd)
        ax.legend(fontsize=7)
    return drawn


def _bars(ax, labels, groups, metric, colors_list):
    means = [g["stats"][metric]["mean"] for g in groups]
    cis = [_finite(g["stats"][metric]["ci95"]) for g in groups]
    xs = range(len(labels))
    ax.bar(xs, [_finite(m) for m in means], yerr=cis, capsize=4, color=colors_list, alpha=0.8)
    for x, g in zip(xs, groups):
        values = g["stats"][metric]["values"]
        ax.scatter([x] * len(values), values, color="black", s=10, zorder=3)
    ax.set_xticks(list(xs), labels, rotation=30, ha="right", fontsize=8)
    finite = [v for g in groups for v in g["stats"][metric]["values"]]
    if finite:  # zoom on the data: bars from 0 hide differences of a point or two
        lo, hi = min(finite), max(finite)
        pad = max(hi - lo, 0.02) * 0.6 + max(cis, default=0)  # at least ~1 point around a single value
        ax.set_ylim(lo - pad, hi + pad)


def _metric_bars(task: dict, ax, colors, title: str) -> bool:
    groups = [g for g in task["optimizers"] if g["stats"][task["primary_metric"]]["n"]]
    if not groups:
        return False
    names = [g["optimizer"] for g in groups]
    _bars(ax, names, groups, task["primary_metric"], [colors[n] for n in names])
    ax.set(title=f"{title}: {task['primary_metric']} (mean, 95% CI)", ylabel=task["primary_metric"])
    return True


def _lr_sensitivity(task: dict, ax, colors, title: str) -> bool:
    metric, drawn = task["primary_metric"], False
    for opt, rows in task["lr_sensitivity"].items():
        rows = [r for r in rows if r["stats"][metric]["n"]]
        if rows:
            ax.errorbar([r["learning_rate"] for r in rows], [r["stats"][metric]["mean"] for r in rows],
                        yerr=[_finite(r["stats"][metric]["ci95"]) for r in rows], marker="o", capsize=3,
                        label=opt, color=colors[opt])
            drawn = True
    # A peer far outside the swept lines' range (e.g. one that failed: Pearson 0 against 0.86) is named in a
    # note instead of drawn, since an axis stretched down to it would flatten the lines the figure is for.
    swept = [(r["stats"][metric]["mean"], _finite(r["stats"][metric]["ci95"]))
             for rows in task["lr_sensitivity"].values() for r in rows if r["stats"][metric]["n"]]
    lo, hi = (min(m - c for m, c in swept), max(m + c for m, c in swept)) if swept else (0.0, 0.0)
    # at least 10% of the values' size: one swept point of one seed has no width, and every peer would be "far"
    span = max(hi - lo, 0.1 * max(abs(lo), abs(hi)))
    off_axis = []
    for peer in (task.get("verdict") or {}).get("untuned") or []:
        if drawn and peer["optimizer"] not in task["lr_sensitivity"]:
            mean, ci = peer["candidate"]["mean"], _finite(peer["candidate"]["ci95"])
            if not lo - 2 * span <= mean <= hi + 2 * span:
                off_axis.append(f"{peer['optimizer']} (no LR): {mean:.3f}")
                continue
            color = colors.get(peer["optimizer"], "0.3")
            ax.axhline(mean, color=color, linestyle="--", lw=1.4, label=f"{peer['optimizer']} (no LR)")
            ax.axhspan(mean - ci, mean + ci, color=color, alpha=0.08)
    if off_axis:
        ax.text(0.02, 0.03, "off the axis, mean:\n" + "\n".join(off_axis), transform=ax.transAxes, fontsize=8,
                va="bottom", bbox=dict(facecolor="white", edgecolor="0.7", alpha=0.9))
    ax.set(title=f"{title}: {metric} vs learning rate", xlabel="learning rate given", ylabel=f"{metric} (mean, 95% CI)")
    if drawn:
        ax.set_xscale("log")
        # Ticks at the swept LRs only, as 1e-4, 2e-4 (matplotlib's own log ticks label every minor tick,
        # 2x10^-5 3x10^-5 ..., and "0.0001" beside "0.0002" runs together).
        lrs = sorted({r["learning_rate"] for rows in task["lr_sensitivity"].values() for r in rows})
        ax.set_xticks(lrs, [np.format_float_scientific(lr, trim="-", exp_digits=1) for lr in lrs])
        ax.xaxis.set_minor_locator(NullLocator())
        ax.legend(fontsize=8)
    return drawn


def _ablation(task: dict, ax, colors, title: str) -> bool:
    ablation = task.get("ablation")
    if not ablation:
        return False
    groups = [g for g in ablation["rows"] if g["stats"][task["primary_metric"]]["n"]]
    if not groups:
        return False
    palette = plt.get_cmap("Set2").colors
    _bars(ax, [g["variant"] for g in groups], groups, task["primary_metric"],
          [palette[i % len(palette)] for i in range(len(groups))])
    ax.set(title=f"{title}: {ablation['optimizer']} ablation", ylabel=f"{task['primary_metric']} (mean, 95% CI)")
    return True
