"""The demo's command lines: every bad value ends in one line and exit status 2 before any
training (the experiments are replaced by sentinels that fail the test if reached); options go
before or after the subcommand; --out is checked first and the table survives a failing write."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from nvrm_ext.demo import __main__ as demo
from nvrm_ext.demo import experiments, tune

SUBCOMMANDS = ("label-noise", "perturbation", "forgetting", "noise-types", "regularizers")
REPO = Path(__file__).resolve().parents[1]

#: Bad values of the options every subcommand takes: (argv, the flag the message must name).
COMMON_INVALID = [
    (["--seeds", "0"], "--seeds"), (["--seeds", "1.5"], "--seeds"), (["--epochs", "0"], "--epochs"),
    (["--epochs", "-1"], "--epochs"), (["--lr", "-1"], "--lr"), (["--lr", "0"], "--lr"), (["--lr", "nan"], "--lr"),
    (["--variability", "-0.1"], "--variability"), (["--variability", "inf"], "--variability"),
    (["--weight-decay", "-1"], "--weight-decay"), (["--momentum", "-1"], "--momentum"),
    (["--momentum", "1"], "--momentum"), (["--hidden", "-3"], "--hidden"), (["--hidden", "0"], "--hidden"),
    (["--batch-size", "0"], "--batch-size"), (["--threads", "0"], "--threads"), (["--jobs", "0"], "--jobs"),
    (["--device", "gpu"], "--device"),
    (["--device", "cuda:99"], "--device"),
]
#: Bad values of each subcommand's own options (and options a subcommand does not use).
SUBCOMMAND_INVALID = [
    (["label-noise", "--rate", "1.5"], "--rate"), (["label-noise", "--rate", "-0.1"], "--rate"),
    (["label-noise", "--noise", "flip"], "--noise"),
    (["perturbation", "--sigmas", "-1"], "--sigmas"), (["perturbation", "--sigmas"], "--sigmas"),
    (["perturbation", "--sigmas", "0.1", "0.1"], "--sigmas"), (["perturbation", "--draws", "0"], "--draws"),
    (["forgetting", "--ewc", "-5"], "--ewc"), (["forgetting", "--tasks", "1"], "--tasks"),
    (["forgetting", "--momentum", "0.5"], "--momentum"),
    (["noise-types", "--scales", "0"], "--scales"), (["noise-types", "--scales", "-0.1"], "--scales"),
    (["noise-types", "--scales", "0.1", "0.10"], "--scales"), (["noise-types", "--rate", "2"], "--rate"),
    (["noise-types", "--variability", "0.1"], "--variability"),
    (["regularizers", "--disout-prob", "2"], "--disout-prob"),
    (["regularizers", "--disout-prob", "1"], "--disout-prob"),
    (["regularizers", "--amp-epsilon", "-1"], "--amp-epsilon"),
    (["regularizers", "--amp-inner-lr", "-1"], "--amp-inner-lr"),
    (["regularizers", "--disout-block-size", "0"], "--disout-block-size"),
    (["regularizers", "--disout-block-size", "9"], "--disout-block-size"),
    (["regularizers", "--disout-alpha", "-1"], "--disout-alpha"), (["regularizers", "--nsr-lam", "-1"], "--nsr-lam"),
    (["regularizers", "--nsr-queue-length", "-1"], "--nsr-queue-length"), (["regularizers", "--rate", "1.5"], "--rate"),
    (["no-such-experiment"], "SUBCOMMAND"), (["label-noise", "--lr"], "--lr"),
]


@pytest.fixture
def no_training(monkeypatch):
    """Every experiment and tuning entry point fails the test if it is reached."""
    def sentinel(*args, **kwargs):
        raise AssertionError("training started")
    for name in ("label_noise", "perturbation", "forgetting", "noise_types", "regularizers", "train_on_noisy_labels",
                 "forgetting_run", "train_regularized_cnn"):
        monkeypatch.setattr(experiments, name, sentinel)
    for name in ("tune_label_noise", "tune_forgetting", "tune_regularizers"):
        monkeypatch.setattr(tune, name, sentinel)


def assert_one_line_error(main, argv, flag, capsys, status=2):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    captured = capsys.readouterr()
    assert exit_info.value.code == status
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert " error: " in lines[0] and flag in lines[0]
    return lines[0]


@pytest.mark.parametrize("subcommand", SUBCOMMANDS)
@pytest.mark.parametrize("bad, flag", COMMON_INVALID, ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_bad_common_values_end_in_one_line_before_or_after_the_subcommand(
        tmp_path, capsys, no_training, subcommand, bad, flag):
    out = tmp_path / "out"
    after = assert_one_line_error(demo.main, [subcommand, "--out", str(out)] + bad, flag, capsys)
    before = assert_one_line_error(demo.main, bad + [subcommand, "--out", str(out)], flag, capsys)
    message = lambda line: line.partition(" error: ")[2].rpartition(" (see ")[0]  # noqa: E731
    assert message(after) == message(before)
    assert not out.exists()  # nothing created either


@pytest.mark.parametrize("argv, flag", SUBCOMMAND_INVALID, ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_bad_subcommand_values_end_in_one_line(tmp_path, capsys, no_training, argv, flag):
    assert_one_line_error(demo.main, argv + ["--seeds", "1", "--out", str(tmp_path / "out")], flag, capsys)
    assert not (tmp_path / "out").exists()


def test_cuda_is_refused_on_a_build_or_machine_without_it(capsys, no_training):
    import torch
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    line = assert_one_line_error(demo.main, ["--device", "cuda"], "--device", capsys)
    assert "CUDA" in line


@pytest.mark.parametrize("argv", [
    ["--rate", "0"], ["--rate", "1"], ["--momentum", "0"], ["--variability", "0"], ["--weight-decay", "0"],
    ["forgetting", "--ewc", "0", "--tasks", "2"], ["regularizers", "--disout-prob", "0", "--nsr-queue-length", "0",
                                                   "--disout-block-size", "8", "--amp-epsilon", "0", "--nsr-lam", "0"],
    ["perturbation", "--sigmas", "0"], ["--device", "cpu"],
])
def test_boundary_values_are_accepted(argv):
    demo.parse_args(argv)


@pytest.mark.parametrize("options, subcommand", [
    (["--seeds", "1"], ["perturbation"]),
    (["--seeds", "2", "--epochs=4", "--lr", "0.05", "--out", "perturbation"], ["forgetting", "--ewc", "3"]),
    (["--hidden", "16", "--batch-size", "32", "--device", "cpu", "--threads", "2", "--weight-decay", "0"],
     ["regularizers", "--disout-prob", "0.2"]),
    (["--variability", "0.2", "--momentum", "0.5"], ["label-noise", "--noise", "symmetric"]),
])
def test_options_are_the_same_before_or_after_the_subcommand(options, subcommand):
    after = vars(demo.parse_args(subcommand + options))
    before = vars(demo.parse_args(options + subcommand))
    assert after == before
    assert after != vars(demo.parse_args(subcommand))  # the options were read


def test_the_default_subcommand_follows_leading_common_options():
    args = demo.parse_args(["--seeds", "1", "--noise", "symmetric"])
    assert (args.experiment, args.seeds, args.noise) == ("label-noise", 1, "symmetric")
    args = demo.parse_args(["--out", "perturbation"])  # a value that is a subcommand's name
    assert (args.experiment, args.out) == ("label-noise", Path("perturbation"))
    assert demo.parse_args(["--epochs", "2", "forgetting", "--epochs", "3"]).epochs == 3  # the later one wins


def test_help_lists_every_subcommand_and_transfer_takes_its_options_after_it(capsys, no_training):
    with pytest.raises(SystemExit):
        demo.main(["--help"])
    listing = capsys.readouterr().out
    for name in ("label-noise", "perturbation", "forgetting", "noise-types", "regularizers", "transfer"):
        assert re.search(rf"^\s+{name}\s", listing, re.MULTILINE), name
    with pytest.raises(SystemExit) as exit_info:
        demo.main(["--seeds", "3", "transfer"])  # a common option before it: not transfer's parser
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "transfer takes its own options, after it" in error and len(error.strip().splitlines()) == 1
    with pytest.raises(SystemExit):
        demo.main(["perturbation", "--no-such-option", "2"])
    assert "unrecognized arguments: --no-such-option 2" in capsys.readouterr().err


def test_out_that_is_a_file_or_cannot_be_created_is_refused_first(tmp_path, capsys, no_training):
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    line = assert_one_line_error(demo.main, ["--out", str(a_file)], "--out", capsys)
    assert "not a directory" in line
    assert_one_line_error(demo.main, ["perturbation", "--out", str(a_file / "sub")], "--out", capsys)
    (tmp_path / "out" / "regularizers.json").mkdir(parents=True)  # a result file that cannot be written
    assert_one_line_error(demo.main, ["regularizers", "--out", str(tmp_path / "out")], "regularizers.json", capsys)
    assert_one_line_error(tune.main, ["label-noise", "--out", str(a_file)], "--out", capsys)


def test_out_that_is_not_writable_is_refused_first(tmp_path, capsys, no_training):
    if getattr(os, "geteuid", lambda: 0)() != 0:
        read_only = tmp_path / "read_only"
        read_only.mkdir(mode=0o500)
    elif Path("/sys/kernel").is_dir():
        read_only = Path("/sys/kernel")  # root writes into read-only directories, but not into sysfs
    else:
        pytest.skip("no directory here that this user cannot write into")
    line = assert_one_line_error(demo.main, ["--out", str(read_only)], "--out", capsys)
    assert "cannot write" in line
    assert_one_line_error(tune.main, ["forgetting", "--out", str(read_only)], "--out", capsys)


def test_out_is_created_before_training(tmp_path, monkeypatch):
    out = tmp_path / "new" / "dir"

    def check_out(*args, **kwargs):
        assert out.is_dir()
        raise KeyboardInterrupt  # stop here: the check is all this test needs
    monkeypatch.setattr(experiments, "perturbation", check_out)
    with pytest.raises(KeyboardInterrupt):
        demo.main(["perturbation", "--out", str(out)])


def test_the_table_is_printed_even_when_saving_fails(tmp_path, capsys, monkeypatch):
    """The output directory vanishes during the run (replaced by a file): the table is printed,
    then one line says the results were not saved, exit status 1."""
    out = tmp_path / "out"
    real_label_noise = experiments.label_noise

    def label_noise_then_lose_the_directory(*args, **kwargs):
        result = real_label_noise(*args, **kwargs)
        out.rmdir()
        out.write_text("")
        return result
    monkeypatch.setattr(experiments, "label_noise", label_noise_then_lose_the_directory)
    with pytest.raises(SystemExit) as exit_info:
        demo.main(["--epochs", "1", "--seeds", "1", "--hidden", "8", "--out", str(out)])
    captured = capsys.readouterr()
    assert exit_info.value.code == 1
    assert "| SGD |" in captured.out and "| NVRM-SGD |" in captured.out
    errors = [line for line in captured.err.splitlines() if " error: " in line]
    assert len(errors) == 1 and "not saved" in errors[0]


@pytest.mark.parametrize("argv, flag", [
    (["label-noise", "--epochs", "0"], "--epochs"), (["forgetting", "--epochs", "-2"], "--epochs"),
    (["regularizers", "--epochs", "x"], "--epochs"), (["everything"], "which"),
])
def test_tune_refuses_bad_values_in_one_line(tmp_path, capsys, no_training, argv, flag):
    assert_one_line_error(tune.main, argv + ["--out", str(tmp_path / "out")], flag, capsys)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv", [
    ["nvrm_ext.demo", "--epochs", "100000", "--device", "cuda:7", "perturbation"],
    ["nvrm_ext.demo", "regularizers", "--epochs", "100000", "--disout-prob", "2"],
    ["nvrm_ext.demo.tune", "label-noise", "--epochs", "0"],
])
def test_the_real_commands_fail_fast_with_one_line(tmp_path, argv):
    """As a user runs them: a fresh interpreter, the real experiments. With 100,000 epochs a run
    that started training would not end within the timeout (a hang guard, generous for loaded
    machines; the measured time is the import of torch, sklearn and matplotlib)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    completed = subprocess.run([sys.executable, "-m", *argv, "--out", str(tmp_path / "out")], cwd=tmp_path, env=env,
                               capture_output=True, text=True, timeout=120)
    assert completed.returncode == 2
    assert completed.stdout == ""
    assert len(completed.stderr.strip().splitlines()) == 1, completed.stderr
    assert not (tmp_path / "out").exists()


def test_results_record_the_command_and_land_in_out(tmp_path, capsys):
    """A good command line still runs: options before the subcommand, one epoch, tiny model."""
    assert demo.main(["--seeds", "1", "--epochs", "1", "--hidden", "8", "perturbation", "--sigmas", "0", "0.1",
                      "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "perturbation.json").read_text())
    assert result["config"]["seeds"] == 1 and result["config"]["hidden"] == 8
    assert result["command"].startswith("nvrm-demo --seeds 1 --epochs 1")
    out = capsys.readouterr().out
    assert out.index("|---|") < out.index("wrote ")  # the table before the files
