"""Does one relative variability carry over between models where an absolute one does not?

`nvrm-demo transfer` (or `python -m nvrm_ext.demo.transfer`). σ only matters relative to the
weights: an absolute variability tuned on one model is a different amount of noise on a model
whose weights are twice as large, or on another architecture. `relative=True` sets tensor k's
scale to variability × std(w_k) (docs/noise.md §5.1), which should not care. This experiment
trains the demo's label-noise task (40% pair flip) on models whose weight scales differ -- the
MLP with its initial weights and biases multiplied by 0.5, 1 and 2, and the CNN -- with plain
SGD, NVRM-SGD at an absolute variability tuned on the x1 MLP, and NVRM-SGD at one relative
variability (tuned on the same x1 MLP's validation split: nvrm_ext/demo/tune_relative.py).

Within a seed every arm of a model shares the data split, the label noise, the initial weights
and the batch order, so each NVRM arm is compared with SGD by the per-seed (paired) difference:
its mean, a 95% Student-t interval over seeds and the seeds where it wins; an interval that
includes 0 is "not shown", whatever the sign.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path

if __name__ == "__main__":  # say what to install before importing it
    from ._entry import require_demo_packages
    require_demo_packages("python -m nvrm_ext.demo.transfer")

import numpy as np  # noqa: E402
import torch

from . import experiments, statistics
from .arguments import (OneLineParser, command_line, fail, nonnegative_float, positive_int, probability,
                        writable_directory)
from .data import NOISE_PATTERNS
from .training import OptimizerConfig, build_cnn, build_mlp

#: Model family -> (SGD learning rate, hidden width): each family trains at the learning rate
#: SGD's grid chose for it (MLP: tune label-noise; CNN: tune regularizers), so the baseline is a
#: fair one; the noise settings are then carried over unchanged.
FAMILIES = {"mlp": (0.03, 512), "cnn": (0.1, 128)}
#: Models as "<family> x<scale>": the family's seeded initialisation times the scale.
MODELS = ("mlp x0.5", "mlp x1", "mlp x2", "cnn x0.5", "cnn x1", "cnn x2")
DEFAULT_MODELS = ("mlp x0.5", "mlp x1", "mlp x2", "cnn x1")
#: The absolute variability the demo tuned on the x1 MLP (docs/demo/tune_label_noise.json).
DEFAULT_ABSOLUTE = 0.03
#: The relative variability tuned on the same model (docs/demo/tune_relative.json).
DEFAULT_RELATIVE = 0.5
ARMS = ("sgd", "absolute", "relative")
METRICS = {"noisy_train": False, "test": True}  # metric -> higher is better
METRIC_NAMES = {"noisy_train": "noisy-label fit", "test": "clean test"}
CONFIDENCE = 0.95


# ------------------------------------------------------------------------------ statistics
def paired_difference(values, baseline, higher_is_better: bool = True, confidence: float = CONFIDENCE) -> dict:
    """statistics.paired_difference (values − baseline, paired by seed: mean, Student-t interval,
    wins) as a JSON record: the interval's bounds None from one seed, the differences' sample
    std, and whether the interval excludes 0 ('shown')."""
    difference = statistics.paired_difference(values, baseline, higher_is_better, confidence)
    one_seed = difference.n < 2
    std = None if one_seed else float(np.std(np.asarray(values, float) - np.asarray(baseline, float), ddof=1))
    return {"mean": difference.mean, "std": std, "low": None if one_seed else difference.low,
            "high": None if one_seed else difference.high, "wins": difference.wins, "n": difference.n,
            "shown": not one_seed and difference.shown, "confidence": confidence}


def verdict(difference: dict, scale: float = 100.0) -> str:
    """'−4.5 [−5.9, −3.2]' in points, prefixed 'not shown: ' where the interval includes 0."""
    if difference["low"] is None:
        return f"not shown: {statistics.signed(scale * difference['mean'])} (one seed, no interval)"
    text = (f"{statistics.signed(scale * difference['mean'])} "
            f"[{statistics.signed(scale * difference['low'])}, {statistics.signed(scale * difference['high'])}]")
    return text if difference["shown"] else f"not shown: {text}"


# ------------------------------------------------------------------------------ models and runs
def parse_model(key: str) -> tuple[str, float]:
    family, _, scale = key.partition(" x")
    if family not in FAMILIES or not scale:
        raise ValueError(f"unknown model {key!r} (expected one of {MODELS})")
    return family, float(scale)


@torch.no_grad()
def build_scaled_model(key: str, seed: int) -> torch.nn.Module:
    """The seed's model of the family (PyTorch default init) with every parameter times the scale."""
    family, scale = parse_model(key)
    torch.manual_seed(seed)
    model = build_mlp(FAMILIES[family][1]) if family == "mlp" else build_cnn(FAMILIES[family][1])
    for p in model.parameters():
        p.mul_(scale)
    return model


