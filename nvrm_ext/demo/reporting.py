"""Results tables (Markdown, printed and committed) and plots (matplotlib, Agg) of each experiment."""
from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: the demo only ever writes files
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .experiments import NOISE_TYPES  # noqa: E402
from .statistics import CONFIDENCE, comparisons, verdict, wins  # noqa: E402
from .training import LABELS  # noqa: E402

COLORS = {"sgd": "tab:red", "nvrm-sgd": "tab:blue", "psgd": "tab:orange", "adam": "tab:red",
          "nvrm-adam": "tab:blue", "adam+ewc": "tab:pink", "nvrm-adam+ewc": "tab:cyan",
          "amp-sgd": "tab:green", "sgd+disout": "tab:purple", "sgd+nsr": "tab:brown",
          "Gaussian": "tab:blue", "Laplace": "tab:green", "Uniform": "tab:purple"}


def label(key: str) -> str:
    if key in LABELS:
        return LABELS[key]
    base, _, ewc = key.partition("+")
    return LABELS.get(base, base) + (" + EWC" if ewc else "")


def pct(stat: dict) -> str:
    """'mean ± std' in percent."""
    return f"{100 * stat['mean']:.1f} ± {100 * stat['std']:.1f}"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------- tables
def table(result: dict) -> str:
    """The Markdown results tables of one experiment: final values, mean ± std over seeds (%), then
    the paired differences to the baseline (difference_table)."""
    if result["experiment"] == "transfer":  # its own layout: models x arms, paired to SGD and to each other
        from .transfer import markdown

        return markdown(result)
    values = {"label-noise": _label_noise_table, "perturbation": _perturbation_table,
              "forgetting": _forgetting_table, "noise-types": _noise_types_table,
              "regularizers": _label_noise_table}[result["experiment"]](result)
    return values + "\n\n" + difference_table(result)


def arm_label(key: str) -> str:
    """label() for run keys, and 'Gaussian 0.03' style noise-types arms as they are."""
    kind, _, scale = key.partition(" ")
    return key if kind in NOISE_TYPES else label(key)


def difference_table(result: dict) -> str:
    """Each method minus its baseline in the same seed, per claim metric: the mean difference in
    points with its confidence interval ("not shown: ..." where it includes 0), and the seeds
    where the method wins."""
    rows = [[f"{arm_label(c.method)} − {arm_label(c.baseline)}", c.metric, verdict(c.difference()),
             wins(c.difference())] for c in comparisons(result)]
    return markdown_table(["paired difference (same seed)", "metric",
                           f"mean, points [{CONFIDENCE:.0%} t interval]", "seeds it wins"], rows)


def _label_noise_table(result: dict) -> str:
    """Also the 'regularizers' table: the same final accuracies, one row per method."""
    rows = []
    for key, s in result["summary"].items():
        best = [max(run["test"]) for run in result["runs"][key]]
        rows.append([label(key), pct(s["noisy_train"]), pct(s["clean_train"]), pct(s["test"]),
                     f"{100 * np.mean(best):.1f} ± {100 * np.std(best):.1f}"])
    first_column = "method" if result["experiment"] == "regularizers" else "optimizer"
    return markdown_table([first_column, "fits noisy train labels", "clean train acc", "clean test acc",
                           "test acc, best epoch (oracle)"], rows)


def _perturbation_table(result: dict) -> str:
    sigmas = result["config"]["sigmas"]
    rows = [[label(key), pct(s["train"]), pct(s["test"]), pct(s["gap"])] + [pct(p) for p in s["perturbed_test"]]
            for key, s in result["summary"].items()]
    return markdown_table(["optimizer", "train acc", "test acc", "gap (train − test)"]
                          + [f"test acc, σ={sigma:g}" for sigma in sigmas], rows)


def _forgetting_table(result: dict) -> str:
    tasks = result["config"]["num_tasks"]
    rows = [[label(key)] + [pct(x) for x in s["base_task"]] + [pct(s["mean_seen"][-1])]
            for key, s in result["summary"].items()]
    return markdown_table(["optimizer"] + [f"task 0 acc after task {t}" for t in range(tasks)]
                          + [f"mean acc over all {tasks} tasks"], rows)


def _noise_types_table(result: dict) -> str:
    sgd = result["summary"]["sgd"]
    rows = [["SGD (no noise)", "–", "–", "–", pct(sgd["noisy_train"]), pct(sgd["test"])]]
    for kind in NOISE_TYPES:
        for r in result["summary"][kind]:
            rows.append([kind, f"{r['variability']:g}", f"{r['noise_std']:.3g}", f"{r['std_over_weight_rms']:.2f}",
                         pct(r["noisy_train"]), pct(r["test"])])
    return markdown_table(["noise type", "variability", "noise std", "std / initial weight RMS",
                           "fits noisy train labels", "clean test acc"], rows)


# ---------------------------------------------------------------------------------- plots
def plot(result: dict, path: Path) -> None:
    """Save the experiment's figure to `path` (PNG)."""
    figure = {"label-noise": _label_noise_plot, "perturbation": _perturbation_plot,
              "forgetting": _forgetting_plot, "noise-types": _noise_types_plot,
              "regularizers": _label_noise_plot}[result["experiment"]](result)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _band(ax, x, runs: list[list[float]], key: str) -> None:
    values = 100 * np.asarray(runs, dtype=float)
    mean, std = values.mean(0), values.std(0)
    ax.plot(x, mean, color=COLORS.get(key), label=label(key), marker="o" if len(x) == 1 else None)
    ax.fill_between(x, mean - std, mean + std, color=COLORS.get(key), alpha=0.2, linewidth=0)


