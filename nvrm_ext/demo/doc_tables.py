"""Keep the documentation's results tables equal to the committed demo results.

`python -m nvrm_ext.demo.doc_tables` checks, `--write` rewrites, every block between markers
in README.md and docs/demo/RESULTS.md (or the Markdown files named):

    <!-- nvrm-demo table regularizers.json -->      the table `nvrm-demo` printed for that JSON
    ...                                              (reporting.table), exactly
    <!-- /nvrm-demo -->

    <!-- nvrm-demo claims docs/demo -->             README's claims table: every number, paired
    ...                                              interval and win count drawn from that folder's JSON
    <!-- /nvrm-demo -->

Paths are relative to the Markdown file. A table typed by hand drifts from the run it came from
(a re-run, another machine); rendering it from the JSON that was committed with it cannot.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from . import statistics
from .reporting import label, markdown_table, table

DEFAULT_FILES = ("README.md", "docs/demo/RESULTS.md")
OPENING = re.compile(r"^<!-- nvrm-demo (table|claims) (\S+) -->$")
CLOSING = "<!-- /nvrm-demo -->"


@dataclass
class Block:
    """One marked block of a Markdown file: lines[start:end] are its contents."""

    kind: str
    source: Path
    start: int
    end: int


def find_blocks(path: Path, lines: list[str]) -> list[Block]:
    blocks, opened = [], None
    for number, line in enumerate(lines):
        match = OPENING.match(line.strip())
        if match:
            if opened:
                raise ValueError(f"{path}:{number + 1}: a block opens inside the block of line {opened[2] + 1}")
            opened = (match[1], path.parent / match[2], number)
        elif line.strip() == CLOSING:
            if not opened:
                raise ValueError(f"{path}:{number + 1}: {CLOSING} closes no block")
            blocks.append(Block(opened[0], opened[1], opened[2] + 1, number))
            opened = None
    if opened:
        raise ValueError(f"{path}:{opened[2] + 1}: block never closed with {CLOSING}")
    return blocks


def load(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except OSError as error:
        raise ValueError(f"cannot read {path}: {error.strerror or error}") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not JSON: {error}") from None


def render(block: Block) -> str:
    if block.kind == "table":
        return table(load(block.source))
    return claims_table(block.source)


def check(path: Path, write: bool = False) -> list[str]:
    """The blocks of `path` that differ from their rendering (rewritten when `write`)."""
    lines = path.read_text().split("\n")
    problems, replaced = [], list(lines)
    for block in reversed(find_blocks(path, lines)):  # from the end: earlier line numbers stay valid
        expected = render(block).split("\n")
        if lines[block.start:block.end] != expected:
            problems.append(f"{path}:{block.start}: the {block.kind} block does not match what {block.source} gives")
            replaced[block.start:block.end] = expected
    if write and problems:
        path.write_text("\n".join(replaced))
    return problems[::-1]


# ------------------------------------------------------------------------ the README's claims
def short(stat: dict) -> str:
    """'mean±std' in percent, the claims table's compact form of reporting.pct."""
    return f"{100 * stat['mean']:.1f}±{100 * stat['std']:.1f}"


def command(result: dict) -> str:
    """The command that made `result`, without its --out."""
    return "`" + re.sub(r" --out(=| )\S+", "", result["command"]) + "`"


def paired(result: dict, method: str, metric: str, name: str | None = None) -> str:
    """'NVRM − SGD −17.1 [−18.5, −15.7], wins 10 of 10' or 'NVRM − SGD not shown: +3.1 [−1.0, +7.2],
    wins 6 of 10': the paired difference to the method's baseline (statistics.comparisons)."""
    comparison = statistics.find(result, method, metric)
    difference = comparison.difference()
    name = name or f"{short_label(comparison.method)} − {short_label(comparison.baseline)}"
    return f"{name} {statistics.verdict(difference)}, wins {statistics.wins(difference)}"


def short_label(key: str) -> str:
    return label(key).replace(" + ", "+")


def _label_noise_cells(result: dict, lead: bool) -> tuple[str, str]:
    config, s = result["config"], result["summary"]
    fit = {key: short(s[key]["noisy_train"]) for key in s}
    test = {key: short(s[key]["test"]) for key in s}
    correct = 1 - config["rate"]
    near_correct = abs(s["nvrm-sgd"]["noisy_train"]["mean"] - correct) < 0.02
    if lead:
        claim = (f"no memorization of noisy labels ({config['rate']:.0%} {config['noise']} flip; the original's "
                 f"setting lr {config['lr']:g}, variability {config['variability']:g}, {config['epochs']} epochs; "
                 "plot above)")
    else:
        claim = (f"the same, grid-selected (lr {config['lr']:g}, variability {config['variability']:g}, "
                 f"{config['epochs']} epochs; the default run)")
    cell = (f"fit to the noisy labels: SGD {fit['sgd']}, NVRM {fit['nvrm-sgd']}"
            + (f" (≈ only the {correct:.0%} correct labels)" if near_correct else "")
            + f", PSGD {fit['psgd']}; {paired(result, 'nvrm-sgd', 'fits', 'NVRM − SGD')}. "
            f"Clean test: SGD {test['sgd']}, NVRM {test['nvrm-sgd']}, PSGD {test['psgd']} (noise, no de-noising); "
            f"{paired(result, 'nvrm-sgd', 'clean test', 'NVRM − SGD')}")
    return claim, cell


