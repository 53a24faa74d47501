"""`python -m nvrm_ext.demo [SUBCOMMAND] [options]` (console script: `nvrm-demo`).

Reproduces the NVRM paper's claims at digits scale on a CPU, without downloads:

  label-noise   (default) SGD vs NVRM-SGD vs PSGD under 40% pair-flip label noise
  perturbation  test accuracy under Gaussian weight perturbation; generalization gap
  forgetting    permuted digits, 5 tasks: Adam vs NVRM-Adam, optionally with EWC
  noise-types   Gaussian vs Laplace vs Uniform noise across variability scales
  regularizers  SGD vs FusedVSGD vs FusedAMP vs Disout vs NSR under label noise, one small CNN
  transfer      one relative vs one absolute variability across weight scales (its own options:
                nvrm-demo transfer --help)

Each writes <experiment>.json and <experiment>.png to --out and prints a results table.
"""
from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

if __name__ == "__main__":  # `python -m nvrm_ext.demo`: say what to install before importing it
    from ._entry import require_demo_packages
    require_demo_packages("python -m nvrm_ext.demo")

import torch  # noqa: E402

from . import experiments
from .arguments import (OneLineParser, below_one, command_line, distinct, int_at_least, int_between,
                        fail, nonnegative_float, nonnegative_int, positive_float, positive_int, probability,
                        torch_device, writable_directory)
from .data import NOISE_PATTERNS
from .reporting import output_files, save, table
from .runner import Runner
from .statistics import CONFIDENCE
from .training import IMAGE_SIDE

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


#: Defaults of the common options that DEFAULTS does not set per experiment.
COMMON_DEFAULTS = dict(seeds=3, hidden=DEFAULT_HIDDEN, momentum=0.9, batch_size=64, device="cpu", threads=1,
                       out=Path("nvrm_demo_out"))
#: Common options an experiment does not use: given to it, they are refused rather than ignored.
NOT_USED_BY = {"noise-types": {"variability": "it sweeps --scales instead"},
               "forgetting": {"momentum": "it trains with Adam"}}