def weight_spreads(model: torch.nn.Module) -> list[float]:
    """Population std (as relative=True measures it) of each parameter with two elements or more."""
    return [torch.std(p.detach().double(), correction=0).item() for p in model.parameters() if p.numel() > 1]


def run_model(seed: int, key: str, epochs: int, absolute: float, relative: float, noise: str, rate: float) -> dict:
    """One seed of one model: the curves of the three arms and the initial weight spreads.
    Module level (and single-threaded) so that worker processes can run it."""
    torch.set_num_threads(1)
    family, _ = parse_model(key)
    lr, hidden = FAMILIES[family]
    common = experiments.Common(seeds=1, epochs=epochs, lr=lr, hidden=hidden)
    data, noisy = experiments.noisy_digits(seed, noise, rate, "cpu")
    arms = {"sgd": OptimizerConfig("sgd", lr, common.momentum, common.weight_decay),
            "absolute": OptimizerConfig("nvrm-sgd", lr, common.momentum, common.weight_decay, absolute),
            "relative": OptimizerConfig("nvrm-sgd", lr, common.momentum, common.weight_decay, relative,
                                        relative=True)}
    out = {"weight_spreads": weight_spreads(build_scaled_model(key, seed))}
    for name, arm in arms.items():
        out[name] = experiments.train_on_noisy_labels(common, arm, data, noisy, seed,
                                                      model=build_scaled_model(key, seed), description=name)
    return out


def transfer(seeds: int = 10, epochs: int = 30, models=DEFAULT_MODELS, absolute: float = DEFAULT_ABSOLUTE,
             relative: float = DEFAULT_RELATIVE, noise: str = "pair", rate: float = 0.4, jobs: int = 1,
             log=None, on_result=None) -> dict:
    """Every (seed, model) pair, `jobs` at a time in worker processes (jobs=1: in this process;
    the numbers do not depend on it); `log(line)` gets one line per finished pair, and
    `on_result(seed, model, result)` its numbers (so that a long run interrupted keeps them).
    The CNN's pairs, several times slower, go first, so the last ones finish together."""
    tasks = sorted(((seed, key) for seed in range(seeds) for key in models),
                   key=lambda task: (parse_model(task[1])[0] != "cnn", task[0]))
    results, start = {}, time.perf_counter()

    def finished(task, result):
        results[task] = result
        if on_result is not None:
            on_result(*task, result)
        if log is not None:
            log(f"[{len(results)}/{len(tasks)}] {task[1]} seed {task[0]} "
                f"({time.perf_counter() - start:.0f} s)")

    arguments = lambda seed, key: (seed, key, epochs, absolute, relative, noise, rate)  # noqa: E731
    if jobs == 1:
        for task in tasks:
            finished(task, run_model(*arguments(*task)))
    else:
        with ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn")) as pool:
            futures = {pool.submit(run_model, *arguments(*task)): task for task in tasks}
            for future in as_completed(futures):  # a failure raises here
                finished(futures[future], future.result())
    runs = {key: {arm: [results[(seed, key)][arm] for seed in range(seeds)] for arm in ARMS} for key in models}
    spreads = {key: [results[(seed, key)]["weight_spreads"] for seed in range(seeds)] for key in models}
    config = {"seeds": seeds, "epochs": epochs, "models": list(models), "absolute_variability": absolute,
              "relative_variability": relative, "noise": noise, "rate": rate,
              "families": {f: {"lr": lr, "hidden": h} for f, (lr, h) in FAMILIES.items()},
              "momentum": 0.9, "weight_decay": 5e-4, "batch_size": 64, "confidence": CONFIDENCE}
    return {"experiment": "transfer", "config": config, "runs": runs,
            "summary": summarize(runs, spreads, absolute)}


def summarize(runs: dict, spreads: dict, absolute: float) -> dict:
    """Per model: each arm's final mean ± std, each NVRM arm's paired difference to SGD per
    metric, the relative arm's to the absolute one, and how large the absolute σ is next to the
    initial weight spreads."""
    summary = {}
    for key, arms in runs.items():
        final = {arm: {m: [run[m][-1] for run in arm_runs] for m in METRICS} for arm, arm_runs in arms.items()}
        first_seed = np.asarray(spreads[key][0])
        summary[key] = {
            "final": {arm: {m: experiments.mean_std(v) for m, v in metrics.items()} for arm, metrics in final.items()},
            "paired_to_sgd": {arm: {m: paired_difference(final[arm][m], final["sgd"][m], better)
                                    for m, better in METRICS.items()} for arm in ("absolute", "relative")},
            "relative_vs_absolute": {m: paired_difference(final["relative"][m], final["absolute"][m], better)
                                     for m, better in METRICS.items()},
            "absolute_over_weight_std": {"min": float(absolute / first_seed.max()),
                                         "median": float(absolute / np.median(first_seed)),
                                         "max": float(absolute / first_seed.min())}}
    return summary


