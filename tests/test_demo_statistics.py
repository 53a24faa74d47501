"""The demo's paired statistics: intervals as scipy computes them, the "not shown" rule, which arms
each experiment pairs; and its runs: the same numbers in parallel processes as in one, and a log
without progress-bar frames when the output is not a terminal."""
import io
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from scipy import stats

from nvrm_ext.demo import experiments
from nvrm_ext.demo.reporting import difference_table
from nvrm_ext.demo.runner import EpochProgress, Run, Runner
from nvrm_ext.demo.statistics import comparisons, paired_difference, verdict, wins

REPO = Path(__file__).resolve().parents[1]


def test_interval_is_scipys_paired_t_interval():
    method = [0.71, 0.64, 0.80, 0.69, 0.75, 0.66, 0.73]
    baseline = [0.65, 0.66, 0.71, 0.60, 0.74, 0.61, 0.70]
    expected = stats.ttest_rel(method, baseline).confidence_interval(0.95)
    difference = paired_difference(method, baseline)
    assert difference.low == pytest.approx(expected.low, rel=1e-12)
    assert difference.high == pytest.approx(expected.high, rel=1e-12)
    assert difference.mean == pytest.approx(sum(m - b for m, b in zip(method, baseline)) / 7, rel=1e-12)
    assert (difference.wins, difference.n) == (6, 7)


def test_interval_of_a_known_sample_by_hand():
    """Differences 1, 2, 3, 4: mean 2.5, sample sd sqrt(5/3), t(0.975, 3) = 3.182446305284263."""
    difference = paired_difference([1, 2, 3, 4], [0, 0, 0, 0])
    half_width = 3.182446305284263 * math.sqrt(5 / 3) / 2
    assert (difference.low, difference.high) == pytest.approx((2.5 - half_width, 2.5 + half_width), rel=1e-12)
    assert difference.shown  # [0.446, 4.554]


def test_wins_follow_the_direction_and_ties_are_not_wins():
    assert paired_difference([3, 1, 2, 2], [2, 2, 2, 1]).wins == 2
    assert paired_difference([3, 1, 2, 2], [2, 2, 2, 1], higher_is_better=False).wins == 1


@pytest.mark.parametrize("method, baseline, shown", [
    ([1.0, 2.0, -0.5, 1.5], [0.0] * 4, False),  # positive mean, interval includes 0
    ([-1.0, -2.0, 0.5, -1.5], [0.0] * 4, False),  # negative mean, the same
    ([-1.0, -2.0, -1.2, -1.5], [0.0] * 4, True),  # interval below 0
    ([0.3, 0.3, 0.3], [0.1, 0.1, 0.1], True),  # no spread: the interval is the point, away from 0
    ([0.1, 0.2], [0.1, 0.2], False),  # no difference at all
    ([0.9], [0.1], False),  # one seed: no interval
])
def test_not_shown_whenever_the_interval_includes_zero(method, baseline, shown):
    difference = paired_difference(method, baseline)
    assert difference.shown is shown
    assert verdict(difference).startswith("not shown") is not shown


def test_verdict_text():
    difference = paired_difference([0.80, 0.70, 0.75], [0.70, 0.72, 0.70])  # +4.3 points, sd 6.0, t(0.975, 2) = 4.30
    assert verdict(difference) == "not shown: +4.3 [−10.6, +19.3]"
    assert wins(difference) == "2 of 3"
    assert verdict(paired_difference([0.5, 0.6, 0.55], [0.4, 0.5, 0.46])) == "+9.7 [+8.2, +11.1]"
    assert verdict(paired_difference([0.5], [0.4])) == "not shown: +10.0 [no interval from 1 seed]"


def test_unpaired_samples_are_refused():
    with pytest.raises(ValueError, match="equally long"):
        paired_difference([1, 2, 3], [1, 2])
    with pytest.raises(ValueError, match="non-empty"):
        paired_difference([], [])


def _curves(*finals):
    return [{"noisy_train": [0.0, f], "test": [0.0, f]} for f in finals]