def _common_options(suppress_defaults: bool) -> argparse.ArgumentParser:
    """The options every subcommand takes. They are attached both to the top-level parser and to
    each subcommand, so they may come before or after the subcommand; the subcommand's copy has
    no defaults (argparse.SUPPRESS), so it only overrides what was given after the subcommand.
    The real defaults are filled in by parse_args (COMMON_DEFAULTS, DEFAULTS)."""
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("common options (before or after the subcommand)")
    default = argparse.SUPPRESS if suppress_defaults else None
    group.add_argument("--seeds", type=positive_int, default=default,
                       help="number of seeds 0..N-1; results are mean ± std and paired differences to the "
                            "baseline with 95%% t intervals (default 3; at least 10 for the README's tables)")
    group.add_argument("--jobs", type=positive_int, default=default,
                       help="runs trained at once, each in its own process with --threads torch threads "
                            "(default: min(2, seeds) on the CPU, 1 on a GPU); the results do not depend on it")
    group.add_argument("--epochs", type=positive_int, default=default,
                       help="training epochs (per task for 'forgetting')")
    group.add_argument("--lr", type=positive_float, default=default,
                       help="learning rate, shared by the baseline and the NVRM arm")
    group.add_argument("--variability", type=nonnegative_float, default=default,
                       help="NVRM noise scale (Gaussian std; 0: no noise); noise-types sweeps --scales instead")
    group.add_argument("--weight-decay", type=nonnegative_float, default=default, help="L2 weight decay")
    group.add_argument("--momentum", type=below_one, default=default,
                       help="SGD momentum, in [0, 1) (default 0.9; not used by 'forgetting', which trains Adam)")
    group.add_argument("--hidden", type=positive_int, default=default,
                       help=f"width of the MLP's two hidden layers (default {DEFAULT_HIDDEN}); "
                            "for 'regularizers', of the CNN's fully connected layer (default 128)")
    group.add_argument("--batch-size", type=positive_int, default=default, help="mini-batch size (default 64)")
    group.add_argument("--device", type=torch_device, default=default,
                       help="cpu, cuda or cuda:N, checked before training (default cpu)")
    group.add_argument("--threads", type=positive_int, default=default,
                       help="torch CPU threads (default 1: this MLP is too small to gain from more, "
                            "and one thread does not fight other processes for the cores)")
    group.add_argument("--out", type=Path, default=default,
                       help="output directory for the PNG and JSON, created and checked for writing "
                            "before training (default ./nvrm_demo_out/)")
    return common


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="nvrm-demo", description="Reproduce the NVRM paper's claims at digits "
                           "scale on a CPU, without downloads.", parents=[_common_options(False)],
                           formatter_class=argparse.RawDescriptionHelpFormatter,
                           epilog=f"Without a subcommand, '{DEFAULT_SUBCOMMAND}' runs.")
    subcommands = parser.add_subparsers(dest="experiment", metavar="SUBCOMMAND")
    common = [_common_options(True)]

    noisy = subcommands.add_parser("label-noise", parents=common, help="memorization of noisy labels (default)")
    noise_options = [("--noise", dict(choices=NOISE_PATTERNS, default="pair",
                                      help="pair: label k -> k+1 mod 10 (asymmetric); symmetric: uniform other class")),
                     ("--rate", dict(type=probability, default=0.4,
                                     help="fraction of training labels corrupted, in [0, 1] (default 0.4)"))]
    for flag, options in noise_options:
        noisy.add_argument(flag, **options)

    perturb = subcommands.add_parser("perturbation", parents=common, help="robustness to weight noise, generalization gap")
    perturb.add_argument("--sigmas", type=nonnegative_float, nargs="+", default=[0.0, 0.01, 0.02, 0.05, 0.1, 0.15, 0.2],
                         help="std of the Gaussian noise added to every weight (each >= 0)")
    perturb.add_argument("--draws", type=positive_int, default=5, help="noise draws averaged per σ (default 5)")

    forget = subcommands.add_parser("forgetting", parents=common, help="permuted digits, catastrophic forgetting")
    forget.add_argument("--tasks", type=int_at_least(2, "task 0 and at least one task after it"), default=5,
                        help="number of tasks; task 0 is the unpermuted digits (default 5)")
    forget.add_argument("--ewc", type=nonnegative_float, default=0.0, metavar="LAMBDA",
                        help="also run every optimizer with EWC of this strength (default 0: off)")

    types = subcommands.add_parser("noise-types", parents=common, help="Gaussian vs Laplace vs Uniform noise")
    types.add_argument("--scales", type=positive_float, nargs="+", default=[0.01, 0.03, 0.1, 0.2],
                       help="variability values to sweep, each > 0 and once (default 0.01 0.03 0.1 0.2)")
    for flag, options in noise_options:
        types.add_argument(flag, **options)
    compare = subcommands.add_parser("regularizers", parents=common,
                                     help="SGD, FusedVSGD, FusedAMP, Disout, NSR on one CNN under label noise")
    for flag, options in noise_options:
        compare.add_argument(flag, **options)
    defaults = experiments.RegularizerSettings()
    method_options = compare.add_argument_group("per-method hyperparameters (FusedVSGD uses --variability)")
    method_options.add_argument("--amp-epsilon", type=nonnegative_float, default=defaults.amp_epsilon,
                                help="FusedAMP: radius of each tensor's perturbation ball, >= 0 "
                                     f"(default {defaults.amp_epsilon:g})")
    method_options.add_argument("--amp-inner-lr", type=nonnegative_float, default=defaults.amp_inner_lr,
                                help=f"FusedAMP: inner ascent step size, >= 0 (default {defaults.amp_inner_lr:g})")
    method_options.add_argument("--disout-prob", type=below_one, default=defaults.disout_prob,
                                help="Disout: fraction of feature-map elements distorted, in [0, 1) "
                                     f"(default {defaults.disout_prob:g})")
    method_options.add_argument("--disout-block-size", default=defaults.disout_block_size,
                                type=int_between(1, IMAGE_SIDE, f"the distorted maps are {IMAGE_SIDE}x{IMAGE_SIDE}"),
                                help=f"Disout: side of the distorted blocks on the {IMAGE_SIDE}x{IMAGE_SIDE} maps "
                                     f"(default {defaults.disout_block_size})")
    method_options.add_argument("--disout-alpha", type=nonnegative_float, default=defaults.disout_alpha,
                                help=f"Disout: distortion intensity, >= 0 (default {defaults.disout_alpha:g})")
    method_options.add_argument("--nsr-lam", type=nonnegative_float, default=defaults.nsr_lam,
                                help="NSR: weight of the intra-class variance penalty, >= 0 "
                                     f"(default {defaults.nsr_lam:g})")
    method_options.add_argument("--nsr-queue-length", type=nonnegative_int, default=defaults.nsr_queue_length,
                                help=f"NSR: per-class memory queue length, 0 = batch only "
                                     f"(default {defaults.nsr_queue_length})")
    for name, subparser in subcommands.choices.items():
        defaults = ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in DEFAULTS[name].items() if v is not None)
        subparser.epilog = f"defaults for {name}: {defaults}"
    # Listed here so that --help shows it; main() hands `transfer ...` to transfer.py before this
    # parser runs, so this entry is reached only when options came before the subcommand.
    transfer = subcommands.add_parser("transfer", add_help=False,
                                      help="one relative vs one absolute variability across weight scales "
                                           "(its own options, after it: nvrm-demo transfer --help)")
    return parser


