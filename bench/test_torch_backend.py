"""The 'torch' backend against the original algorithm it replaces, side by side.

backend='torch' is what a device without a fused kernel runs (MPS, XPU, float64 parameters);
its goal is to be no slower than the original per-tensor VSGD / VAdam (nvrm_ext/original.py)
on the same device. Measured here on the CPU with the backend forced, torch on 2 threads, on
the 2,000 x 1k and the 8M / 64-tensor lists (bench/workloads.py; smoke: their tiny versions).

One benchmark row per (family, workload, kept noise or not): the timed callable is one
FusedVSGD / FusedVAdam step with backend='torch' (by default the large tensors' step programs keep
the noise they put on and subtract it at the next step; "drawn-noise" rows run with
NVRM_TORCH_NOISE_CACHE=0, which draws it again); one original step runs in pytest-benchmark's setup before every
timed round and is timed by hand, so that both see the same load on a shared machine (paired,
interleaved). ``extra_info`` holds each one's fastest and median wall time and median process
CPU time (both torch threads), and the ratios ``torch_over_original`` (fastest rounds),
``torch_over_original_median`` and ``torch_over_original_cpu_time`` (goal: <= 1.0), with the
load average at the start and the end. The warm-up includes the torch backend's compilation of
its noise program (torch_noise.py; cached on disk by torch after the first run). Timings are
never asserted.

    pytest bench/test_torch_backend.py --benchmark-json=bench/results/torch_backend_cpu.json
"""
from __future__ import annotations

import os
import time

import pytest
import torch

from .conftest import _profile
from .measure import paired_step_statistics, step_statistics_info
from .optimizers import _BUILDERS
from .workloads import workloads

WORKLOADS = ("tiny", "equal")  # 2,000 x 1k (per-tensor cost), 64 x 125k = 8M (per-element cost)
THREADS = 2
MIN_ROUNDS = {"smoke": 1, "cpu": 7, "full": 7}
MAX_ROUNDS = 200  # below num_iters (1000): every step swaps noise in and out


def pytest_generate_tests(metafunc):
    if "torch_workload" in metafunc.fixturenames:
        chosen = [w for w in workloads(_profile(metafunc.config)) if w.name in WORKLOADS]
        metafunc.parametrize("torch_workload", chosen, ids=[w.name for w in chosen])


class TimedStep:
    """optimizer.step(); its wall time appended to `seconds`, the process's CPU time (all torch
    threads) to `cpu_seconds`."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer
        self.seconds: list[float] = []
        self.cpu_seconds: list[float] = []

    def __call__(self) -> None:
        start, start_cpu = time.perf_counter(), time.process_time()
        self.optimizer.step()
        self.seconds.append(time.perf_counter() - start)
        self.cpu_seconds.append(time.process_time() - start_cpu)


@pytest.fixture
def two_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("kept_noise", [True, False], ids=["kept-noise", "drawn-noise"])
@pytest.mark.parametrize("family", ["sgd", "adam"])
def test_torch_backend_vs_original(benchmark, torch_workload, family, kept_noise, bench_seconds, pytestconfig,
                                   make_params, two_threads, monkeypatch):
    if not kept_noise:  # the large tensors' step programs draw the old noise again (nothing kept)
        monkeypatch.setenv("NVRM_TORCH_NOISE_CACHE", "0")
    steps = {"torch": TimedStep(_BUILDERS[("nvrm", family)](make_params(torch_workload), "torch")),
             "original": TimedStep(_BUILDERS[("original", family)](make_params(torch_workload), None))}
    load_at_start = os.getloadavg()[0]
    for _ in range(3):  # warm-up: state, launch data, the compiled noise program
        steps["original"]()
        steps["torch"]()
    round_seconds = sum(min(step.seconds[1:]) for step in steps.values())
    rounds = 1 if benchmark.disabled else max(MIN_ROUNDS[_profile(pytestconfig)],
                                              min(MAX_ROUNDS, int(bench_seconds / round_seconds)))
    for step in steps.values():
        step.seconds.clear()
        step.cpu_seconds.clear()

    benchmark.group = f"torch backend vs original {family} {torch_workload.name}"
    benchmark.extra_info.update(
        torch_backend=True, family=family, workload=torch_workload.name, workload_label=torch_workload.label,
        kept_noise=kept_noise,
        numel=torch_workload.numel, num_tensors=torch_workload.num_tensors, device="cpu",
        torch_num_threads=torch.get_num_threads(), load_average_at_start=load_at_start)
    benchmark.pedantic(steps["torch"], setup=steps["original"], rounds=rounds, iterations=1)

    if benchmark.stats is not None:  # None under --benchmark-disable
        fastest, median, cpu = paired_step_statistics(steps)
        benchmark.extra_info.update(
            step_statistics_info(fastest, median, cpu),
            torch_over_original=fastest["torch"] / fastest["original"],
            torch_over_original_median=median["torch"] / median["original"],
            torch_over_original_cpu_time=cpu["torch"] / cpu["original"],
            load_average_at_end=os.getloadavg()[0])


def main(path: str) -> None:
    """Print the ratios of a --benchmark-json file of this module."""
    import json
    with open(path) as handle:
        rows = [b["extra_info"] for b in json.load(handle)["benchmarks"] if b["extra_info"].get("torch_backend")]
    print(f"{'case':<12} {'noise':<6} {'original ms':>12} {'torch ms':>9} {'fastest':>8} {'median':>7} {'cpu':>6}  load")
    for info in rows:
        if "torch_over_original" not in info:
            continue
        noise = "kept" if info.get("kept_noise", True) else "drawn"
        print(f"{info['family']:>4} {info['workload']:<7} {noise:<6} {1e3 * info['original_min_s']:12.1f} "
              f"{1e3 * info['torch_min_s']:9.1f} {info['torch_over_original']:7.2f}x "
              f"{info['torch_over_original_median']:6.2f}x {info['torch_over_original_cpu_time']:5.2f}x  "
              f"{info['load_average_at_start']:.1f}-{info['load_average_at_end']:.1f}")


if __name__ == "__main__":
    import sys
    main(sys.argv[1])
