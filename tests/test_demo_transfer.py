"""The transfer experiment (nvrm_ext/demo/transfer.py): its statistics against scipy, its models,
its optimizers, and a tiny end-to-end run through `nvrm-demo transfer`."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")
stats = pytest.importorskip("scipy.stats")

from nvrm_ext import FusedVAdam, FusedVSGD  # noqa: E402
from nvrm_ext.demo import transfer  # noqa: E402
from nvrm_ext.demo.__main__ import main as demo_main  # noqa: E402
from nvrm_ext.demo.training import OptimizerConfig, make_optimizer  # noqa: E402


# ------------------------------------------------------------------------------ statistics
def test_paired_difference_known_numbers():
    # differences 1, 2, 3: mean 2, sample std 1, t(0.975, 2) = 4.302653 -> 2 ± 2.484138
    d = transfer.paired_difference([2.0, 4.0, 6.0], [1.0, 2.0, 3.0])
    assert d["mean"] == pytest.approx(2.0) and d["std"] == pytest.approx(1.0)
    assert d["low"] == pytest.approx(2 - 2.484138, abs=1e-6) and d["high"] == pytest.approx(2 + 2.484138, abs=1e-6)
    assert d["wins"] == 3 and d["n"] == 3 and not d["shown"]  # the interval includes 0


@pytest.mark.parametrize("n", [2, 5, 10])
def test_paired_difference_matches_scipy_ttest_rel(n):
    rng = np.random.default_rng(n)
    values, baseline = rng.normal(0.6, 0.05, n), rng.normal(0.55, 0.05, n)
    d = transfer.paired_difference(values, baseline)
    interval = stats.ttest_rel(values, baseline).confidence_interval(0.95)
    assert d["low"] == pytest.approx(interval.low, rel=1e-9) and d["high"] == pytest.approx(interval.high, rel=1e-9)
    assert d["mean"] == pytest.approx(np.mean(values - baseline))
    assert d["shown"] == (interval.low > 0 or interval.high < 0)


def test_paired_difference_wins_and_shown_when_lower_is_better():
    values, baseline = [0.5, 0.48, 0.49, 0.47, 0.6], [0.6] * 5
    d = transfer.paired_difference(values, baseline, higher_is_better=False)
    assert d["wins"] == 4  # the tie is not a win
    assert d["shown"] and d["high"] < 0
    assert transfer.verdict(d).startswith("\u2212")
    up = transfer.paired_difference(values, baseline, higher_is_better=True)
    assert up["wins"] == 0 and up["shown"]  # shown is about the sign, not about winning


def test_paired_difference_one_seed_and_bad_input():
    d = transfer.paired_difference([0.7], [0.6])
    assert d["low"] is None and d["high"] is None and not d["shown"]
    assert transfer.verdict(d).startswith("not shown")
    with pytest.raises(ValueError, match="equally long"):
        transfer.paired_difference([0.1, 0.2], [0.1])
    with pytest.raises(ValueError, match="non-empty"):
        transfer.paired_difference([], [])


def test_verdict_says_not_shown_whatever_the_sign():
    positive = transfer.paired_difference([0.7, 0.6, 0.9], [0.6, 0.65, 0.6])
    assert not positive["shown"] and positive["mean"] > 0
    assert transfer.verdict(positive).startswith("not shown: +")


# ------------------------------------------------------------------------------ models and optimizers
@pytest.mark.parametrize("family", ["mlp", "cnn"])
def test_scaled_models_are_the_same_initialisation_times_the_scale(family):
    base = list(transfer.build_scaled_model(f"{family} x1", seed=3).parameters())
    for scale in (0.5, 2.0):
        scaled = list(transfer.build_scaled_model(f"{family} x{scale:g}", seed=3).parameters())
        for p, q in zip(base, scaled):
            assert torch.equal(q, p * scale)  # powers of two: exact


def test_unknown_model_is_refused():
    with pytest.raises(ValueError, match="unknown model"):
        transfer.parse_model("resnet x1")


@pytest.mark.parametrize("name, kind", [("nvrm-sgd", FusedVSGD), ("nvrm-adam", FusedVAdam)])
@pytest.mark.parametrize("relative", [False, True])
def test_demo_optimizers_pass_relative_through(name, kind, relative):
    model = torch.nn.Linear(4, 3)
    optimizer = make_optimizer(OptimizerConfig(name, 0.01, variability=0.5, relative=relative),
                               model.parameters(), steps_per_epoch=7, seed=0)
    assert isinstance(optimizer, kind)
    assert optimizer.param_groups[0]["relative"] is relative


def test_relative_arm_noise_follows_the_weight_scale():
    """On the x2 model the relative arm's first noise is twice the x1 model's (same seed, same
    draws, spread doubled); the absolute arm's is the same on both."""
    noises = {}
    for relative in (False, True):
        for key in ("mlp x1", "mlp x2"):
            model = transfer.build_scaled_model(key, seed=0)
            optimizer = make_optimizer(OptimizerConfig("nvrm-sgd", 0.1, momentum=0.0, weight_decay=0.0,
                                                       variability=0.5 if relative else 0.03, relative=relative),
                                       model.parameters(), steps_per_epoch=5, seed=0)
            before = [p.detach().clone() for p in model.parameters()]
            for p in model.parameters():
                p.grad = torch.zeros_like(p)
            optimizer.step()  # zero gradients, no decay: the weights change by the noise alone
            noises[relative, key] = [p.detach() - b for p, b in zip(model.parameters(), before)]
    for a, b in zip(noises[False, "mlp x1"], noises[False, "mlp x2"]):
        torch.testing.assert_close(a, b)
    for a, b in zip(noises[True, "mlp x1"], noises[True, "mlp x2"]):
        torch.testing.assert_close(b, 2 * a, rtol=1e-4, atol=1e-7)
        assert a.abs().max() > 0


