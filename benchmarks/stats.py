"""The statistics every study report uses, so that each ± says what it is.

Runs are compared on the same examples (paired). Two tests of one difference, always side by side:

* **per example** (:func:`per_example`, :func:`pooled`): the mean of the per-example differences in
  points, its standard error (SE) over examples, the flips and McNemar's exact p. Pooling several seeds'
  passes over the same test set treats each pass as new examples: it understates the error when seeds
  agree on hard examples, so it is never shown alone.
* **over seeds** (:func:`over_seeds`): the per-seed differences' mean, their standard deviation (SD), the
  SE of the mean (SD / sqrt(n)) and a paired t-test with n - 1 degrees of freedom (scipy).

A difference "clears" a test when it exceeds ``k`` of that test's SEs (:func:`clears`).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any

from scipy import stats as scipy_stats

from fl_app.bottom_effect import mcnemar_exact, paired_flips


def spread(values: list[float]) -> tuple[float, float]:
    """(mean, sample standard deviation; 0 for one value) of results over seeds."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def mean_sd(values: list[float], digits: int = 3, scale: float = 1.0, signed: bool = False) -> str:
    """``mean ± sd`` of results over seeds as table text (times ``scale``, the mean with its sign if
    ``signed``); the mean alone for one value, which has no spread to show."""
    m, sd = spread(values)
    mean = f"{scale * m:{'+' if signed else ''}.{digits}f}"
    return mean + (f" ± {scale * sd:.{digits}f}" if len(values) > 1 else "")


def standard_error(values: list[float]) -> float:
    """The standard error of the mean of results over seeds (0 for one value)."""
    return spread(values)[1] / math.sqrt(len(values))


def per_example(a: Sequence[int], b: Sequence[int]) -> dict[str, float]:
    """a - b on the same examples (0/1 outcomes): points, per-example SE, flips, McNemar's exact p."""
    diffs = [x - y for x, y in zip(a, b, strict=True)]
    gained, lost = paired_flips(a, b)
    sd = statistics.stdev(diffs) if len(diffs) > 1 else 0.0
    return {
        "points": 100 * statistics.fmean(diffs),
        "se": 100 * sd / math.sqrt(len(diffs)),
        "gained": gained,
        "lost": lost,
        "p": mcnemar_exact(gained, lost),
    }


def pooled(a_runs: Sequence[Sequence[int]], b_runs: Sequence[Sequence[int]]) -> dict[str, float]:
    """:func:`per_example` over every seed's pairs together (seed by seed, in order)."""
    return per_example([x for run in a_runs for x in run], [x for run in b_runs for x in run])


def over_seeds(diffs: Sequence[float]) -> dict[str, Any]:
    """Per-seed differences: n, mean, SD, SE of the mean and the paired t-test's two-sided p (None below
    two seeds, or when every seed gave the same difference)."""
    n = len(diffs)
    mean, sd = spread(list(diffs))
    p = float(scipy_stats.ttest_1samp(list(diffs), 0.0).pvalue) if n > 1 and sd > 0 else None
    return {"n": n, "mean": mean, "sd": sd, "se": sd / math.sqrt(n) if n > 1 else math.nan, "p": p}


def clears(test: dict[str, Any], k: float = 2.0) -> bool:
    """Whether a difference exceeds ``k`` of its test's standard errors (per example or over seeds)."""
    mean = test["points"] if "points" in test else test["mean"]
    return math.isfinite(test["se"]) and test["se"] > 0 and mean > k * test["se"]


def share_interval(diffs: Sequence[float], headroom: Sequence[float]) -> tuple[float, float, float]:
    """(share, low, high): mean(diffs) / mean(headroom) over paired seeds, with an approximate 95 %
    interval by the delta method from the seeds' SEs (NaN bounds below two seeds or without headroom)."""
    m, h = statistics.fmean(diffs), statistics.fmean(headroom)
    if not h:
        return math.nan, math.nan, math.nan
    share = m / h
    if len(diffs) < 2:
        return share, math.nan, math.nan
    cov = statistics.covariance(diffs, headroom) / len(diffs)
    var_m, var_h = statistics.variance(diffs) / len(diffs), statistics.variance(headroom) / len(diffs)
    var = (var_m - 2 * share * cov + share**2 * var_h) / h**2
    half = 1.96 * math.sqrt(max(var, 0.0))
    return share, share - half, share + half


def fmt_sd(values: Sequence[float], digits: int = 1) -> str:
    """``mean ± sd SD`` of results over seeds (signed), the mean alone for one value."""
    mean = f"{statistics.fmean(values):+.{digits}f}"
    return mean + (f" ± {statistics.stdev(values):.{digits}f} SD" if len(values) > 1 else "")


def fmt_per_example(test: dict[str, float], what: str = "per example") -> str:
    """``+x ± y SE <what>, flips +g / -l, McNemar p``."""
    return (
        f"{test['points']:+.1f} ± {test['se']:.1f} SE {what}, flips +{test['gained']} / -{test['lost']}, "
        f"McNemar p {test['p']:.2g}"
    )


def fmt_seeds(test: dict[str, Any]) -> str:
    """``+x ± y SE over n seeds (SD z), paired t p``."""
    p = "n/a" if test["p"] is None else f"{test['p']:.2g}"
    if test["n"] < 2:
        return f"{test['mean']:+.1f} (one seed)"
    return f"{test['mean']:+.1f} ± {test['se']:.1f} SE over {test['n']} seeds (SD {test['sd']:.1f}), paired t p {p}"
