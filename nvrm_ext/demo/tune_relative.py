"""Tune relative variability as the absolute one was tuned: `python -m nvrm_ext.demo.tune_relative`.

The protocol of `python -m nvrm_ext.demo.tune label-noise` (nvrm_ext/demo/tune.py): the demo's
MLP under 40% pair-flip noise, tuning seeds 100 and 101 (disjoint from the reported seeds), each
holding out 25% of its *training* split with its noisy labels as the validation set; the test
set is never looked at. The learning rate is the one SGD's grid chose there (0.03); at that rate
NVRM-SGD with `relative=True` runs a small grid of variabilities, and -- so that the two rows come
from the same machine and the same code -- the absolute grid and plain SGD are run again beside
it. Criterion: final validation accuracy, mean over the tuning seeds.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

if __name__ == "__main__":  # say what to install before importing it
    from ._entry import require_demo_packages
    require_demo_packages("python -m nvrm_ext.demo.tune_relative")

import torch  # noqa: E402

from . import experiments, tune
from .arguments import OneLineParser, fail, positive_int, writable_directory

#: Multiples of each tensor's weight std. The absolute grid's 0.03 is about 0.4x the first
#: layer's std and 1.2x the others' at initialisation; 0.2 (about 3-8x) destroyed training.
RELATIVE_GRID = (0.25, 0.5, 1.0, 2.0)
#: The learning rate SGD's grid chose on this task (docs/demo/tune_label_noise.json).
TUNED_LR = 0.03


def tune_relative(common: experiments.Common, relative_grid=RELATIVE_GRID, absolute_grid=tune.VARIABILITY_GRID,
                  noise: str = "pair", rate: float = 0.4, log=print) -> dict:
    """Validation scores of SGD, NVRM-SGD with absolute and with relative variability at
    `common.lr`; the best of each grid (ties: the first, i.e. the smallest noise)."""
    def score(name: str, variability: float = 0.0, relative: bool = False) -> tuple[float, list]:
        arm = experiments.OptimizerConfig(name, common.lr, common.momentum, common.weight_decay, variability,
                                          relative=relative)
        start = time.perf_counter()
        result = tune.validation_score(lambda split, labels, seed: experiments.train_on_noisy_labels(
            common, arm, split, labels, seed), noise, rate)
        log(f"{name} variability {variability:g} relative {relative}: validation {100 * result[0]:.2f}% "
            f"({time.perf_counter() - start:.0f} s)")
        return result

    sgd = score("sgd")
    absolute = {v: score("nvrm-sgd", v) for v in absolute_grid}
    relative = {v: score("nvrm-sgd", v, relative=True) for v in relative_grid}
    best = lambda scores: max(scores, key=lambda v: scores[v][0])  # noqa: E731
    return {"sgd": sgd[0], "absolute": {str(v): s for v, (s, _) in absolute.items()}, "best_absolute": best(absolute),
            "relative": {str(v): s for v, (s, _) in relative.items()}, "best_relative": best(relative),
            "curves": {"sgd": sgd[1], "absolute": {str(v): c for v, (_, c) in absolute.items()},
                       "relative": {str(v): c for v, (_, c) in relative.items()}}}


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="python -m nvrm_ext.demo.tune_relative", description=__doc__.split("\n\n")[1])
    parser.add_argument("--epochs", type=positive_int, default=50, help="epochs (default 50, as tune label-noise)")
    parser.add_argument("--out", type=Path, default=Path("nvrm_demo_out"),
                        help="output directory for tune_relative.json (default ./nvrm_demo_out/)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    problem = writable_directory(args.out, ["tune_relative.json"])
    if problem:
        fail(parser.prog, problem)
    torch.set_num_threads(1)
    common = experiments.Common(epochs=args.epochs, lr=TUNED_LR)
    result = tune_relative(common)
    result["grids"] = {"lr": TUNED_LR, "absolute": tune.VARIABILITY_GRID, "relative": RELATIVE_GRID,
                       "tuning_seeds": tune.TUNING_SEEDS, "epochs": args.epochs, "noise": "pair", "rate": 0.4}
    tune.save_scores(parser.prog, result, args.out / "tune_relative.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