# ------------------------------------------------------------------------------ table and plot
def table(result: dict) -> str:
    config = result["config"]
    labels = {"sgd": "SGD", "absolute": f"absolute {config['absolute_variability']:g}",
              "relative": f"relative {config['relative_variability']:g}"}
    header = ("model", "arm", "noisy fit %", "Δ fit (lower wins)", "wins", "clean test %", "Δ test", "wins")
    rows = [header]
    for key, entry in result["summary"].items():
        for arm in ARMS:
            final = entry["final"][arm]
            row = [key, labels[arm]]
            for metric in METRICS:
                row.append(f"{100 * final[metric]['mean']:.1f} ± {100 * final[metric]['std']:.1f}")
                if arm == "sgd":
                    row += ["", ""]
                else:
                    difference = entry["paired_to_sgd"][arm][metric]
                    row += [verdict(difference), f"{difference['wins']}/{difference['n']}"]
            rows.append(row)
        row = [key, "relative − absolute"]
        for metric in METRICS:
            difference = entry["relative_vs_absolute"][metric]
            row += ["", verdict(difference), f"{difference['wins']}/{difference['n']}"]
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    ratios = "; ".join(f"{key} {e['absolute_over_weight_std']['min']:.2g}-{e['absolute_over_weight_std']['max']:.2g}"
                       for key, e in result["summary"].items())
    lines.append(f"\nabsolute σ / initial weight std, over tensors: {ratios}")
    lines.append(f"Δ: the arm minus SGD (last rows: relative minus absolute), paired per seed, mean "
                 f"[{100 * CONFIDENCE:.0f}% t-interval], in points; 'not shown' where the interval includes 0")
    return "\n".join(lines)


def markdown(result: dict) -> str:
    """The table of docs/demo/RESULTS.md's transfer section, drawn from the JSON (a test checks
    that the document holds exactly this)."""
    config = result["config"]
    labels = {"sgd": "SGD", "absolute": f"NVRM absolute {config['absolute_variability']:g}",
              "relative": f"NVRM relative {config['relative_variability']:g}"}

    def cells(final, difference) -> list[str]:
        value = "" if final is None else f"{100 * final['mean']:.1f} ± {100 * final['std']:.1f}"
        if difference is None:
            return [value, "", ""]
        return [value, verdict(difference), f"{difference['wins']}/{difference['n']}"]

    rows = [["model", "method", "fits noisy train labels", "Δ (lower wins) [95% CI]", "wins", "clean test acc",
             "Δ [95% CI]", "wins"]]
    for key, entry in result["summary"].items():
        model = key.replace("mlp", "MLP").replace("cnn", "CNN").replace(" x", " ×")
        for arm in ARMS:
            rows.append([model, labels[arm]] + [cell for metric in METRICS for cell in cells(
                entry["final"][arm][metric], None if arm == "sgd" else entry["paired_to_sgd"][arm][metric])])
        rows.append([model, "relative − absolute"] + [cell for metric in METRICS for cell in cells(
            None, entry["relative_vs_absolute"][metric])])
    lines = ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join([lines[0], "|" + "---|" * len(rows[0]), *lines[1:]])


def _marker(axis, x: float, difference: dict, color: str, marker: str, label) -> None:
    """One paired difference in points with its interval; hollow where the interval includes 0."""
    mean = 100 * difference["mean"]
    low, high = ((100 * difference["low"], 100 * difference["high"]) if difference["low"] is not None
                 else (mean, mean))
    axis.errorbar(x, mean, yerr=[[mean - low], [high - mean]], color=color, marker=marker, capsize=4,
                  linestyle="none", markerfacecolor=color if difference["shown"] else "white", label=label)