def _with_subcommand(argv: list[str]) -> list[str]:
    """`argv` with the default subcommand inserted where the user left it out: after the common
    options that lead the command line (`--seeds 1 --noise symmetric` -> `--seeds 1 label-noise
    --noise symmetric`). The common options each take one value, which is skipped, so a value
    that happens to be a subcommand's name (`--out perturbation`) is not mistaken for one."""
    common_flags = [flag for action in _common_options(False)._actions for flag in action.option_strings]
    position = 0
    while position < len(argv):
        token = argv[position]
        if token in ("-h", "--help") or token == "--" or not token.startswith("-") or token == "-":
            return argv  # help, or a positional: the subcommand (argparse checks its name)
        flag, has_value, _ = token.partition("=")
        matches = [f for f in common_flags if f == flag] or [f for f in common_flags if f.startswith(flag)]
        if len(matches) != 1:
            break  # an option only a subcommand has: the default subcommand starts here
        if not has_value and position + 1 == len(argv):
            return argv  # a common option without its value: argparse says so
        position += 1 if has_value else 2
    return argv[:position] + [DEFAULT_SUBCOMMAND] + argv[position:]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Parse and check the command line (nothing is created or trained): every value is checked
    by its argparse type, then the combinations; errors exit with status 2 and one line."""
    parser = build_parser()
    argv = _with_subcommand(command_line(argv))
    args, unknown = parser.parse_known_args(argv)
    if args.experiment == "transfer":
        parser.error("transfer takes its own options, after it: nvrm-demo transfer [options]")
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    for name, reason in NOT_USED_BY.get(args.experiment, {}).items():
        if getattr(args, name) is not None:
            parser.error(f"argument --{name.replace('_', '-')}: not used by {args.experiment} ({reason})")
    for flag in ("scales", "sigmas"):
        problem = distinct(getattr(args, flag), f"--{flag}") if hasattr(args, flag) else None
        if problem:
            parser.error(problem)
    for name, value in {**COMMON_DEFAULTS, **DEFAULTS[args.experiment]}.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.jobs is None:
        args.jobs = default_jobs(args)
    return args


def default_jobs(args: argparse.Namespace) -> int:
    """Two processes on the CPU (this demo's machine has two cores; a run uses one), one per GPU."""
    return 1 if torch.device(args.device).type == "cuda" else min(2, args.seeds)


def run(args: argparse.Namespace) -> dict:
    common = experiments.Common(seeds=args.seeds, epochs=args.epochs, lr=args.lr, variability=args.variability,
                                hidden=args.hidden, batch_size=args.batch_size, momentum=args.momentum,
                                weight_decay=args.weight_decay, device=args.device,
                                runner=Runner(args.experiment, jobs=args.jobs, threads=args.threads))
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


def environment(args: argparse.Namespace) -> dict:
    """Where the numbers were made. Training amplifies last-bit differences between CPUs (their
    matrix kernels round differently) into differences of a few points after tens of epochs, so
    a table is reproducible bit for bit only on the same kind of processor and torch build."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {"torch": torch.__version__, "python": platform.python_version(), "cpu": cpu, "device": args.device,
            "threads": args.threads}


def main(argv: list[str] | None = None) -> int:
    if command_line(argv)[:1] == ["transfer"]:  # its own options and statistics: transfer.py
        from . import transfer
        return transfer.main(command_line(argv)[1:])
    args = parse_args(argv)
    problem = writable_directory(args.out, output_files(args.experiment))
    if problem:
        fail("nvrm-demo", problem)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    result = run(args)
    result["seconds"] = round(time.perf_counter() - start, 1)
    result["command"] = "nvrm-demo " + " ".join(command_line(argv))
    result["environment"] = environment(args)
    # The table first: it is the result, and it must survive a failing write.
    print(f"\n{args.experiment}: final values, mean ± std over {args.seeds} seed(s), in %; then each method "
          f"minus its baseline in the same seed: mean [{CONFIDENCE:.0%} t interval] in points (\"not shown\" "
          f"where the interval includes 0) and the seeds where the method wins\n")
    print(table(result))
    if result["config"].get("hyperparameter_source"):
        print(f"\nhyperparameters: {result['config']['hyperparameter_source']}")
    try:
        json_path, png_path = save(result, args.out)
    except OSError as error:
        fail("nvrm-demo", f"the results above were not saved to {str(args.out)!r}: {error}", status=1)
    print(f"\n{result['seconds']:.0f} s; wrote {png_path} and {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
