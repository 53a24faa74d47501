"""The demo: label noise is exactly what it claims, the tasks are permutations, and every
subcommand runs end to end and writes its PNG and JSON."""
import json

import numpy as np
import pytest
import torch

from nvrm_ext.demo.__main__ import main, parse_args
from nvrm_ext.demo.data import corrupt_labels, load_digits_split, permutation_tasks
from nvrm_ext.demo.experiments import REGULARIZER_METHODS
from nvrm_ext.demo.training import build_cnn
from nvrm_ext.nn import Disout


@pytest.fixture(scope="module")
def labels():
    return load_digits_split(seed=0).y_train.numpy()


@pytest.mark.parametrize("rate", [0.0, 0.2, 0.4, 1.0])
def test_pair_flip_changes_exactly_the_rate_to_the_next_class(labels, rate):
    noisy = corrupt_labels(labels, rate, "pair", seed=1)
    changed = noisy != labels
    assert changed.sum() == round(rate * labels.size)
    assert np.array_equal(noisy[changed], (labels[changed] + 1) % 10)


@pytest.mark.parametrize("rate", [0.2, 0.4, 0.8])
def test_symmetric_noise_changes_exactly_the_rate_to_other_classes(labels, rate):
    noisy = corrupt_labels(labels, rate, "symmetric", seed=1)
    changed = noisy != labels
    assert changed.sum() == round(rate * labels.size)  # every chosen label moves to a different class
    assert set(np.unique(noisy[changed])) == set(range(10))
    offsets = (noisy[changed] - labels[changed]) % 10
    assert set(np.unique(offsets)) == set(range(1, 10))  # not just a pair flip


def test_label_noise_is_reproducible_and_leaves_input_alone(labels):
    original = labels.copy()
    first = corrupt_labels(labels, 0.4, "symmetric", seed=3)
    assert np.array_equal(first, corrupt_labels(labels, 0.4, "symmetric", seed=3))
    assert not np.array_equal(first, corrupt_labels(labels, 0.4, "symmetric", seed=4))
    assert np.array_equal(labels, original)


def test_label_noise_rejects_bad_arguments(labels):
    with pytest.raises(ValueError):
        corrupt_labels(labels, 0.4, "asymmetric", seed=0)
    with pytest.raises(ValueError):
        corrupt_labels(labels, 1.5, "pair", seed=0)


def test_permutation_tasks_are_permutations_and_task_0_is_identity():
    tasks = permutation_tasks(5, 64, seed=0)
    assert len(tasks) == 5
    assert torch.equal(tasks[0], torch.arange(64))
    for task in tasks:
        assert torch.equal(task.sort().values, torch.arange(64))
    assert len({tuple(t.tolist()) for t in tasks}) == 5
    assert all(torch.equal(a, b) for a, b in zip(tasks, permutation_tasks(5, 64, seed=0)))


def test_label_noise_is_the_default_subcommand():
    assert parse_args([]).experiment == "label-noise"
    assert parse_args(["--epochs", "2"]).experiment == "label-noise"
    assert parse_args(["forgetting"]).lr == 3e-4  # per-experiment defaults


@pytest.mark.parametrize("argv, stem", [
    (["label-noise", "--noise", "symmetric"], "label_noise"),
    (["perturbation", "--sigmas", "0", "0.05"], "perturbation"),
    (["forgetting", "--tasks", "3", "--ewc", "10"], "forgetting"),
    (["noise-types", "--scales", "0.03", "0.1"], "noise_types"),
])
def test_cli_runs_end_to_end_and_writes_png_and_json(tmp_path, capsys, argv, stem):
    assert main(argv + ["--epochs", "1", "--seeds", "1", "--hidden", "32", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / f"{stem}.json").read_text())
    assert result["experiment"] == argv[0]
    assert result["summary"] and result["runs"]
    png = (tmp_path / f"{stem}.png").read_bytes()
    assert png.startswith(b"\x89PNG")
    assert "|---|" in capsys.readouterr().out  # the results table


def test_default_cli_run_with_full_model(tmp_path):
    """The real default model (2x512) and the default subcommand, one epoch, one seed."""
    assert main(["--epochs", "1", "--seeds", "1", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "label_noise.json").read_text())
    assert set(result["summary"]) == {"sgd", "nvrm-sgd", "psgd"}
    assert result["config"]["rate"] == 0.4 and result["config"]["noise"] == "pair"
    assert len(result["runs"]["sgd"][0]["test"]) == 1


@pytest.mark.parametrize("distortion", [None, Disout(0.2, block_size=3, alpha=5.0)])
def test_cnn_takes_the_flattened_8x8_digits(distortion):
    """The CNN reads the same (N, 64) tensors as the MLP; Disout sits on its 8x8 conv maps."""
    images = load_digits_split(seed=0).x_train[:16]
    torch.manual_seed(0)
    model = build_cnn(hidden=24, distortion=distortion)
    model.train()
    logits = model(images)
    assert logits.shape == (16, 10)
    assert model.conv2(model.conv1(model.image(images))).shape == (16, 64, 8, 8)
    logits.sum().backward()  # Disout included
    assert all(p.grad is not None for p in model.parameters())
    torch.manual_seed(0)
    plain = build_cnn(hidden=24)
    assert all(torch.equal(a, b) for a, b in zip(plain.parameters(), model.parameters()))  # same init


def test_regularizers_subcommand_compares_every_method(tmp_path):
    """Default CNN width, one epoch, one seed: every method trains and is reported."""
    args = parse_args(["regularizers"])
    assert (args.hidden, args.noise, args.rate, args.seeds) == (128, "pair", 0.4, 3)
    assert parse_args(["label-noise"]).hidden == 512
    assert main(["regularizers", "--epochs", "1", "--seeds", "1", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "regularizers.json").read_text())
    assert list(result["summary"]) == list(REGULARIZER_METHODS)
    assert result["config"]["hyperparameter_source"]
    for method in REGULARIZER_METHODS:
        assert len(result["runs"][method]) == 1 and len(result["runs"][method][0]["test"]) == 1
    assert (tmp_path / "regularizers.png").read_bytes().startswith(b"\x89PNG")