def plot(result: dict, path: Path) -> None:
    """The paired differences (each NVRM arm to SGD, relative to absolute) with their intervals,
    per model, one panel per metric."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    config, summary = result["config"], result["summary"]
    models = list(summary)
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    styles = {"absolute": ("tab:red", "o", f"absolute {config['absolute_variability']:g}"),
              "relative": ("tab:blue", "s", f"relative {config['relative_variability']:g} × std(w)")}
    for axis, metric in zip(axes, METRICS):
        for offset, (arm, (color, marker, label)) in zip((-0.12, 0.12), styles.items()):
            for i, key in enumerate(models):
                _marker(axis, i + offset, summary[key]["paired_to_sgd"][arm][metric], color, marker,
                        label if i == 0 else None)
        for i, key in enumerate(models):
            _marker(axis, i + 0.36, summary[key]["relative_vs_absolute"][metric], "grey", "^",
                    "relative − absolute" if i == 0 else None)
        axis.axhline(0, color="grey", linewidth=0.8)
        axis.set_xticks(range(len(models)), models)
        better = "higher" if METRICS[metric] else "lower"
        axis.set_title(f"{METRIC_NAMES[metric]}: difference (points; {better} is better)")
        axis.grid(axis="y", alpha=0.3)
    axes[0].legend(loc="best", fontsize=8)
    figure.suptitle(f"One noise setting across weight scales: NVRM − SGD and relative − absolute, paired over "
                    f"{config['seeds']} seeds, {100 * CONFIDENCE:.0f}% t-intervals (hollow: interval includes 0)",
                    fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


# ------------------------------------------------------------------------------ command line
def build_parser(prog: str = "nvrm-demo transfer") -> argparse.ArgumentParser:
    parser = OneLineParser(prog=prog, description=__doc__.split("\n\n")[1])
    parser.add_argument("--seeds", type=positive_int, default=10, help="seeds 0..N-1 (default 10)")
    parser.add_argument("--epochs", type=positive_int, default=30, help="training epochs (default 30)")
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(DEFAULT_MODELS), metavar="MODEL",
                        help=f"models, each once: {', '.join(repr(m) for m in MODELS)} "
                             f"(default: {' '.join(repr(m) for m in DEFAULT_MODELS)})")
    parser.add_argument("--absolute", type=nonnegative_float, default=DEFAULT_ABSOLUTE,
                        help=f"absolute variability of the 'absolute' arm (default {DEFAULT_ABSOLUTE:g})")
    parser.add_argument("--relative", type=nonnegative_float, default=DEFAULT_RELATIVE,
                        help="variability of the 'relative' arm, times each tensor's std "
                             f"(default {DEFAULT_RELATIVE:g})")
    parser.add_argument("--noise", choices=NOISE_PATTERNS, default="pair", help="label noise pattern (default pair)")
    parser.add_argument("--rate", type=probability, default=0.4, help="label noise rate (default 0.4)")
    parser.add_argument("--jobs", type=positive_int, default=2,
                        help="(seed, model) runs trained at once, one process each with one thread (default 2)")
    parser.add_argument("--out", type=Path, default=Path("nvrm_demo_out"),
                        help="output directory for transfer.json and transfer.png (default ./nvrm_demo_out/)")
    return parser


def main(argv: list[str] | None = None, prog: str = "nvrm-demo transfer") -> int:
    parser = build_parser(prog)
    args = parser.parse_args(command_line(argv))
    if len(set(args.models)) != len(args.models):
        parser.error("argument --models: each model once")
    problem = writable_directory(args.out, ["transfer.json", "transfer.png", "transfer.partial.jsonl"])
    if problem:
        fail(prog, problem)
    start = time.perf_counter()
    partial = args.out / "transfer.partial.jsonl"  # each finished run's numbers; removed once all are saved
    partial.write_text("")

    def keep(seed, key, numbers):
        with partial.open("a") as lines:
            lines.write(json.dumps({"seed": seed, "model": key, **numbers}) + "\n")

    result = transfer(args.seeds, args.epochs, tuple(args.models), args.absolute, args.relative, args.noise,
                      args.rate, jobs=min(args.jobs, args.seeds * len(args.models)),
                      log=lambda line: print(line, file=sys.stderr, flush=True), on_result=keep)
    result["seconds"] = round(time.perf_counter() - start, 1)
    result["command"] = " ".join([prog, *command_line(argv)])
    result["environment"] = {"torch": torch.__version__, "threads_per_run": 1, "jobs": args.jobs}
    print(f"\ntransfer: final values over {args.seeds} seed(s), in %\n")
    print(table(result))
    try:
        (args.out / "transfer.json").write_text(json.dumps(result, indent=1) + "\n")
        plot(result, args.out / "transfer.png")
    except OSError as error:
        fail(prog, f"the results above were not saved to {str(args.out)!r}: {error}", status=1)
    partial.unlink(missing_ok=True)
    print(f"\n{result['seconds']:.0f} s; wrote {args.out / 'transfer.png'} and {args.out / 'transfer.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(prog="python -m nvrm_ext.demo.transfer"))