def _label_noise_plot(result: dict):
    """Also the 'regularizers' figure: the same three learning curves, one band per method."""
    config = result["config"]
    figure, axes = plt.subplots(1, 3, figsize=(14, 4.2), sharey=True)
    titles = {"noisy_train": "accuracy on the NOISY training labels\n(high = memorized the noise)",
              "clean_train": "accuracy on the clean training labels",
              "test": "accuracy on the clean test set"}
    for ax, (metric, title) in zip(axes, titles.items()):
        for key, runs in result["runs"].items():
            curves = [run[metric] for run in runs]
            _band(ax, np.arange(1, len(curves[0]) + 1), curves, key)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0].axhline(100 * (1 - config["rate"]), color="gray", linestyle=":", label="labels that are correct")
    axes[0].set_ylabel("accuracy (%)")
    axes[0].legend(loc="lower right", fontsize=8)
    if result["experiment"] == "regularizers":
        settings = (f"small CNN, lr={config['lr']:g}, variability={config['variability']:g}, "
                    f"AMP ε={config['amp_epsilon']:g}, Disout p={config['disout_prob']:g}, "
                    f"NSR λ={config['nsr_lam']:g}")
    else:
        settings = f"lr={config['lr']:g}, variability={config['variability']:g}"
    figure.suptitle(f"digits, {config['rate']:.0%} {config['noise']} label noise, {settings}, "
                    f"mean ± std over {config['seeds']} seeds", fontsize=11)
    return figure


def _perturbation_plot(result: dict):
    config = result["config"]
    sigmas = config["sigmas"]
    figure, (ax, ax_gap) = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [2, 1]})
    for key, s in result["summary"].items():
        mean = [100 * p["mean"] for p in s["perturbed_test"]]
        std = [100 * p["std"] for p in s["perturbed_test"]]
        ax.errorbar(sigmas, mean, yerr=std, marker="o", capsize=3, color=COLORS.get(key), label=label(key))
    ax.set_xlabel("σ of Gaussian noise added to every weight")
    ax.set_ylabel("clean test accuracy (%)")
    ax.set_title("robustness to weight perturbation", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    keys = list(result["summary"])
    gaps = [100 * result["summary"][k]["gap"]["mean"] for k in keys]
    errs = [100 * result["summary"][k]["gap"]["std"] for k in keys]
    ax_gap.bar([label(k) for k in keys], gaps, yerr=errs, capsize=4, color=[COLORS.get(k) for k in keys])
    ax_gap.set_ylabel("train acc − test acc (points)")
    ax_gap.set_title("generalization gap", fontsize=10)
    ax_gap.grid(alpha=0.3, axis="y")
    figure.suptitle(f"digits, clean labels, {config['epochs']} epochs, lr={config['lr']:g}, "
                    f"variability={config['variability']:g}, mean ± std over {config['seeds']} seeds", fontsize=11)
    return figure


def _forgetting_plot(result: dict):
    config = result["config"]
    tasks = np.arange(config["num_tasks"])
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, metric, title in ((axes[0], "base_task", "accuracy on task 0 (original digits)"),
                              (axes[1], "mean_seen", "mean accuracy over the tasks seen so far")):
        for key, runs in result["runs"].items():
            style = "--" if key.endswith("+ewc") else "-"
            values = 100 * np.asarray([run[metric] for run in runs])
            ax.errorbar(tasks, values.mean(0), yerr=values.std(0), marker="o", capsize=3, linestyle=style,
                        color=COLORS.get(key), label=label(key))
        ax.set_xticks(tasks)
        ax.set_xlabel("after training on task")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("clean test accuracy (%)")
    axes[0].legend(fontsize=8)
    figure.suptitle(f"permuted digits, {config['num_tasks']} tasks × {config['epochs']} epochs, lr={config['lr']:g}, "
                    f"variability={config['variability']:g}, EWC λ={config['ewc']:g}, "
                    f"mean ± std over {config['seeds']} seeds", fontsize=11)
    return figure


def _noise_types_plot(result: dict):
    config = result["config"]
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    sgd = result["summary"]["sgd"]
    for ax, metric, title in ((axes[0], "test", "clean test accuracy"),
                              (axes[1], "noisy_train", "fit of the NOISY training labels")):
        for kind in NOISE_TYPES:
            rows = result["summary"][kind]
            ax.errorbar([r["std_over_weight_rms"] for r in rows], [100 * r[metric]["mean"] for r in rows],
                        yerr=[100 * r[metric]["std"] for r in rows], marker="o", capsize=3,
                        color=COLORS[kind], label=f"NVRM-SGD, {kind}")
        ax.axhline(100 * sgd[metric]["mean"], color=COLORS["sgd"], linestyle="--", label="SGD (no noise)")
        ax.set_xscale("log")
        ax.set_xlabel("noise std / RMS of the initial weights")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel("accuracy (%)")
    axes[0].legend(fontsize=8)
    figure.suptitle(f"digits, {config['rate']:.0%} {config['noise']} label noise, {config['epochs']} epochs, "
                    f"lr={config['lr']:g}, variability {config['scales']}, mean ± std over {config['seeds']} seeds",
                    fontsize=10)
    return figure


def output_files(experiment: str) -> list[str]:
    """The names save() writes for `experiment`: its JSON, then its PNG."""
    stem = experiment.replace("-", "_")
    return [f"{stem}.json", f"{stem}.png"]


def save(result: dict, out_dir: Path) -> tuple[Path, Path]:
    """Write `<experiment>.json` (every number) and `<experiment>.png` into out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, png_path = (out_dir / name for name in output_files(result["experiment"]))
    json_path.write_text(json.dumps(result, indent=1) + "\n")
    plot(result, png_path)
    return json_path, png_path
