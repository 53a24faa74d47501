"""NVRM(optimizer)'s cost over its inner optimizer, side by side with the fused optimizer.

Three optimizers over the same parameters and gradients, same hyperparameters (AdamW, lr 1e-3,
weight decay 1e-2; noise: Gaussian, variability 0.01, num_iters 1000, so every step is noisy):

* ``NVRM(torch.optim.AdamW(fused=True))``: torch's fused step, then NVRM's swap launch;
* ``torch.optim.AdamW(fused=True)`` alone: the same update without noise;
* ``FusedVAdam(decoupled=True)``: update and swap in one launch.

NVRM and FusedVAdam run their noise on the compiled backend of the device ('cpu' or 'cuda').
One benchmark row per workload (64 tensors x 125k (8M) and ResNet-34; smoke: their tiny
versions): the timed callable is one NVRM step; one torch AdamW step and one FusedVAdam step run
in pytest-benchmark's setup before every timed round and are timed by hand, so that the three
see the same machine load on a shared machine. On CPU torch runs one intra-op thread (the
compiled library follows torch.get_num_threads()), as bench/test_amp_step.py does: the CPU time
of the calling thread is then all the work, and the ratios do not depend on how OpenMP threads
fare on a busy machine. ``extra_info`` holds each one's fastest and median wall time and median
CPU time, and the ratios ``nvrm_over_fused_vadam`` (goal on CPU: <= 1.25),
``nvrm_over_torch_fused`` and ``fused_vadam_over_torch_fused``: of the fastest rounds (the
figure least disturbed by other processes), of the wall-time medians (``_median``) and of the
CPU-time medians (``_cpu_time``, the steadiest on a shared machine). Timings are never asserted.

    pytest bench/test_nvrm_step.py --benchmark-json=bench/results/nvrm_cpu.json
"""
from __future__ import annotations

import time

import pytest
import torch

import nvrm_ext

from .conftest import _profile
from .measure import paired_step_statistics, step_statistics_info, synchronize
from .optimizers import ADAM_HYPER, NOISE_HYPER, NOISE_SEED
from .test_step_time import UNAVAILABLE_ERRORS
from .workloads import workloads

WORKLOADS = ("equal", "resnet")  # 64 tensors x 125k (8M), ResNet-34
ADAMW_HYPER = dict(ADAM_HYPER, weight_decay=1e-2)
MIN_ROUNDS = {"smoke": 1, "cpu": 15, "full": 30}
MAX_ROUNDS = 900  # below num_iters: every step swaps noise in and out


def pytest_generate_tests(metafunc):
    if "nvrm_workload" in metafunc.fixturenames:
        chosen = [w for w in workloads(_profile(metafunc.config)) if w.name in WORKLOADS]
        metafunc.parametrize("nvrm_workload", chosen, ids=[w.name for w in chosen])


class TimedStep:
    """optimizer.step(), synchronized; its wall time appended to `seconds`, the calling thread's
    CPU time to `cpu_seconds`."""

    def __init__(self, optimizer: torch.optim.Optimizer, device: torch.device):
        self.optimizer = optimizer
        self.device = device
        self.seconds: list[float] = []
        self.cpu_seconds: list[float] = []

    def __call__(self) -> None:
        start, start_cpu = time.perf_counter(), time.thread_time()
        self.optimizer.step()
        synchronize(self.device)
        self.seconds.append(time.perf_counter() - start)
        self.cpu_seconds.append(time.thread_time() - start_cpu)


@pytest.fixture
def single_thread_on_cpu(bench_device):
    threads = torch.get_num_threads()
    if bench_device.type == "cpu":
        torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def build_optimizers(make, device: torch.device) -> dict[str, torch.optim.Optimizer]:
    """The three optimizers, each over its own copy of the same parameters and gradients."""
    backend = "cuda" if device.type == "cuda" else "cpu"
    noise = dict(NOISE_HYPER, seed=NOISE_SEED, backend=backend)
    return {
        "nvrm": nvrm_ext.NVRM(torch.optim.AdamW(make(), **ADAMW_HYPER, fused=True), **noise),
        "torch_fused": torch.optim.AdamW(make(), **ADAMW_HYPER, fused=True),
        "fused_vadam": nvrm_ext.FusedVAdam(make(), **ADAMW_HYPER, decoupled=True, **noise),
    }


def test_nvrm_step_vs_inner_and_fused(benchmark, nvrm_workload, bench_device, bench_seconds, pytestconfig,
                                      make_params, single_thread_on_cpu):
    try:
        optimizers = build_optimizers(lambda: make_params(nvrm_workload), bench_device)
    except UNAVAILABLE_ERRORS as error:
        pytest.skip(f"NVRM / FusedVAdam unavailable on {bench_device}: {error}")
    steps = {name: TimedStep(optimizer, bench_device) for name, optimizer in optimizers.items()}

    def others():  # pytest-benchmark's setup: untimed by it, timed by hand
        steps["torch_fused"]()
        steps["fused_vadam"]()

    for _ in range(3):  # warm-up: state, launch data, caches
        others()
        steps["nvrm"]()
    round_seconds = sum(min(step.seconds[1:]) for step in steps.values())
    profile = _profile(pytestconfig)
    rounds = 1 if benchmark.disabled else max(MIN_ROUNDS[profile], min(MAX_ROUNDS, int(bench_seconds / round_seconds)))
    for step in steps.values():
        step.seconds.clear()
        step.cpu_seconds.clear()

    benchmark.group = f"NVRM vs inner vs fused {nvrm_workload.name}"
    benchmark.extra_info.update(
        nvrm_step=True, workload=nvrm_workload.name, workload_label=nvrm_workload.label,
        numel=nvrm_workload.numel, num_tensors=nvrm_workload.num_tensors, device=bench_device.type,
        inner="torch.optim.AdamW(fused=True)", hyperparameters=repr(ADAMW_HYPER),
        torch_num_threads=torch.get_num_threads())
    benchmark.pedantic(steps["nvrm"], setup=others, rounds=rounds, iterations=1)

    if benchmark.stats is not None:  # None under --benchmark-disable
        fastest, median, cpu = paired_step_statistics(steps)
        benchmark.extra_info.update(
            step_statistics_info(fastest, median, cpu),
            nvrm_over_fused_vadam_cpu_time=cpu["nvrm"] / cpu["fused_vadam"],
            nvrm_over_torch_fused_cpu_time=cpu["nvrm"] / cpu["torch_fused"],
            fused_vadam_over_torch_fused_cpu_time=cpu["fused_vadam"] / cpu["torch_fused"],
            nvrm_over_fused_vadam=fastest["nvrm"] / fastest["fused_vadam"],
            nvrm_over_torch_fused=fastest["nvrm"] / fastest["torch_fused"],
            fused_vadam_over_torch_fused=fastest["fused_vadam"] / fastest["torch_fused"],
            nvrm_over_fused_vadam_median=median["nvrm"] / median["fused_vadam"],
            nvrm_over_torch_fused_median=median["nvrm"] / median["torch_fused"],
            fused_vadam_over_torch_fused_median=median["fused_vadam"] / median["torch_fused"])
