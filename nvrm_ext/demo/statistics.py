"""Paired comparisons between the arms of an experiment, and when a difference counts as shown.

Within a seed every arm shares the data split, the label noise, the initial weights and the batch
order, so the seed-to-seed spread (several points of test accuracy on this task) is common to the
arms and cancels in the per-seed difference. The evidence for "method beats baseline" is therefore
the paired difference, not two overlapping mean ± std: its mean, a 95% Student-t confidence
interval over seeds, and the number of seeds where the method wins. An interval that includes 0
is reported as "not shown", whatever the sign of the mean.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats

CONFIDENCE = 0.95
MINUS = "\u2212"


@dataclass(frozen=True)
class PairedDifference:
    """method − baseline over seeds (in the units of the values given)."""

    mean: float
    low: float  # the confidence interval; -inf/inf where it is undefined (fewer than 2 seeds)
    high: float
    wins: int  # seeds where the method is strictly better (higher, or lower where lower is better)
    n: int

    @property
    def shown(self) -> bool:
        """The interval excludes 0: the sign of the difference is established at CONFIDENCE."""
        return self.low > 0 or self.high < 0


def paired_difference(values, baseline, higher_is_better: bool = True,
                      confidence: float = CONFIDENCE) -> PairedDifference:
    """The mean of values − baseline (paired by position, i.e. by seed), its two-sided Student-t
    confidence interval (n − 1 degrees of freedom, sample standard deviation) and the wins."""
    values, baseline = np.asarray(values, dtype=float), np.asarray(baseline, dtype=float)
    if values.shape != baseline.shape or values.ndim != 1 or values.size == 0:
        raise ValueError(f"paired samples must be two equally long, non-empty lists; got shapes "
                         f"{values.shape} and {baseline.shape}")
    differences = values - baseline
    n, mean = differences.size, float(differences.mean())
    if n < 2:
        low, high = -math.inf, math.inf
    else:
        half_width = stats.t.ppf(0.5 + confidence / 2, n - 1) * differences.std(ddof=1) / math.sqrt(n)
        low, high = mean - half_width, mean + half_width
    wins = int((differences > 0).sum() if higher_is_better else (differences < 0).sum())
    return PairedDifference(mean, float(low), float(high), wins, n)


def signed(value: float, digits: int = 1) -> str:
    """'+3.4', '−0.9' (a typographic minus), '+0.0'."""
    text = f"{round(value, digits) + 0.0:+.{digits}f}"  # + 0.0: no '−0.0'
    return text.replace("-", MINUS)


def interval(difference: PairedDifference, scale: float = 100.0) -> str:
    """'+3.4 [−0.9, +7.6]': the mean difference and its interval, times `scale` (percentage points)."""
    if difference.n < 2:
        return f"{signed(scale * difference.mean)} [no interval from 1 seed]"
    return (f"{signed(scale * difference.mean)} "
            f"[{signed(scale * difference.low)}, {signed(scale * difference.high)}]")


def verdict(difference: PairedDifference, scale: float = 100.0) -> str:
    """The interval, prefixed by 'not shown: ' where it includes 0."""
    return interval(difference, scale) if difference.shown else f"not shown: {interval(difference, scale)}"


def wins(difference: PairedDifference) -> str:
    return f"{difference.wins} of {difference.n}"


# ------------------------------------------------------------------ which arms each experiment pairs
@dataclass(frozen=True)
class Comparison:
    """One paired comparison of an experiment: a method against its baseline on one metric."""

    method: str  # keys of result["runs"] (or "Gaussian 0.03" style labels for noise-types)
    baseline: str
    metric: str  # what the values are, for the table
    values: list
    baseline_values: list
    higher_is_better: bool = True

    def difference(self) -> PairedDifference:
        return paired_difference(self.values, self.baseline_values, self.higher_is_better)


NOISY_FIT = "fits noisy train labels (lower wins)"
CLEAN_TEST = "clean test acc"


def _final(runs: list, metric: str) -> list:
    return [run[metric][-1] for run in runs]


def comparisons(result: dict) -> list[Comparison]:
    """The paired comparisons behind an experiment's claims (the baseline is the run without the
    method: SGD, Adam, or Adam + EWC for NVRM-Adam + EWC)."""
    experiment, runs = result["experiment"], result["runs"]
    if experiment in ("label-noise", "regularizers"):
        baseline = next(iter(runs))
        return [Comparison(key, baseline, metric_name, _final(runs[key], metric), _final(runs[baseline], metric),
                           higher)
                for key in runs if key != baseline
                for metric, metric_name, higher in (("noisy_train", NOISY_FIT, False), ("test", CLEAN_TEST, True))]
    if experiment == "perturbation":
        sigmas = result["config"]["sigmas"]
        baseline = next(iter(runs))  # the first arm: SGD

        def pick(key, metric, i=None):
            return [run[metric] if i is None else run[metric][i] for run in runs[key]]
        rows = []
        for method in (key for key in runs if key != baseline):
            rows += [Comparison(method, baseline, "test acc", pick(method, "test"), pick(baseline, "test")),
                     Comparison(method, baseline, "gap (train − test; lower wins)", pick(method, "gap"),
                                pick(baseline, "gap"), higher_is_better=False)]
            rows += [Comparison(method, baseline, f"test acc, σ={sigma:g}", pick(method, "perturbed_test", i),
                                pick(baseline, "perturbed_test", i))
                     for i, sigma in enumerate(sigmas) if sigma > 0]
        return rows
    if experiment == "forgetting":
        pairs = [("nvrm-adam", "adam"), ("adam+ewc", "adam"), ("nvrm-adam+ewc", "adam+ewc")]
        tasks = result["config"]["num_tasks"]
        return [Comparison(method, baseline, metric_name, _final(runs[method], metric), _final(runs[baseline], metric))
                for method, baseline in pairs if method in runs and baseline in runs
                for metric, metric_name in (("base_task", f"task 0 acc after task {tasks - 1}"),
                                            ("mean_seen", f"mean acc over all {tasks} tasks"))]
    if experiment == "noise-types":
        kinds = [key for key in runs if key != "sgd"]
        return [Comparison(f"{kind} {scale}", "sgd", metric_name, _final(runs[kind][scale], metric),
                           _final(runs["sgd"], metric), higher)
                for kind in kinds for scale in runs[kind]
                for metric, metric_name, higher in (("noisy_train", NOISY_FIT, False), ("test", CLEAN_TEST, True))]
    raise ValueError(f"unknown experiment {experiment!r}")


def find(result: dict, method: str, metric: str) -> Comparison:
    """The comparison of `method` on the metric whose name starts with `metric`."""
    for comparison in comparisons(result):
        if comparison.method == method and comparison.metric.startswith(metric):
            return comparison
    raise KeyError(f"{result['experiment']}: no comparison of {method!r} on {metric!r}")
