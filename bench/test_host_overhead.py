"""Host overhead of one optimizer step: many 16-element CPU tensors, so the arithmetic is
negligible and the time is what the step costs per tensor in Python and dispatch (issue 11 §2).

Rows: 148 tensors (GPT-2 small's parameter count) and 2,000 tensors; FusedVSGD / FusedVAdam on
the compiled 'cpu' backend (host mode and capturable) against torch.optim's SGD / Adam with
fused=True and foreach=True, same hyperparameters as test_step_time. Always on CPU, whatever
--bench-device says: on a GPU this host time is paid before the kernel starts. Timings are never
asserted. Besides wall time, each case records the median CPU time of the stepping thread
(``thread_cpu_median_s``): steadier than wall time when other jobs share the cores (the
single-threaded steps here do all their work on that thread).

    pytest bench/test_host_overhead.py --benchmark-json=bench/results/host_overhead.json
"""
from __future__ import annotations

import statistics
import time

import pytest
import torch

from .optimizers import FAMILIES, IMPLEMENTATIONS
from .test_step_time import UNAVAILABLE_ERRORS, StepFunction, _rounds

TENSOR_COUNTS = (148, 2000)
NUMEL = 16
COMPARED = ("torch-foreach", "torch-fused", "nvrm-cpu", "nvrm-cpu-capturable")
CPU = torch.device("cpu")


class CpuTimedStep(StepFunction):
    """A step that also records the CPU time of the calling thread."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        super().__init__(optimizer, CPU)
        self.cpu_seconds: list[float] = []

    def __call__(self) -> None:
        start = time.thread_time()
        super().__call__()
        self.cpu_seconds.append(time.thread_time() - start)


def cpu_params(shapes) -> list[torch.Tensor]:
    """CPU parameters of these shapes with .grad filled, from a fixed seed."""
    generator = torch.Generator().manual_seed(0)
    params = []
    for shape in shapes:
        p = (0.1 * torch.randn(shape, generator=generator)).requires_grad_(True)
        p.grad = 0.01 * torch.randn(shape, generator=generator)
        params.append(p)
    return params


def warm_rounds(step: StepFunction, benchmark, bench_seconds: float) -> int:
    """Three warm-up steps (state, launch data, caches), then the rounds that fill bench_seconds."""
    for _ in range(3):
        step()
    calibration_seconds = 0.0
    if not benchmark.disabled:
        start = time.perf_counter()
        step()
        calibration_seconds = time.perf_counter() - start
    return _rounds(calibration_seconds, bench_seconds)


@pytest.mark.parametrize("impl", [i for i in IMPLEMENTATIONS if i.name in COMPARED], ids=lambda i: i.name)
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("count", TENSOR_COUNTS)
def test_host_overhead(benchmark, count, family, impl, bench_seconds):
    label = impl.label(family)
    try:
        optimizer = impl.build(family, cpu_params([(NUMEL,)] * count))
    except UNAVAILABLE_ERRORS as error:
        pytest.skip(f"{label} unavailable: {error}")
    step = CpuTimedStep(optimizer)
    try:
        rounds = warm_rounds(step, benchmark, bench_seconds)
        benchmark.group = f"host overhead {count} x {NUMEL}"
        benchmark.extra_info.update(host_overhead=True, family=family, implementation=impl.name,
                                    label=label, num_tensors=count, numel_per_tensor=NUMEL,
                                    torch_num_threads=torch.get_num_threads())
        step.cpu_seconds.clear()
        benchmark.pedantic(step, rounds=rounds, iterations=1)
        benchmark.extra_info["thread_cpu_median_s"] = statistics.median(step.cpu_seconds)
    finally:
        step.close()
