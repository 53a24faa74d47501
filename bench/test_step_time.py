"""Time of one optimizer step, per workload x optimizer family x implementation.

Besides pytest-benchmark's timing statistics, each case stores in benchmark.extra_info (and so
in the JSON): the optimizer state in bytes per parameter, the transient peak memory of a step,
the achieved bandwidth (minimal bytes the step must move / fastest round) against a measured copy
bandwidth, and on CUDA the kernel launches per step. Timings are never asserted; the state size
is, where it is exact.
"""
from __future__ import annotations

import time

import pytest
import torch

from .measure import gpu_activity_per_step, state_bytes_per_param, synchronize, transient_peak_bytes
from .optimizers import FAMILIES, IMPLEMENTATIONS, MIN_TRAFFIC_BYTES_PER_FP32_PARAM, Implementation, skip_reason

MIN_ROUNDS = 3
MAX_ROUNDS = 900  # with the warm-up and profiled steps, below num_iters: every step is noisy
# What building an optimizer raises when a backend or a torch variant cannot run here.
UNAVAILABLE_ERRORS = (RuntimeError, ImportError, OSError, ValueError)


class StepFunction:
    """optimizer.step(), synchronized on CUDA so that the timer sees the work, not the launch.

    close() drops the optimizer: pytest-benchmark may keep the timed callable after the test,
    and it must not keep the parameters and state alive with it.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, device: torch.device):
        self.optimizer = optimizer
        self.device = device

    def __call__(self) -> None:
        self.optimizer.step()
        synchronize(self.device)

    def close(self) -> None:
        self.optimizer = None


class GraphStepFunction(StepFunction):
    """optimizer.step() (capturable=True) captured once in a CUDA graph, one replay per call: the
    step without any host work (the replay: two small table copies, the update, the commit)."""

    def __init__(self, optimizer: torch.optim.Optimizer, device: torch.device):
        super().__init__(optimizer, device)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(3):  # eager warm-up: builds the launch data, compiles the kernels
                optimizer.step()
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            optimizer.step()

    def __call__(self) -> None:
        self.graph.replay()
        synchronize(self.device)

    def close(self) -> None:
        self.graph = None
        super().close()


def _rounds(step_seconds: float, budget_seconds: float) -> int:
    """Rounds that fill the time budget, estimated from one warm step."""
    return max(MIN_ROUNDS, min(MAX_ROUNDS, int(budget_seconds / max(step_seconds, 1e-9))))


def _transient_peak_bytes(step: StepFunction, impl: Implementation, device: torch.device) -> int | None:
    """None for the reference backend on CPU: it issues ~2,000 small torch ops per tensor, and
    recording each allocation under the profiler would take minutes and gigabytes."""
    if device.type == "cpu" and impl.kind == "nvrm" and impl.backend == "torch":
        return None
    return transient_peak_bytes(step, device)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS, ids=lambda impl: impl.name)
@pytest.mark.parametrize("family", FAMILIES)
def test_step(benchmark, workload, family, impl, bench_device, bench_seconds, make_params, copy_bandwidth):
    reason = skip_reason(impl, bench_device)
    if reason:
        pytest.skip(reason)
    params = make_params(workload)
    label = impl.label(family)
    try:
        optimizer = impl.build(family, params)
    except UNAVAILABLE_ERRORS as error:
        if impl.kind == "original":
            raise
        pytest.skip(f"{label} unavailable on {bench_device}: {error}")

    step = (GraphStepFunction if impl.graph else StepFunction)(optimizer, bench_device)
    try:
        step()  # warm-up: creates the state, compiles kernels, fills caches
        calibration_seconds = 0.0
        if not benchmark.disabled:  # one more warm step, timed, to choose the number of rounds
            start = time.perf_counter()
            step()
            calibration_seconds = time.perf_counter() - start

        dtype = params[0].dtype
        state_bytes = state_bytes_per_param(optimizer, workload.numel)
        expected_state_bytes = impl.expected_state_bytes_per_param(family, dtype)
        if expected_state_bytes is not None:
            assert state_bytes == expected_state_bytes, f"{label}: state bytes/param"

        benchmark.group = f"{family} {workload.name}"
        benchmark.extra_info.update(
            workload=workload.name, workload_label=workload.label, family=family,
            implementation=impl.name, label=label, device=bench_device.type, dtype=str(dtype),
            numel=workload.numel, num_tensors=workload.num_tensors,
            state_bytes_per_param=state_bytes,
            step_transient_peak_bytes=_transient_peak_bytes(step, impl, bench_device),
            copy_bandwidth_bytes_per_s=copy_bandwidth,
        )
        if bench_device.type == "cuda":
            benchmark.extra_info.update(gpu_activity_per_step(step, bench_device))

        benchmark.pedantic(step, rounds=_rounds(calibration_seconds, bench_seconds), iterations=1)

        if benchmark.stats is not None:  # None under --benchmark-disable
            traffic = MIN_TRAFFIC_BYTES_PER_FP32_PARAM[family] * workload.numel * dtype.itemsize // 4
            achieved = traffic / benchmark.stats.stats.min  # the least disturbed round
            benchmark.extra_info.update(min_traffic_bytes=traffic,
                                        achieved_bandwidth_bytes_per_s=achieved,
                                        fraction_of_copy_bandwidth=achieved / copy_bandwidth)
    finally:
        step.close()
