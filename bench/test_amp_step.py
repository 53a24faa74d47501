"""FusedAMP step time against the base optimizer's plain (ERM) step on the same small MLP.

One benchmark row: the timed callable is one FusedAMP step (inner_iter=1, SGD with momentum);
the ERM step -- closure once, then the same SGD's step -- runs as pytest-benchmark's setup before
every timed AMP round and is timed by hand, so both see the same machine load.
``extra_info["amp_over_erm"]`` is the ratio of the wall-time medians, ``amp_over_erm_cpu_time``
that of the CPU-time medians (steadier on a shared machine). On CPU the case runs torch with one
intra-op thread, so that the CPU time of the calling thread is all the work and the ratio does
not depend on how OpenMP threads fare on a busy machine. Both include the forward and backward
passes, which is what AMP multiplies. Timings are never asserted.

    pytest bench/test_amp_step.py --benchmark-json=bench/results/amp_cpu.json
    NVRM_BENCH_SMOKE=1 pytest bench/ --benchmark-disable
"""
from __future__ import annotations

import os
import statistics
import time

import pytest
import torch

from nvrm_ext.optim.amp import FusedAMP

from .measure import synchronize

# (input width, hidden width, hidden layers, classes, batch); smoke: tiny, for CI
MLP_SIZES = {"full": (64, 256, 2, 10, 64), "smoke": (16, 32, 1, 4, 8)}
MIN_ROUNDS = {"full": 30, "smoke": 3}
MAX_ROUNDS = {"full": 1000, "smoke": 3}
HYPERPARAMETERS = dict(lr=0.1, momentum=0.9, weight_decay=1e-4, nesterov=True)  # the published script's SGD


def _smoke(config) -> bool:
    return bool(config.getoption("--bench-smoke")) or os.environ.get("NVRM_BENCH_SMOKE", "") not in ("", "0")


def _mlp(sizes, device):
    width, hidden, layers, classes, batch = sizes
    generator = torch.Generator().manual_seed(0)
    modules, fan_in = [], width
    for _ in range(layers):
        modules += [torch.nn.Linear(fan_in, hidden), torch.nn.ReLU()]
        fan_in = hidden
    modules.append(torch.nn.Linear(fan_in, classes))
    model = torch.nn.Sequential(*modules)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.05 * torch.randn(p.shape, generator=generator))
    inputs = torch.randn(batch, width, generator=generator)
    targets = torch.randint(0, classes, (batch,), generator=generator)
    return model.to(device), inputs.to(device), targets.to(device)


def _closure(model, optimizer, inputs, targets):
    def closure():
        optimizer.zero_grad()
        outputs = model(inputs)
        loss = torch.nn.functional.cross_entropy(outputs, targets)
        loss.backward()
        return outputs, loss
    return closure


@pytest.fixture
def single_thread_on_cpu(bench_device):
    threads = torch.get_num_threads()
    if bench_device.type == "cpu":
        torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_amp_step_vs_erm_step(benchmark, bench_device, bench_seconds, pytestconfig, single_thread_on_cpu):
    profile = "smoke" if _smoke(pytestconfig) else "full"
    sizes = MLP_SIZES[profile]

    amp_model, inputs, targets = _mlp(sizes, bench_device)
    amp = FusedAMP(amp_model.parameters(), epsilon=0.5, inner_lr=1.0, inner_iter=1, **HYPERPARAMETERS)
    amp_closure = _closure(amp_model, amp, inputs, targets)

    erm_model, _, _ = _mlp(sizes, bench_device)
    erm = torch.optim.SGD(erm_model.parameters(), **HYPERPARAMETERS)
    erm_closure = _closure(erm_model, erm, inputs, targets)
    erm_seconds: list[float] = []
    erm_cpu_seconds: list[float] = []
    amp_cpu_seconds: list[float] = []

    def erm_step():
        start, start_cpu = time.perf_counter(), time.thread_time()
        erm_closure()
        erm.step()
        synchronize(bench_device)
        erm_seconds.append(time.perf_counter() - start)
        erm_cpu_seconds.append(time.thread_time() - start_cpu)

    # Warm up both (state creation, allocator caches), then calibrate the number of rounds.
    for _ in range(3):
        amp.step(amp_closure)
        erm_step()
    synchronize(bench_device)
    calibration = []
    for _ in range(3):
        start = time.perf_counter()
        amp.step(amp_closure)
        synchronize(bench_device)
        calibration.append(time.perf_counter() - start)
    # bench_seconds covers the AMP and the ERM steps together
    round_seconds = 2 * min(calibration)
    rounds = max(MIN_ROUNDS[profile], min(MAX_ROUNDS[profile], int(bench_seconds / round_seconds)))

    def timed_amp_step():
        start_cpu = time.thread_time()
        amp.step(amp_closure)
        synchronize(bench_device)
        amp_cpu_seconds.append(time.thread_time() - start_cpu)

    benchmark.group = "FusedAMP vs ERM"
    benchmark.extra_info.update(
        model=f"MLP {sizes[0]}-{'-'.join([str(sizes[1])] * sizes[2])}-{sizes[3]}, batch {sizes[4]}",
        numel=sum(p.numel() for p in amp_model.parameters()), device=bench_device.type,
        base_optimizer="torch.optim.SGD(momentum=0.9, nesterov=True, weight_decay=1e-4)",
        inner_iter=1, torch_num_threads=torch.get_num_threads())
    # The ERM step runs in pytest-benchmark's setup, i.e. between timed AMP rounds, untimed by it.
    for samples in (erm_seconds, erm_cpu_seconds, amp_cpu_seconds):
        samples.clear()
    benchmark.pedantic(timed_amp_step, setup=erm_step, rounds=rounds, iterations=1)

    if benchmark.stats is not None:  # None under --benchmark-disable
        erm_median = statistics.median(erm_seconds)
        benchmark.extra_info.update(
            erm_step_median_s=erm_median,
            amp_over_erm=benchmark.stats.stats.median / erm_median,
            # CPU time of this thread (torch runs one, see above): less disturbed than wall time
            # when other jobs share the cores
            amp_over_erm_cpu_time=statistics.median(amp_cpu_seconds) / statistics.median(erm_cpu_seconds))
