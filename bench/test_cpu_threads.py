"""The CPU library as a neighbour (issue 12 §4): its step next to a busy torch process, and where
a second thread starts to pay.

* ``test_cpu_neighbour``: one step of FusedVSGD[cpu] and torch SGD(fused=True), quiet and next to
  a second Python process running 512x512 matmuls on 2 torch threads (paused with SIGSTOP for the
  quiet rounds, so both run on the same machine state). The loaded case records
  ``loaded_over_quiet``: its median over the quiet median (goal: <= 1.5 for FusedVSGD).
* ``test_thread_crossover``: one raw launch (SGD with momentum, old noise removed, new noise added)
  over N elements in 2,048-element tensors, on 1 thread and on 2 threads with the library's
  single-thread threshold lowered to 1 element, so that both are measured at every N. Where the
  2-thread time drops below the 1-thread time is the threshold compiled into csrc/api.cpp
  (kMinElementsPerThread, per thread).

    pytest bench/test_cpu_threads.py --benchmark-json=bench/results/cpu_threads.json
"""
from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from nvrm_ext.backends import compiled
from nvrm_ext.backends import tables as T

from .conftest import SMOKE_ENV
from .optimizers import IMPLEMENTATIONS
from .test_host_overhead import cpu_params, warm_rounds
from .test_step_time import StepFunction
from .workloads import Workload, gpt2_shapes

CPU = torch.device("cpu")

# A busy neighbour: torch matmuls on 2 threads until its parent goes away.
NEIGHBOUR = """
import os, sys, torch
torch.set_num_threads(2)
parent = os.getppid()
a = torch.randn(512, 512)
a @ a
print("ready", flush=True)
while os.getppid() == parent:
    a @ a
"""


def _smoke(config) -> bool:
    return bool(config.getoption("--bench-smoke")) or os.environ.get(SMOKE_ENV, "") not in ("", "0")


def _neighbour_workloads(smoke: bool) -> list[Workload]:
    tiny = Workload("148x16", "148 tensors x 16 (GPT-2 small's tensor count)", ((16,),) * 148)
    if smoke:
        return [tiny, Workload("gpt2", "GPT-2 (1 layer, d=64, vocab 512)", tuple(gpt2_shapes(1, 64, 512, 64)))]
    return [tiny, Workload("gpt2", "GPT-2 (6 layers, d=256, vocab 8192)", tuple(gpt2_shapes(6, 256, 8192, 512)))]


def pytest_generate_tests(metafunc):
    if "neighbour_workload" in metafunc.fixturenames:
        chosen = _neighbour_workloads(_smoke(metafunc.config))
        metafunc.parametrize("neighbour_workload", chosen, ids=[w.name for w in chosen])


@pytest.fixture(scope="module")
def neighbour():
    """The busy process, started once and paused (SIGSTOP) until a loaded case resumes it."""
    if not hasattr(signal, "SIGSTOP"):
        pytest.skip("pausing the neighbour needs SIGSTOP/SIGCONT")
    process = subprocess.Popen([sys.executable, "-c", NEIGHBOUR], stdout=subprocess.PIPE, text=True)
    try:
        if process.stdout.readline().strip() != "ready":
            pytest.fail("the neighbour process did not start")
        process.send_signal(signal.SIGSTOP)
        yield process
    finally:
        process.kill()
        process.wait()


@pytest.fixture(params=["quiet", "loaded"])
def load(request, neighbour):
    if request.param == "loaded":
        neighbour.send_signal(signal.SIGCONT)
        time.sleep(0.2)  # let it get going
    try:
        yield request.param
    finally:
        if request.param == "loaded":
            neighbour.send_signal(signal.SIGSTOP)


_QUIET_MEDIANS: dict[tuple[str, str], float] = {}
NEIGHBOUR_IMPLEMENTATIONS = [i for i in IMPLEMENTATIONS if i.name in ("torch-fused", "nvrm-cpu")]


