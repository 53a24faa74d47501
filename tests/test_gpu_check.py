"""bench/gpu_check.sh without a GPU: it refuses clearly, and every part that can run on a CPU
(test collection, bench rows, budgets, JSON, summary) runs in its --dry-run mode."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(not (ROOT / "bench" / "gpu_check.sh").is_file(),
                                reason="the checkout's bench/ is not here (tests run against an installed wheel)")

no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without a GPU")


@no_gpu
@pytest.mark.parametrize("command", [["bash", "bench/gpu_check.sh"], [sys.executable, "-m", "bench.gpu_check"]])
def test_refuses_without_a_gpu_in_one_line(command):
    # The script runs the interpreter it is given, this one (whether or not its venv is activated).
    env = dict(os.environ, PYTHON=sys.executable)
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.count("\n") == 1
    assert done.stderr.startswith("gpu_check: no CUDA GPU visible to torch (torch.cuda.is_available() is False)")


def test_the_script_runs_the_interpreter_it_is_given(tmp_path):
    """PYTHON, not whatever `python` is on PATH: here one that cannot import torch."""
    interpreter = tmp_path / "python-without-torch"
    interpreter.write_text("#!/bin/sh\nexit 1\n")
    interpreter.chmod(0o755)
    done = subprocess.run(["bash", "bench/gpu_check.sh"], cwd=ROOT, env=dict(os.environ, PYTHON=str(interpreter)),
                          capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr == f"gpu_check: {interpreter} cannot import torch; install PyTorch (a CUDA build) first\n"


def test_dry_run_writes_the_report_and_the_summary(tmp_path):
    out = tmp_path / "gpu.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench.gpu_check", "--dry-run", "--out", str(out),
         "--tests", "tests/test_gpu.py", "--bench-budget", "600"],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(out.read_text())
    assert report["dry_run"] and report["environment"]["device"] == "cpu"
    tests = report["tests"]
    assert tests["status"] == "passed" and "--collect-only" in tests["command"]
    assert "tests collected" in tests["summary"]
    rows = report["bench"]["rows"]
    assert report["bench"]["copy_gb_per_s"] > 0
    # 4 workloads x 2 families x 2 dtypes x 3 implementations, all within the generous budget
    assert len(rows) == 48 and {row["status"] for row in rows} == {"ok"}
    assert {row["implementation"] for row in rows} == {"nvrm-cpu", "torch-foreach", "original"}
    for row in rows:
        assert row["step_ms"] > 0 and row["achieved_gb_per_s"] > 0 and row["fraction_of_copy_bandwidth"] > 0
    lines = done.stdout.splitlines()
    assert lines[0].startswith("gpu_check on cpu") and lines[-1].startswith(f"written: {out}")
    assert len(lines) <= 24  # one screen


def test_a_spent_bench_budget_skips_the_remaining_rows_and_says_so():
    """Deterministic (no race with the machine's speed): a budget spent before the first row."""
    from bench.gpu_check import run_bench

    rows = run_bench(torch.device("cpu"), budget=0.0, dry_run=True)["rows"]
    assert len(rows) == 48
    assert all(row["status"] == "skipped" and row["reason"] == "time budget spent" for row in rows)
