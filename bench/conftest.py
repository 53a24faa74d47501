"""Options and fixtures of the benchmark suite (kept apart from tests/: no TRITON_INTERPRET here).

    pytest bench/ --benchmark-json=bench/results/cpu.json     # the real suite (CPU: a few min)
    NVRM_BENCH_SMOKE=1 pytest bench/ --benchmark-disable       # CI: tiny sizes, every case once

Options: --bench-device (default: cuda when available, else cpu), --bench-smoke (same as
NVRM_BENCH_SMOKE=1), --bench-seconds (time spent in the timed rounds of one case).
Sizes follow the device: real sizes on CUDA, GPT-2 shrunk on CPU, tiny in smoke mode.
"""
from __future__ import annotations

import os
import platform
from datetime import datetime, timezone

import pytest
import torch

from .measure import copy_bandwidth as measure_copy_bandwidth
from .workloads import Workload, workloads

SMOKE_ENV = "NVRM_BENCH_SMOKE"
_LOAD_AT_START = pytest.StashKey[float | None]()


def pytest_addoption(parser):
    group = parser.getgroup("nvrm_ext benchmarks")
    group.addoption("--bench-device", choices=("cpu", "cuda"), default=None,
                    help="device of the parameters (default: cuda when available, else cpu)")
    group.addoption("--bench-smoke", action="store_true", default=False,
                    help=f"tiny sizes, for CI (same as {SMOKE_ENV}=1)")
    group.addoption("--bench-seconds", type=float, default=2.0,
                    help="target seconds of timed rounds per case (at least 3 rounds are run)")


def _device(config) -> torch.device:
    name = config.getoption("--bench-device") or ("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _profile(config) -> str:
    if config.getoption("--bench-smoke") or os.environ.get(SMOKE_ENV, "") not in ("", "0"):
        return "smoke"
    return "full" if _device(config).type == "cuda" else "cpu"


def _load_average() -> float | None:
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


def pytest_configure(config):
    config.stash[_LOAD_AT_START] = _load_average()
    if _device(config).type == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError("--bench-device=cuda, but torch sees no CUDA device")


def pytest_generate_tests(metafunc):
    if "workload" in metafunc.fixturenames:
        chosen = workloads(_profile(metafunc.config))
        metafunc.parametrize("workload", chosen, ids=[w.name for w in chosen])


def pytest_report_header(config):
    return f"nvrm_ext bench: device={_device(config)}, profile={_profile(config)}"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as file:
            for line in file:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gib() -> float | None:
    try:
        with open("/proc/meminfo") as file:
            for line in file:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def pytest_benchmark_update_machine_info(config, machine_info):
    """Everything RESULTS.md needs to say what machine and software the numbers come from."""
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    device = _device(config)
    machine_info.update(
        cpu_model=_cpu_model(),
        cpu_count=os.cpu_count(),
        usable_cpus=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        memory_gib=_memory_gib(),
        torch_version=torch.__version__,
        torch_num_threads=torch.get_num_threads(),
        triton_version=triton_version,
        cuda_device=torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        bench_device=device.type,
        bench_profile=_profile(config),
        bench_date=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),

    )


_SKIPPED: list[dict] = []


def pytest_runtest_logreport(report):
    """Remember skipped cases and why, so that the report can say what was not measured."""
    if report.skipped and isinstance(report.longrepr, tuple):
        _SKIPPED.append({"test": report.nodeid.rsplit("::", 1)[-1], "reason": report.longrepr[2]})


def pytest_benchmark_update_json(config, benchmarks, output_json):
    output_json["skipped"] = list(_SKIPPED)
    # Other processes distort CPU timings: how busy the machine was (1-minute load averages).
    output_json["machine_info"]["load_average_1min"] = {
        "start": config.stash.get(_LOAD_AT_START, None), "end": _load_average()}


@pytest.fixture(scope="session")
def bench_device(pytestconfig) -> torch.device:
    return _device(pytestconfig)


@pytest.fixture(scope="session")
def bench_seconds(pytestconfig) -> float:
    return pytestconfig.getoption("--bench-seconds")


@pytest.fixture(scope="session")
def copy_bandwidth(pytestconfig, bench_device) -> float:
    """Bytes/s of a large device-to-device copy, measured once per session."""
    nbytes = 4 * 2**20 if _profile(pytestconfig) == "smoke" else 256 * 2**20
    return measure_copy_bandwidth(bench_device, nbytes)


@pytest.fixture(scope="session")
def _pristine_tensors(bench_device):
    """Per workload, the initial parameters and their gradients, drawn once from a fixed seed."""
    cache: dict[str, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}

    def get(workload: Workload):
        if workload.name not in cache:
            generator = torch.Generator().manual_seed(0)
            params = [(0.1 * torch.randn(shape, generator=generator)).to(bench_device) for shape in workload.shapes]
            grads = [(0.01 * torch.randn(shape, generator=generator)).to(bench_device) for shape in workload.shapes]
            cache[workload.name] = (params, grads)
        return cache[workload.name]

    return get


@pytest.fixture
def make_params(_pristine_tensors):
    """Fresh copies of a workload's parameters with .grad filled: every optimizer starts from the
    same weights and sees the same gradients, reused on every step (optimizers do not modify
    .grad), so a benchmark times the optimizer step only."""

    def make(workload: Workload) -> list[torch.Tensor]:
        params, grads = _pristine_tensors(workload)
        copies = []
        for p, g in zip(params, grads):
            copy = p.clone().requires_grad_(True)
            copy.grad = g.clone()
            copies.append(copy)
        return copies

    return make
