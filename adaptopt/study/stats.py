"""The statistics of the papers' tables: mean +- std over seeds, 95% confidence intervals, one-way
ANOVA, Tukey's HSD and Welch's t-test.

Conventions (stated in the report too):
- std is the sample standard deviation (ddof=1) over seeds; the 95% CI is the t interval
  mean +- t_{0.975, n-1} * std / sqrt(n), so it is wide for 3 seeds (t = 4.30), as it should be.
- ANOVA (scipy.stats.f_oneway) and Tukey HSD (statsmodels pairwise_tukeyhsd, family-wise alpha 0.05)
  use the groups that have at least 2 values; with fewer than 2 such groups there is no test (None).
- Welch's t-test (scipy.stats.ttest_ind, equal_var=False) compares two groups without assuming equal
  variances; two-sided.
- When every group is constant the tests are undefined; their statistics come out as NaN, not as
  a made-up number.
"""
from __future__ import annotations

import math
import warnings

import numpy as np
from scipy import stats as sps


def describe(values) -> dict:
    """n, mean, std (ddof=1), ci95 (half-width of the t interval) and the values themselves."""
    x = np.asarray([v for v in values if v is not None], dtype=float)
    n = len(x)
    mean = float(x.mean()) if n else math.nan
    std = float(x.std(ddof=1)) if n > 1 else math.nan
    ci95 = float(sps.t.ppf(0.975, n - 1) * std / math.sqrt(n)) if n > 1 else math.nan
    return dict(n=n, mean=mean, std=std, ci95=ci95, values=x.tolist())


def _testable(groups: dict[str, list[float]]) -> dict[str, np.ndarray]:
    return {name: np.asarray(v, dtype=float) for name, v in groups.items() if len(v) >= 2}


def anova(groups: dict[str, list[float]]) -> dict | None:
    """One-way ANOVA between the groups: F, p, the degrees of freedom and which groups took part."""
    kept = _testable(groups)
    if len(kept) < 2:
        return None
    with warnings.catch_warnings():  # constant input: scipy warns and returns NaN, which we keep
        warnings.simplefilter("ignore")
        result = sps.f_oneway(*kept.values())
    n = sum(len(v) for v in kept.values())
    return dict(F=float(result.statistic), p=float(result.pvalue), groups=list(kept),
                df_between=len(kept) - 1, df_within=n - len(kept))


def tukey(groups: dict[str, list[float]], alpha: float = 0.05) -> list[dict] | None:
    """Tukey's HSD for every pair: meandiff = mean(b) - mean(a), adjusted p, the CI, and reject at alpha."""
    kept = _testable(groups)
    if len(kept) < 2:
        return None
    from statsmodels.stats.multicomp import pairwise_tukeyhsd

    endog = np.concatenate(list(kept.values()))
    labels = np.concatenate([[name] * len(v) for name, v in kept.items()])
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        result = pairwise_tukeyhsd(endog, labels, alpha=alpha)
    names = [str(g) for g in result.groupsunique]  # statsmodels sorts the groups; pairs follow that order
    pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 1:]]
    rows = []
    for (a, b), diff, p, (lower, upper), reject in zip(pairs, result.meandiffs, result.pvalues, result.confint,
                                                       result.reject):
        rows.append(dict(a=a, b=b, meandiff=float(diff), p=float(p), lower=float(lower), upper=float(upper),
                         reject=bool(reject)))
    return rows


def welch(a, b) -> dict | None:
    """Welch's two-sided t-test of mean(a) vs mean(b): t, p and the difference mean(a) - mean(b)."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if len(a) < 2 or len(b) < 2:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = sps.ttest_ind(a, b, equal_var=False)
    return dict(t=float(result.statistic), p=float(result.pvalue), diff=float(a.mean() - b.mean()))