def _perturbation_cells(result: dict) -> tuple[str, str]:
    """The robustness cell and the generalization-gap cell."""
    sigmas, s = result["config"]["sigmas"], result["summary"]
    shown = [i for i, sigma in enumerate(sigmas) if sigma in (0.1, 0.15)] or [len(sigmas) - 1]
    robust = "; ".join(f"σ={sigmas[i]:g}: SGD {short(s['sgd']['perturbed_test'][i])}, "
                       f"NVRM {short(s['nvrm-sgd']['perturbed_test'][i])}, "
                       f"{paired(result, 'nvrm-sgd', f'test acc, σ={sigmas[i]:g}', 'NVRM − SGD')}" for i in shown)
    return ((f"test accuracy with weight noise {robust}"),
            (f"train − test: SGD {short(s['sgd']['gap'])}, NVRM {short(s['nvrm-sgd']['gap'])}; "
             f"{paired(result, 'nvrm-sgd', 'gap', 'NVRM − SGD')}"))


def _forgetting_cells(result: dict) -> tuple[str, str]:
    config, s = result["config"], result["summary"]
    claim = (f"less catastrophic forgetting ({config['num_tasks']} permuted-digits tasks × "
             f"{config['epochs_per_task']} epochs)")
    after = ", ".join(f"{short_label(key)} {short(s[key]['base_task'][-1])}" for key in s)
    pairs = [paired(result, key, "task 0") for key in ("nvrm-adam", "adam+ewc", "nvrm-adam+ewc") if key in s]
    mean = paired(result, "nvrm-adam", "mean acc") if "nvrm-adam" in s and "adam" in s else ""
    return claim, (f"task-0 accuracy after the last task: {after}; " + "; ".join(pairs)
                   + (f". Mean accuracy over all tasks: {mean}" if mean else ""))


def _noise_types_cells(result: dict) -> str:
    config, s = result["config"], result["summary"]
    kinds = [key for key in s if key != "sgd"]
    per_kind = "; ".join(kind + " " + ", ".join(f"{row['std_over_weight_rms']:.2g}×: {100 * row['test']['mean']:.1f}"
                                              for row in s[kind]) for kind in kinds)
    ratio = {f"{kind} {row['variability']:g}": f"{kind} {row['std_over_weight_rms']:.2g}×"
             for kind in kinds for row in s[kind]}
    tests = [c for c in statistics.comparisons(result) if c.metric == statistics.CLEAN_TEST]
    shown = [f"{ratio.get(c.method, c.method)} {statistics.interval(c.difference())}"
             for c in tests if c.difference().shown]
    verdicts = (f"paired to SGD, clean test differs at {', '.join(shown)}; not shown at the other "
                f"{len(tests) - len(shown)}" if shown else "paired to SGD, no clean test difference shown")
    return (f"clean test accuracy by noise std ÷ initial weight RMS ({config['initial_weight_rms']:.3f}; "
            f"SGD without noise {short(s['sgd']['test'])}): {per_kind}; {verdicts}")


def _regularizers_cells(result: dict) -> tuple[str, str]:
    config, s = result["config"], result["summary"]
    claim = (f"regularizers on label noise (one CNN, {config['epochs']} epochs, grid-selected lr {config['lr']:g})")
    fit = ", ".join(f"{short_label(key)} {short(s[key]['noisy_train'])}" for key in s)
    tests = ", ".join(f"{short_label(key)} {short(s[key]['test'])}" for key in s)
    methods = [key for key in s if key != "sgd"]
    fit_pairs = "; ".join(paired(result, key, "fits") for key in methods)
    test_pairs = "; ".join(paired(result, key, "clean test") for key in methods)
    return claim, f"noisy fit: {fit}; {fit_pairs}. Clean test: {tests}; {test_pairs}"


def claims_table(folder: Path) -> str:
    """The README's table of the paper's claims, from the JSON files the demo saved in `folder`."""
    lead = load(folder / "label_noise_lead" / "label_noise.json")
    default = load(folder / "label_noise.json")
    perturbation = load(folder / "perturbation.json")
    forgetting = load(folder / "forgetting.json")
    noise_types = load(folder / "noise_types.json")
    regularizers = load(folder / "regularizers.json")
    robust, gap = _perturbation_cells(perturbation)
    rows = [(*_label_noise_cells(lead, lead=True), lead),
            (*_label_noise_cells(default, lead=False), default),
            ("robustness to weight perturbation (clean labels)", robust, perturbation),
            ("smaller generalization gap", gap, perturbation),
            (*_forgetting_cells(forgetting), forgetting),
            ("noise types", _noise_types_cells(noise_types), noise_types),
            (*_regularizers_cells(regularizers), regularizers)]
    return markdown_table(["claim", "command", "result"],
                          [[claim, command(result), f"{result['config']['seeds']} seeds: {cell}"]
                           for claim, cell, result in rows])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nvrm_ext.demo.doc_tables",
                                     description="Check (default) or rewrite the results tables of the docs "
                                                 "against the committed demo JSON.")
    parser.add_argument("files", nargs="*", type=Path, default=[Path(f) for f in DEFAULT_FILES],
                        help=f"Markdown files (default: {' '.join(DEFAULT_FILES)})")
    parser.add_argument("--write", action="store_true", help="rewrite the blocks that differ")
    args = parser.parse_args(argv)
    try:
        problems = [problem for path in args.files for problem in check(path, write=args.write)]
    except (ValueError, OSError) as error:
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 2
    except KeyError as error:
        print(f"{parser.prog}: error: a results file lacks the entry {error} (not written by this demo?)",
              file=sys.stderr)
        return 2
    for problem in problems:
        print(("rewrote: " if args.write else "") + problem, file=sys.stdout if args.write else sys.stderr)
    if problems and not args.write:
        print(f"run `{parser.prog} --write` to regenerate them", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