def test_each_method_is_paired_with_its_baseline_seed_by_seed():
    result = {"experiment": "label-noise", "config": {},
              "runs": {"sgd": _curves(0.5, 0.6, 0.7), "nvrm-sgd": _curves(0.6, 0.7, 0.8),
                       "psgd": _curves(0.1, 0.2, 0.3)}}
    found = {(c.method, c.baseline, c.metric): c.difference() for c in comparisons(result)}
    assert set(found) == {(m, "sgd", metric) for m in ("nvrm-sgd", "psgd")
                          for metric in ("fits noisy train labels (lower wins)", "clean test acc")}
    assert found["nvrm-sgd", "sgd", "clean test acc"].mean == pytest.approx(0.1)
    assert found["nvrm-sgd", "sgd", "clean test acc"].wins == 3
    assert found["nvrm-sgd", "sgd", "fits noisy train labels (lower wins)"].wins == 0  # fits more: no win
    assert found["psgd", "sgd", "clean test acc"].mean == pytest.approx(-0.4)
    perturbation = {"experiment": "perturbation", "config": {"sigmas": [0.0, 0.1]},
                    "runs": {"sgd": [{"test": 0.9, "gap": 0.05, "perturbed_test": [0.9, 0.5]}] * 2,
                             "nvrm-sgd": [{"test": 0.95, "gap": 0.02, "perturbed_test": [0.95, 0.7]}] * 2}}
    rows = comparisons(perturbation)
    assert [c.metric for c in rows] == ["test acc", "gap (train − test; lower wins)", "test acc, σ=0.1"]
    assert all(c.method == "nvrm-sgd" and c.baseline == "sgd" and c.difference().wins == 2 for c in rows)
    assert "| NVRM-SGD − SGD | test acc, σ=0.1 | +20.0 [+20.0, +20.0] | 2 of 2 |" in difference_table(perturbation)


# ------------------------------------------------------------------------------------ the runs
TINY = dict(seeds=2, epochs=1, hidden=8, batch_size=256)


#: Each worker process imports torch afresh: generous on a loaded machine.
SUBPROCESS_TIMEOUT = 900


@pytest.mark.timeout(SUBPROCESS_TIMEOUT)
@pytest.mark.parametrize("experiment, options, runs", [
    ("label_noise", {}, 3 * 2),
    ("regularizers", {"methods": ("sgd", "sgd+disout")}, 2 * 2),  # Disout draws from torch's global generator
])
def test_runs_in_two_processes_give_the_numbers_of_one(experiment, options, runs):
    def results(jobs):
        runner = Runner(experiment, jobs=jobs, stream=io.StringIO(), interactive=False)
        result = getattr(experiments, experiment)(experiments.Common(**TINY, runner=runner), **options)
        return result["runs"], runner.stream.getvalue()

    sequential, sequential_log = results(1)
    parallel, parallel_log = results(2)
    assert parallel == sequential
    assert len(sequential_log.splitlines()) == len(parallel_log.splitlines()) == runs


def _square(value):
    return value * value


def test_the_runner_keeps_the_order_of_the_runs_and_its_bar_only_on_a_terminal():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    runs = [Run(f"square {v}", _square, {"value": v}) for v in range(5)]
    log = io.StringIO()
    assert Runner("squares", jobs=1, stream=log).map(runs) == [0, 1, 4, 9, 16]
    assert "\r" not in log.getvalue() and len(log.getvalue().splitlines()) == 5
    terminal = Terminal()
    assert Runner("squares", jobs=1, stream=terminal).map(runs) == [0, 1, 4, 9, 16]
    assert "\r" in terminal.getvalue() and "run 1/5 done" not in terminal.getvalue()  # the bar, no lines


@pytest.mark.timeout(SUBPROCESS_TIMEOUT)
def test_a_piped_demo_log_has_one_line_per_run_and_no_bar_frames(tmp_path):
    """The demo as a CI job runs it: stderr is a pipe, not a terminal."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    completed = subprocess.run([sys.executable, "-m", "nvrm_ext.demo", "--seeds", "2", "--epochs", "1", "--hidden", "8",
                                "--out", str(tmp_path)], cwd=tmp_path, env=env, capture_output=True, text=True,
                               timeout=SUBPROCESS_TIMEOUT - 60)
    assert completed.returncode == 0, completed.stderr
    assert "\r" not in completed.stderr and "\r" not in completed.stdout
    lines = completed.stderr.splitlines()
    assert len(lines) == 3 * 2, completed.stderr  # 3 optimizers x 2 seeds, nothing else
    assert all(re.fullmatch(r"label-noise: run [1-6]/6 done: \S+ seed [01] \(\d+\.\d s, test acc \d+\.\d%\)", line)
               for line in lines), lines
    assert "| NVRM-SGD − SGD | clean test acc |" in completed.stdout


def test_tuning_progress_is_a_bar_on_a_terminal_and_one_line_per_run_elsewhere():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    def tick_through(progress, runs, epochs):
        with progress:
            for run in range(runs):
                for _ in range(epochs):
                    progress.set_postfix_str(f"arm seed {run}")
                    progress.update(1)

    log = io.StringIO()
    tick_through(EpochProgress(3, 4, "tune label-noise", stream=log), 3, 4)
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue() and len(lines) == 3, lines
    assert all(re.fullmatch(rf"tune label-noise: run {k + 1}/3 done: arm seed {k} \(\d+\.\d s\)", line)
               for k, line in enumerate(lines)), lines
    terminal = Terminal()
    tick_through(EpochProgress(3, 4, "tune label-noise", stream=terminal), 3, 4)
    assert "\r" in terminal.getvalue() and "done:" not in terminal.getvalue()