# ------------------------------------------------------------------------------ end to end
def test_transfer_subcommand_runs_and_its_table_is_paired(tmp_path, capsys):
    assert demo_main(["transfer", "--seeds", "3", "--epochs", "1", "--models", "mlp x0.5", "mlp x1",
                      "--jobs", "1", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "transfer.json").read_text())
    assert (tmp_path / "transfer.png").stat().st_size > 0
    assert list(result["summary"]) == ["mlp x0.5", "mlp x1"]
    for key, entry in result["summary"].items():
        runs = result["runs"][key]
        sgd = [r["test"][-1] for r in runs["sgd"]]
        for arm in ("absolute", "relative"):
            values = [r["test"][-1] for r in runs[arm]]
            interval = stats.ttest_rel(values, sgd).confidence_interval(0.95)
            d = entry["paired_to_sgd"][arm]["test"]
            if math.isfinite(interval.low):  # two identical-difference seeds would give nan
                assert d["low"] == pytest.approx(interval.low) and d["high"] == pytest.approx(interval.high)
            assert d["n"] == 3 and d["wins"] == sum(v > s for v, s in zip(values, sgd))
        fits = {arm: [r["noisy_train"][-1] for r in runs[arm]] for arm in ("absolute", "relative")}
        d = entry["relative_vs_absolute"]["noisy_train"]
        assert d["mean"] == pytest.approx(np.mean(np.subtract(fits["relative"], fits["absolute"])))
        assert d["wins"] == sum(r < a for r, a in zip(fits["relative"], fits["absolute"]))  # lower fit wins
    assert not (tmp_path / "transfer.partial.jsonl").exists()  # kept only while runs are missing
    printed = capsys.readouterr().out
    assert f"relative {transfer.DEFAULT_RELATIVE:g}" in printed and "absolute 0.03" in printed and "mlp x0.5" in printed


def test_worker_processes_give_the_numbers_of_one_process():
    """--jobs only decides where the runs train: each run seeds its own model, data and noise."""
    settings = dict(seeds=2, epochs=1, models=("mlp x0.5",))
    kept = []
    alone = transfer.transfer(**settings, jobs=1)
    pooled = transfer.transfer(**settings, jobs=2, on_result=lambda seed, key, numbers: kept.append(seed))
    assert pooled["runs"] == alone["runs"] and pooled["summary"] == alone["summary"]
    assert sorted(kept) == [0, 1]


@pytest.mark.parametrize("argv, message", [
    (["--models", "resnet x1"], "invalid choice"),
    (["--models", "mlp x1", "mlp x1"], "each model once"),
    (["--seeds", "0"], "--seeds"),
])
def test_transfer_bad_options_exit_2_with_one_line(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        demo_main(["transfer", *argv, "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert message in error and len(error.strip().splitlines()) == 1
    assert not (tmp_path / "transfer.json").exists()


def test_results_document_holds_the_table_of_the_committed_json():
    """docs/demo/RESULTS.md's transfer table is the one drawn from docs/demo/transfer.json, and that
    JSON's paired statistics are the ones its own runs give."""
    from pathlib import Path
    docs = Path(__file__).resolve().parent.parent / "docs" / "demo"
    if not (docs / "transfer.json").exists():  # the suite run against an installed wheel has no docs/
        pytest.skip("docs/demo/transfer.json is not beside these tests (not a checkout)")
    result = json.loads((docs / "transfer.json").read_text())
    assert transfer.markdown(result) in (docs / "RESULTS.md").read_text()
    for key, entry in result["summary"].items():
        runs = result["runs"][key]
        finals = {arm: [r["test"][-1] for r in runs[arm]] for arm in transfer.ARMS}
        interval = stats.ttest_rel(finals["relative"], finals["absolute"]).confidence_interval(0.95)
        d = entry["relative_vs_absolute"]["test"]
        assert (d["low"], d["high"]) == (pytest.approx(interval.low), pytest.approx(interval.high))
        assert d["n"] == result["config"]["seeds"] == 10