@pytest.mark.parametrize("impl", NEIGHBOUR_IMPLEMENTATIONS, ids=lambda i: i.name)
def test_cpu_neighbour(benchmark, neighbour_workload, impl, load, bench_seconds):
    workload = neighbour_workload
    step = StepFunction(impl.build("sgd", cpu_params(workload.shapes)), CPU)
    try:
        rounds = warm_rounds(step, benchmark, bench_seconds)
        benchmark.group = f"cpu neighbour {workload.name}"
        benchmark.extra_info.update(cpu_neighbour=True, workload=workload.name, workload_label=workload.label,
                                    implementation=impl.name, label=impl.label("sgd"), load=load,
                                    numel=workload.numel, num_tensors=workload.num_tensors,
                                    torch_num_threads=torch.get_num_threads())
        benchmark.pedantic(step, rounds=rounds, iterations=1)
        if benchmark.stats is not None:
            key = (workload.name, impl.name)
            if load == "quiet":
                _QUIET_MEDIANS[key] = benchmark.stats.stats.median
            elif key in _QUIET_MEDIANS:
                benchmark.extra_info["loaded_over_quiet"] = benchmark.stats.stats.median / _QUIET_MEDIANS[key]
    finally:
        step.close()


CROSSOVER_ELEMENTS = {"full": (4096, 8192, 16384, 32768, 65536, 131072, 262144), "smoke": (4096, 65536)}
TENSOR_NUMEL = 2048


def _launch_data(elements: int):
    """Tables of one SGD-with-momentum launch over `elements` elements in 2,048-element tensors,
    every one with old noise to remove and new noise to add: the costliest per-element path."""
    generator = torch.Generator().manual_seed(0)
    floats = [0.0] * T.FLOAT_COLUMNS
    floats[:4] = [0.01, 5e-4, 0.9, 1.0]  # lr, weight decay, momentum, 1 - dampening
    floats[T.F_OLD_SCALE] = floats[T.F_NEW_SCALE] = 0.01
    flags = T.FLAG_WEIGHT_DECAY | T.FLAG_MOMENTUM
    plans, keep = [], []
    for key in range(elements // TENSOR_NUMEL):
        param, grad, buffer = (torch.randn(TENSOR_NUMEL, generator=generator) for _ in range(3))
        keep += [param, grad, buffer]
        plans.append(T.TensorPlan(param, grad, (buffer,), key, 5, 6, flags, tuple(floats), 0))
    ints, floats_table = (torch.from_numpy(a) for a in T.build_rows(plans))
    blocks = torch.from_numpy(T.build_block_table([TENSOR_NUMEL] * len(plans), [0] * len(plans),
                                                  compiled.compiled_backend("cpu").block_size))
    return ints, floats_table, blocks, keep


@pytest.fixture
def threshold_knob():
    """Set the library's single-thread threshold (elements per thread); restored afterwards."""
    lib = compiled.load_cpu_library()
    knob = lib.nvrm_cpu_min_elements_per_thread
    knob.argtypes, knob.restype = [ctypes.c_int64], ctypes.c_int64
    default = knob(0)
    yield knob
    knob(default)


@pytest.mark.parametrize("threads", [1, 2])
def test_thread_crossover(benchmark, pytestconfig, threads, threshold_knob, bench_seconds):
    sizes = CROSSOVER_ELEMENTS["smoke" if _smoke(pytestconfig) else "full"]
    default_threshold = threshold_knob(1 if threads > 1 else 0)  # > 1 thread: whatever the size
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    backend = compiled.compiled_backend("cpu")
    results = {}
    try:
        for elements in sizes:
            ints, floats, blocks, _keep = _launch_data(elements)

            def launch():
                backend.launch(T.OP_SGD, torch.float32, ints, floats, blocks, 1234)

            for _ in range(5):
                launch()
            samples = []
            budget = bench_seconds / len(sizes) if not benchmark.disabled else 0.0
            end = time.perf_counter() + budget
            while len(samples) < 3 or time.perf_counter() < end:
                start = time.perf_counter()
                launch()
                samples.append(time.perf_counter() - start)
                if len(samples) >= 5000:
                    break
            samples.sort()
            results[elements] = {"median_s": samples[len(samples) // 2], "min_s": samples[0],
                                 "rounds": len(samples)}
        # pytest-benchmark times the largest size; the per-size figures are in extra_info
        benchmark.group = "cpu thread crossover"
        benchmark.extra_info.update(cpu_thread_crossover=True, threads=threads,
                                    default_min_elements_per_thread=default_threshold,
                                    elements_per_tensor=TENSOR_NUMEL, per_size=results)
        benchmark.pedantic(launch, rounds=3, iterations=1)
    finally:
        torch.set_num_threads(previous)
