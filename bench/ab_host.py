"""Paired A/B of the host time per step: an old nvrm_ext (a renamed copy, e.g. of the last
commit), the checkout's nvrm_ext and torch's fused optimizer, stepped alternately in one
process (many short rounds, order rotated), so that the machine's drift hits all three alike.
Prints the median over rounds of new/torch and old/torch (thread CPU time per round).

    mkdir -p /tmp/base && git archive HEAD nvrm_ext | tar -x -C /tmp/base && mv /tmp/base/nvrm_ext /tmp/base/nvrm_base
    cp -r nvrm_ext/_lib /tmp/base/nvrm_base/
    PYTHONPATH=$PWD:/tmp/base python bench/ab_host.py --old nvrm_base

Not a pytest-benchmark case: it needs a second copy of the package (bench/test_host_overhead.py
is the bench); this is the tool for a before/after judgement on a shared, drifting machine.
"""
from __future__ import annotations

import argparse
import importlib
import statistics
import time

import torch

from bench.optimizers import ADAM_HYPER, NOISE_HYPER, NOISE_SEED, SGD_HYPER
from bench.test_host_overhead import NUMEL, cpu_params


def build(family: str, package, count: int):
    params = cpu_params([(NUMEL,)] * count)
    if package is None:
        cls, hyper = (torch.optim.SGD, SGD_HYPER) if family == "sgd" else (torch.optim.Adam, ADAM_HYPER)
        return cls(params, **hyper, fused=True)
    cls, hyper = (package.FusedVSGD, SGD_HYPER) if family == "sgd" else (package.FusedVAdam, ADAM_HYPER)
    return cls(params, **hyper, **NOISE_HYPER, seed=NOISE_SEED, backend="cpu")


def round_seconds(optimizer, steps: int) -> float:
    step = optimizer.step
    start = time.thread_time()
    for _ in range(steps):
        step()
    return time.thread_time() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--old", default="nvrm_base", help="the old package's import name")
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--tensor-steps", type=int, default=60_000, help="steps x tensors per round")
    parser.add_argument("--counts", type=int, nargs="+", default=[148, 2000])
    parser.add_argument("--families", nargs="+", default=["sgd", "adam"])
    args = parser.parse_args()
    packages = {"old": importlib.import_module(args.old), "new": importlib.import_module("nvrm_ext"), "torch": None}
    print(f"new: {packages['new'].__file__}\nold: {packages['old'].__file__}")
    for family in args.families:
        for count in args.counts:
            opts = {name: build(family, package, count) for name, package in packages.items()}
            steps = max(20, args.tensor_steps // count)
            for opt in opts.values():
                round_seconds(opt, 5)
            times = {name: [] for name in opts}
            names = list(opts)
            for r in range(args.rounds):
                for name in names[r % 3:] + names[:r % 3]:  # rotate the order
                    times[name].append(round_seconds(opts[name], steps) / steps)
            med = {name: statistics.median(t) for name, t in times.items()}
            ratio = {name: statistics.median(a / b for a, b in zip(times[name], times["torch"]))
                     for name in ("old", "new")}
            print(f"{family} {count:5d} tensors, {args.rounds} rounds x {steps} steps: "
                  f"old/torch {ratio['old']:.3f}  new/torch {ratio['new']:.3f}  "
                  f"new/old {statistics.median(a / b for a, b in zip(times['new'], times['old'])):.3f}  | "
                  f"median per step: torch {med['torch'] * 1e3:.3f} ms, old {med['old'] * 1e3:.3f} ms, "
                  f"new {med['new'] * 1e3:.3f} ms", flush=True)


if __name__ == "__main__":
    main()
