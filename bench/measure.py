"""The figures beside the step time: state size, transient memory, kernel launches, bandwidth.

Peak memory of a step is the *transient* memory: the most bytes allocated above what was live
before the step (state, parameters and gradients excluded), measured on the second step so
that lazily created state is not counted.

* CUDA: torch.cuda.max_memory_allocated() after reset_peak_memory_stats(), minus the bytes
  allocated before the step.
* CPU: torch.profiler(profile_memory=True) records every allocation and free of torch's CPU
  allocator; the peak of their running sum is the transient peak. It sees torch tensors only:
  memory a compiled library mallocs itself is invisible to it (tracemalloc and RSS are no
  better: torch bypasses the former, and freed pages stay in the RSS).
"""
from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from typing import Callable

import torch
from torch.profiler import ProfilerActivity, profile


def state_bytes_per_param(optimizer: torch.optim.Optimizer, numel: int) -> float:
    """Bytes of every tensor in optimizer.state, per parameter element."""
    total = 0
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                total += value.numel() * value.element_size()
    return total / numel


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _chrome_trace(prof) -> list[dict]:
    """The profiler's events as chrome-trace dicts: the one export that keeps every
    allocation's size and every GPU kernel, whatever the torch version."""
    handle, path = tempfile.mkstemp(suffix=".json")
    os.close(handle)
    try:
        prof.export_chrome_trace(path)
        with open(path) as file:
            return json.load(file)["traceEvents"]
    finally:
        os.remove(path)


def transient_peak_bytes(step: Callable[[], None], device: torch.device) -> int:
    """Most bytes allocated during one call of `step` above the bytes live before it."""
    if device.type == "cuda":
        synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    allocations = sorted((e for e in _chrome_trace(prof)
                          if e.get("name") == "[memory]" and e["args"].get("Device Type") == 0),
                         key=lambda e: e["ts"])
    live = peak = 0
    for event in allocations:
        live += event["args"]["Bytes"]
        peak = max(peak, live)
    return peak


def gpu_activity_per_step(step: Callable[[], None], device: torch.device, steps: int = 3) -> dict:
    """Mean number of CUDA kernels, memcpys and memsets one step issues (profiled)."""
    synchronize(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        synchronize(device)
    counts = {"kernel": 0, "gpu_memcpy": 0, "gpu_memset": 0}
    for event in _chrome_trace(prof):
        if event.get("cat") in counts and event.get("ph") == "X":
            counts[event["cat"]] += 1
    return {"kernel_launches_per_step": counts["kernel"] / steps,
            "memcpys_per_step": counts["gpu_memcpy"] / steps,
            "memsets_per_step": counts["gpu_memset"] / steps}


def copy_bandwidth(device: torch.device, nbytes: int, repeats: int = 10) -> float:
    """Bytes per second of a device-to-device copy of `nbytes` (read + write counted), best of
    `repeats`: the practical ceiling a memory-bound optimizer step can approach."""
    source = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    target = torch.empty_like(source)
    target.copy_(source)
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        target.copy_(source)
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * source.numel() * source.element_size() / best


def paired_step_statistics(steps: dict) -> tuple[dict, dict, dict]:
    """Per name, the fastest and median wall seconds and the median CPU seconds of the timed
    steps (objects with .seconds and .cpu_seconds lists), for ratios measured side by side."""
    fastest = {name: min(step.seconds) for name, step in steps.items()}
    median = {name: statistics.median(step.seconds) for name, step in steps.items()}
    cpu = {name: statistics.median(step.cpu_seconds) for name, step in steps.items()}
    return fastest, median, cpu


def step_statistics_info(fastest: dict, median: dict, cpu: dict) -> dict:
    """paired_step_statistics as benchmark.extra_info entries (<name>_min_s, _median_s, _cpu_median_s)."""
    return {**{f"{name}_min_s": value for name, value in fastest.items()},
            **{f"{name}_median_s": value for name, value in median.items()},
            **{f"{name}_cpu_median_s": value for name, value in cpu.items()}}
