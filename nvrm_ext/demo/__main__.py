"""`python -m nvrm_ext.demo [SUBCOMMAND] [options]` (console script: `nvrm-demo`).

Reproduces the NVRM paper's claims at digits scale on a CPU, without downloads:

  label-noise   (default) SGD vs NVRM-SGD vs PSGD under 40% pair-flip label noise
  perturbation  test accuracy under Gaussian weight perturbation; generalization gap
  forgetting    permuted digits, 5 tasks: Adam vs NVRM-Adam, optionally with EWC
  noise-types   Gaussian vs Laplace vs Uniform noise across variability scales
  regularizers  SGD vs FusedVSGD vs FusedAMP vs Disout vs NSR under label noise, one small CNN

Each writes <experiment>.json and <experiment>.png to --out and prints a results table.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

if __name__ == "__main__":  # `python -m nvrm_ext.demo`: say what to install before importing it
    from ._entry import require_demo_packages
    require_demo_packages("python -m nvrm_ext.demo")

import torch  # noqa: E402
from tqdm import tqdm

from . import experiments
from .data import NOISE_PATTERNS
from .reporting import save, table

DEFAULT_SUBCOMMAND = "label-noise"

#: Per-experiment defaults of the common options. Learning rates and variabilities come from
#: the grids in nvrm_ext/demo/tune.py; epochs are chosen so that the default label-noise run
#: (3 seeds x 3 optimizers) stays under 3 minutes on a 2-core CPU. 'perturbation' reuses the
#: label-noise choice; 'noise-types' sweeps the variability itself. 'regularizers' (5 methods on
#: a CNN, tuned by `python -m nvrm_ext.demo.tune regularizers`) trains 25 epochs so that its
#: default run stays under 5 minutes on a 2-core CPU.
DEFAULTS = {
    "label-noise": dict(epochs=30, lr=0.03, variability=0.03, weight_decay=5e-4),
    "perturbation": dict(epochs=30, lr=0.03, variability=0.03, weight_decay=5e-4),
    "forgetting": dict(epochs=5, lr=3e-4, variability=0.03, weight_decay=0.0),
    "noise-types": dict(epochs=20, lr=0.03, variability=None, weight_decay=5e-4),
    "regularizers": dict(epochs=25, lr=0.1, variability=0.01, weight_decay=5e-4, hidden=128),
}
#: Where the 'regularizers' defaults (DEFAULTS above, experiments.RegularizerSettings) come from;
#: recorded in its JSON and printed under its table.
REGULARIZERS_HYPERPARAMETER_SOURCE = (
    "defaults tuned on noisy validation splits (seeds 100, 101; `python -m nvrm_ext.demo.tune regularizers`, "
    "docs/demo/tune_regularizers.json): SGD lr, then at that lr each method's key hyperparameter (FusedVSGD "
    "variability, FusedAMP epsilon, Disout dist_prob, NSR lam); the others fixed (AMP inner_lr 1, Disout "
    "block 3 / alpha 5, NSR without queue). Grid differences are within validation noise. Flags given on "
    "the command line override these (see 'command')")
#: Width of the hidden layers where DEFAULTS does not say otherwise.
DEFAULT_HIDDEN = 512


def _common_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("common options")
    group.add_argument("--seeds", type=int, default=3, help="number of seeds 0..N-1; results are mean ± std (default 3)")
    group.add_argument("--epochs", type=int, help="training epochs (per task for 'forgetting')")
    group.add_argument("--lr", type=float, help="learning rate, shared by the baseline and the NVRM arm")
    group.add_argument("--variability", type=float, help="NVRM noise scale (Gaussian std); noise-types sweeps --scales instead")
    group.add_argument("--weight-decay", type=float, help="L2 weight decay")
    group.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (default 0.9)")
    group.add_argument("--hidden", type=int,
                       help=f"width of the MLP's two hidden layers (default {DEFAULT_HIDDEN}); "
                            "for 'regularizers', of the CNN's fully connected layer (default 128)")
    group.add_argument("--batch-size", type=int, default=64, help="mini-batch size (default 64)")
    group.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default cpu)")
    group.add_argument("--threads", type=int, default=1,
                       help="torch CPU threads (default 1: this MLP is too small to gain from more, "
                            "and one thread does not fight other processes for the cores)")
    group.add_argument("--out", type=Path, default=Path("nvrm_demo_out"),
                       help="output directory for the PNG and JSON (default ./nvrm_demo_out/)")
    return common


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nvrm-demo", description="Reproduce the NVRM paper's claims at digits "
                                     "scale on a CPU, without downloads.",
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=f"Without a subcommand, '{DEFAULT_SUBCOMMAND}' runs.")
    subcommands = parser.add_subparsers(dest="experiment", metavar="SUBCOMMAND")
    common = [_common_options()]

    noisy = subcommands.add_parser("label-noise", parents=common, help="memorization of noisy labels (default)")
    noise_options = [("--noise", dict(choices=NOISE_PATTERNS, default="pair",
                                      help="pair: label k -> k+1 mod 10 (asymmetric); symmetric: uniform other class")),
                     ("--rate", dict(type=float, default=0.4, help="fraction of training labels corrupted (default 0.4)"))]
    for flag, options in noise_options:
        noisy.add_argument(flag, **options)

    perturb = subcommands.add_parser("perturbation", parents=common, help="robustness to weight noise, generalization gap")
    perturb.add_argument("--sigmas", type=float, nargs="+", default=[0.0, 0.01, 0.02, 0.05, 0.1, 0.15, 0.2],
                         help="std of the Gaussian noise added to every weight")
    perturb.add_argument("--draws", type=int, default=5, help="noise draws averaged per σ (default 5)")

    forget = subcommands.add_parser("forgetting", parents=common, help="permuted digits, catastrophic forgetting")
    forget.add_argument("--tasks", type=int, default=5, help="number of tasks; task 0 is the unpermuted digits")
    forget.add_argument("--ewc", type=float, default=0.0, metavar="LAMBDA",
                        help="also run every optimizer with EWC of this strength (default 0: off)")

    types = subcommands.add_parser("noise-types", parents=common, help="Gaussian vs Laplace vs Uniform noise")
    types.add_argument("--scales", type=float, nargs="+", default=[0.01, 0.03, 0.1, 0.2],
                       help="variability values to sweep (default 0.01 0.03 0.1 0.2)")
    for flag, options in noise_options:
        types.add_argument(flag, **options)
    compare = subcommands.add_parser("regularizers", parents=common,
                                     help="SGD, FusedVSGD, FusedAMP, Disout, NSR on one CNN under label noise")
    for flag, options in noise_options:
        compare.add_argument(flag, **options)
    defaults = experiments.RegularizerSettings()
    method_options = compare.add_argument_group("per-method hyperparameters (FusedVSGD uses --variability)")
    method_options.add_argument("--amp-epsilon", type=float, default=defaults.amp_epsilon,
                                help="FusedAMP: radius of each tensor's perturbation ball "
                                     f"(default {defaults.amp_epsilon:g})")
    method_options.add_argument("--amp-inner-lr", type=float, default=defaults.amp_inner_lr,
                                help=f"FusedAMP: inner ascent step size (default {defaults.amp_inner_lr:g})")
    method_options.add_argument("--disout-prob", type=float, default=defaults.disout_prob,
                                help="Disout: fraction of feature-map elements distorted "
                                     f"(default {defaults.disout_prob:g})")
    method_options.add_argument("--disout-block-size", type=int, default=defaults.disout_block_size,
                                help=f"Disout: side of the distorted blocks on the 8x8 maps "
                                     f"(default {defaults.disout_block_size})")
    method_options.add_argument("--disout-alpha", type=float, default=defaults.disout_alpha,
                                help=f"Disout: distortion intensity (default {defaults.disout_alpha:g})")
    method_options.add_argument("--nsr-lam", type=float, default=defaults.nsr_lam,
                                help=f"NSR: weight of the intra-class variance penalty (default {defaults.nsr_lam:g})")
    method_options.add_argument("--nsr-queue-length", type=int, default=defaults.nsr_queue_length,
                                help=f"NSR: per-class memory queue length, 0 = batch only "
                                     f"(default {defaults.nsr_queue_length})")
    for name, subparser in subcommands.choices.items():
        defaults = ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in DEFAULTS[name].items() if v is not None)
        subparser.epilog = f"defaults for {name}: {defaults}"
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help")):
        argv.insert(0, DEFAULT_SUBCOMMAND)
    args = build_parser().parse_args(argv)
    for name, value in {"hidden": DEFAULT_HIDDEN, **DEFAULTS[args.experiment]}.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def epochs_in(args: argparse.Namespace) -> int:
    """Total epochs the experiment will train, for the progress bar."""
    if args.experiment == "label-noise":
        runs_per_seed = 3
    elif args.experiment == "regularizers":
        runs_per_seed = len(experiments.REGULARIZER_METHODS)
    elif args.experiment == "perturbation":
        runs_per_seed = 2
    elif args.experiment == "forgetting":
        runs_per_seed = args.tasks * (4 if args.ewc > 0 else 2)
    else:
        runs_per_seed = 1 + len(experiments.NOISE_TYPES) * len(args.scales)
    return args.seeds * args.epochs * runs_per_seed


def run(args: argparse.Namespace) -> dict:
    common = experiments.Common(seeds=args.seeds, epochs=args.epochs, lr=args.lr, variability=args.variability,
                                hidden=args.hidden, batch_size=args.batch_size, momentum=args.momentum,
                                weight_decay=args.weight_decay, device=args.device)
    with tqdm(total=epochs_in(args), desc=args.experiment, unit="epoch") as common.progress:
        if args.experiment == "label-noise":
            return experiments.label_noise(common, noise=args.noise, rate=args.rate)
        if args.experiment == "perturbation":
            return experiments.perturbation(common, sigmas=tuple(args.sigmas), draws=args.draws)
        if args.experiment == "forgetting":
            return experiments.forgetting(common, num_tasks=args.tasks, ewc=args.ewc)
        if args.experiment == "regularizers":
            settings = experiments.RegularizerSettings(
                amp_epsilon=args.amp_epsilon, amp_inner_lr=args.amp_inner_lr, disout_prob=args.disout_prob,
                disout_block_size=args.disout_block_size, disout_alpha=args.disout_alpha, nsr_lam=args.nsr_lam,
                nsr_queue_length=args.nsr_queue_length)
            return experiments.regularizers(common, settings, noise=args.noise, rate=args.rate,
                                            hyperparameter_source=REGULARIZERS_HYPERPARAMETER_SOURCE)
        return experiments.noise_types(common, scales=tuple(args.scales), noise=args.noise, rate=args.rate)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.seeds < 1 or args.epochs < 1:
        raise SystemExit("--seeds and --epochs must be at least 1")
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    result = run(args)
    result["seconds"] = round(time.perf_counter() - start, 1)
    result["command"] = "nvrm-demo " + " ".join(sys.argv[1:] if argv is None else argv)
    json_path, png_path = save(result, args.out)
    print(f"\n{args.experiment}: final values, mean ± std over {args.seeds} seed(s), in %\n")
    print(table(result))
    if result["config"].get("hyperparameter_source"):
        print(f"\nhyperparameters: {result['config']['hyperparameter_source']}")
    print(f"\n{result['seconds']:.0f} s; wrote {png_path} and {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
