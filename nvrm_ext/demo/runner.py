"""The independent training runs of an experiment, in parallel processes, with a progress report.

Every run (one arm of one seed) seeds its own model, data order and noise, so runs do not depend
on each other or on the order they run in: a run in a worker process gives the same numbers as the
same run in this process (each process uses the same number of torch threads, set here), and the
results are collected in the order the runs were listed. Workers are started with 'spawn' (a
forked torch process may inherit thread pools or a CUDA context it cannot use).

Progress: on a terminal a tqdm bar advancing per finished run; anywhere else (a file, a pipe, a CI
log) one plain line per finished run, with no carriage-return frames.
"""
from __future__ import annotations

import multiprocessing
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Callable

import torch
from tqdm import tqdm


@dataclass
class Run:
    """One training run: `function(**arguments)`, where `function` is defined at module level so
    that a worker process can import it."""

    description: str
    function: Callable
    arguments: dict = field(default_factory=dict)


def _set_threads(threads: int) -> None:
    torch.set_num_threads(threads)


def _timed(function: Callable, arguments: dict) -> tuple[object, float]:
    start = time.perf_counter()
    result = function(**arguments)
    return result, time.perf_counter() - start


def _headline(result) -> str:
    """The final clean test accuracy where the run has one, for the per-run log line."""
    if isinstance(result, dict) and "test" in result:
        test = result["test"][-1] if isinstance(result["test"], list) else result["test"]
        return f", test acc {100 * test:.1f}%"
    return ""


def is_terminal(stream) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


class EpochProgress:
    """Progress of runs that report once per epoch (the tuning commands): a tqdm bar over all
    epochs on a terminal; elsewhere one plain line per finished run, every `epochs_per_run`-th
    update, with no carriage-return frames."""

    def __init__(self, runs: int, epochs_per_run: int, name: str, stream=None):
        self.stream = stream if stream is not None else sys.stderr
        self.runs, self.epochs_per_run, self.name = runs, epochs_per_run, name
        self.epochs = 0
        self.description = ""
        self.start = time.perf_counter()
        self.bar = (tqdm(total=runs * epochs_per_run, desc=name, unit="epoch", file=self.stream)
                    if is_terminal(self.stream) else None)

    def set_postfix_str(self, description: str, refresh: bool = False) -> None:
        self.description = description
        if self.bar is not None:
            self.bar.set_postfix_str(description, refresh=refresh)

    def update(self, epochs: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(epochs)
            return
        before, self.epochs = self.epochs, self.epochs + epochs
        if before // self.epochs_per_run != self.epochs // self.epochs_per_run:
            seconds, self.start = time.perf_counter() - self.start, time.perf_counter()
            print(f"{self.name}: run {self.epochs // self.epochs_per_run}/{self.runs} done: {self.description} "
                  f"({seconds:.1f} s)", file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass
class Runner:
    """Runs lists of Run: `jobs` processes (1: in this process), each with `threads` torch threads.

    `interactive` (default: whether `stream` is a terminal) chooses the progress report."""

    name: str
    jobs: int = 1
    threads: int = 1
    stream: object = None
    interactive: bool | None = None

    def __post_init__(self):
        if self.jobs < 1 or self.threads < 1:
            raise ValueError(f"jobs and threads must be >= 1; got jobs={self.jobs}, threads={self.threads}")
        self.stream = self.stream if self.stream is not None else sys.stderr
        if self.interactive is None:
            self.interactive = is_terminal(self.stream)

    def map(self, runs: list[Run]) -> list:
        """The results of `runs`, in their order."""
        results: list = [None] * len(runs)
        bar = tqdm(total=len(runs), desc=self.name, unit="run", file=self.stream) if self.interactive else None
        finished = 0

        def report(index: int, result, seconds: float) -> None:
            nonlocal finished
            results[index] = result
            finished += 1
            if bar is not None:
                bar.set_postfix_str(runs[index].description, refresh=False)
                bar.update(1)
            else:
                print(f"{self.name}: run {finished}/{len(runs)} done: {runs[index].description} "
                      f"({seconds:.1f} s{_headline(result)})", file=self.stream, flush=True)

        try:
            if self.jobs == 1 or len(runs) <= 1:
                for index, run in enumerate(runs):
                    report(index, *_timed(run.function, run.arguments))
            else:
                self._in_processes(runs, report)
        finally:
            if bar is not None:
                bar.close()
        return results

    def _in_processes(self, runs: list[Run], report) -> None:
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=min(self.jobs, len(runs)), mp_context=context,
                                 initializer=_set_threads, initargs=(self.threads,)) as pool:
            pending = {pool.submit(_timed, run.function, run.arguments): index for index, run in enumerate(runs)}
            try:
                while pending:
                    done, _ = wait(pending, return_when=FIRST_COMPLETED)
                    for future in done:
                        report(pending.pop(future), *future.result())
            except BaseException:
                pool.shutdown(wait=True, cancel_futures=True)
                raise
