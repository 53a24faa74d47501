"""What relative=True costs per step: FusedVSGD (cpu backend) with relative=True against
relative=False on the 2,000 x 1k and the 8M / 64-tensor lists (bench/workloads.py), with the
counters on the host (capturable=False) and on the device (capturable=True).

Two steps of a period are timed separately: its first step, where a relative group measures
each tensor's spread (docs/noise.md §5.1), and a steady step, which only reads the spread kept
in the state -- in host mode; with capturable=True every step measures on the device (the host
does not know which step starts a period) and keeps the measurement only at a period's first. num_iters is 3 and the two other steps of the period run as pytest-benchmark's
setup before each timed round, so every round times the same position in the period. The
amortised cost per step for a period of N steps is ((N - 1) × steady + first) / N; run this
module to print them (and the ratios) from the JSON:

    pytest bench/test_relative_cost.py --benchmark-json=bench/results/relative_cpu.json
    python -m bench.test_relative_cost bench/results/relative_cpu.json

Like test_amp_step, the case runs torch with one intra-op thread and records the median CPU time
of the stepping thread (``thread_cpu_median_s``), steadier than wall time on a shared machine.
Always on CPU. Timings are never asserted.
"""
from __future__ import annotations

import json
import statistics
import sys
import time

import pytest
import torch

import nvrm_ext

from .conftest import _profile
from .optimizers import NOISE_HYPER, SGD_HYPER
from .test_host_overhead import cpu_params
from .test_step_time import _rounds
from .workloads import workloads

NUM_ITERS = 3  # first (measures), steady, last (removal only): each round times one of the first two
POSITIONS = {"first": 0, "steady": 1}  # the timed step's place in its period
WORKLOADS = ("tiny", "equal")  # 2,000 x 1k (per-tensor cost), 8M in 64 tensors (per-element cost)
AMORTISED_OVER = (100, 1000)


def pytest_generate_tests(metafunc):
    if "relative_workload" in metafunc.fixturenames:
        chosen = [w for w in workloads(_profile(metafunc.config)) if w.name in WORKLOADS]
        metafunc.parametrize("relative_workload", chosen, ids=[w.name for w in chosen])


@pytest.mark.parametrize("position", sorted(POSITIONS))
@pytest.mark.parametrize("relative", [False, True], ids=["absolute", "relative"])
@pytest.mark.parametrize("capturable", [False, True], ids=["host", "capturable"])
def test_relative_step(benchmark, relative_workload, relative, capturable, position, bench_seconds):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        params = cpu_params(relative_workload.shapes)
        opt = nvrm_ext.FusedVSGD(params, **SGD_HYPER, variability=NOISE_HYPER["variability"], num_iters=NUM_ITERS,
                                 relative=relative, seed=0, backend="cpu", capturable=capturable)
        # a whole period (state, launch data), then up to the place: pedantic runs the setup
        # (two steps) before each timed step; the calibration adds a whole period
        for _ in range(NUM_ITERS + (POSITIONS[position] + 1) % NUM_ITERS):
            opt.step()
        cpu_seconds: list[float] = []
        places: set = set()  # where in its period each timed step was

        def timed_step():
            places.add(int(opt.state[params[0]]["step"]) % NUM_ITERS)  # steps done before this one
            start = time.thread_time()
            opt.step()
            cpu_seconds.append(time.thread_time() - start)

        def rest_of_period():
            for _ in range(NUM_ITERS - 1):
                opt.step()

        calibration_seconds = 0.0
        if not benchmark.disabled:
            start = time.perf_counter()
            timed_step()
            calibration_seconds = time.perf_counter() - start
            rest_of_period()
        rounds = max(3, _rounds(calibration_seconds, bench_seconds) // NUM_ITERS)
        benchmark.group = f"relative {relative_workload.name}{' capturable' if capturable else ''}"
        benchmark.extra_info.update(relative_cost=True, workload=relative_workload.name,
                                    workload_label=relative_workload.label, relative=relative, position=position,
                                    capturable=capturable,
                                    num_tensors=relative_workload.num_tensors, numel=relative_workload.numel)
        cpu_seconds.clear()
        places.clear()  # the calibration step was elsewhere
        benchmark.pedantic(timed_step, setup=rest_of_period, rounds=rounds, iterations=1)
        assert places == {POSITIONS[position]}, places  # the timed steps were where they should be
        benchmark.extra_info["thread_cpu_median_s"] = statistics.median(cpu_seconds) if cpu_seconds else None
    finally:
        torch.set_num_threads(threads)


def summary(path: str) -> str:
    """The Markdown table of a run of this module: per workload and mode (host / capturable
    counters), both positions with and without relative=True, the ratios, and the amortised
    cost per step for periods of AMORTISED_OVER steps."""
    run = json.loads(open(path).read())
    cases = {}
    for bench in run["benchmarks"]:
        info = bench["extra_info"]
        if info.get("relative_cost"):
            mode = "capturable" if info.get("capturable") else "host"
            cases[info["workload_label"], mode, info["relative"], info["position"]] = (
                info["thread_cpu_median_s"], bench["stats"]["min"], bench["stats"]["median"])
    lines = ["| workload | counters | step | relative=False ms (CPU median / wall min) | relative=True ms | "
             "relative / absolute |",
             "|---|---|---|---|---|---|"]
    amortised = ["| workload | counters | " + " | ".join(f"num_iters={n}: per step, absolute → relative"
                                                      for n in AMORTISED_OVER)
                 + " | " + " | ".join(f"what relative adds per step (N={n})" for n in AMORTISED_OVER) + " |",
                 "|---|---|" + "---|" * 2 * len(AMORTISED_OVER)]
    for label, mode in dict.fromkeys(key[:2] for key in cases):
        for position in ("steady", "first"):
            (a_cpu, a_min, _), (r_cpu, r_min, _) = cases[label, mode, False, position], cases[label, mode, True, position]
            lines.append(f"| {label} | {mode} | {position} | {a_cpu * 1e3:.2f} / {a_min * 1e3:.2f} | "
                         f"{r_cpu * 1e3:.2f} / {r_min * 1e3:.2f} | {r_cpu / a_cpu:.2f}× / {r_min / a_min:.2f}× |")
        cells = []
        per_step = {}
        for n in AMORTISED_OVER:
            per_step[n] = {relative: ((n - 1) * cases[label, mode, relative, "steady"][0]
                                      + cases[label, mode, relative, "first"][0]) / n for relative in (False, True)}
            cells.append(f"{per_step[n][False] * 1e3:.2f} → {per_step[n][True] * 1e3:.2f} ms "
                         f"({per_step[n][True] / per_step[n][False]:.3f}×)")
        if mode == "host":  # the first steps' difference: steady steps differ by noise only
            extra = cases[label, mode, True, "first"][0] - cases[label, mode, False, "first"][0]
            cells += [f"{extra / n * 1e3:.3f} ms" for n in AMORTISED_OVER]
        else:  # every step measures
            cells += [f"{(per_step[n][True] - per_step[n][False]) * 1e3:.3f} ms" for n in AMORTISED_OVER]
        amortised.append(f"| {label} | {mode} | " + " | ".join(cells) + " |")
    return "\n".join(lines + [""] + amortised)


if __name__ == "__main__":
    print(summary(sys.argv[1]))
