"""The four experiments behind the paper's claims, at digits scale.

Every experiment returns a JSON-ready dict: its `config`, the raw per-seed numbers under
`runs`, and mean/std `summary` rows that the table and the plot are drawn from. Within a seed
all arms share the data split, the label noise, the initial weights and the batch order, so
they differ only in the optimizer.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

from ..nn import Disout, NeuronSteadiness
from .runner import Run, Runner
from .data import NUM_CLASSES, DigitsSplit, corrupt_labels, load_digits_split, permutation_tasks
from .training import (OptimizerConfig, accuracy, build_cnn, build_mlp, clean_weights, make_optimizer,
                       perturbed_accuracy, steps_per_epoch, train_epoch)

NOISE_TYPES = ("Gaussian", "Laplace", "Uniform")
#: Standard deviation of one unit of `variability` for each noise type (Laplace scale b has
#: std sqrt(2) b, Uniform half-width a has std a / sqrt(3)), to compare types at equal std.
NOISE_STD_PER_VARIABILITY = {"Gaussian": 1.0, "Laplace": math.sqrt(2.0), "Uniform": 1.0 / math.sqrt(3.0)}


@dataclass
class Common:
    """Settings every experiment shares (the CLI's common options)."""

    seeds: int = 3
    epochs: int = 30
    lr: float = 0.01
    variability: float = 0.1
    hidden: int = 512
    batch_size: int = 64
    momentum: float = 0.9
    weight_decay: float = 5e-4
    device: str = "cpu"
    progress: object = field(default=None, repr=False)  # a tqdm bar, advanced once per epoch (tuning)
    runner: Runner | None = field(default=None, repr=False)  # runs an experiment's runs (default: here)

    def config(self, **extra) -> dict:
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("progress", "runner")}
        out.update(extra)
        return out

    def run_all(self, runs: list[Run]) -> list:
        """The results of `runs`, in order, each run given a copy of these settings that a worker
        process can receive (no progress bar, no runner)."""
        portable = replace(self, progress=None, runner=None)
        for run in runs:
            run.arguments["common"] = portable
        return (self.runner or Runner("runs")).map(runs)

    def tick(self, description: str) -> None:
        if self.progress is not None:
            self.progress.set_postfix_str(description, refresh=False)
            self.progress.update(1)


def mean_std(values) -> dict:
    values = np.asarray(values, dtype=float)
    return {"mean": float(values.mean()), "std": float(values.std(ddof=0)), "n": int(values.size)}


def _seeded_model(common: Common, seed: int):
    torch.manual_seed(seed)
    return build_mlp(common.hidden).to(common.device)


# ---------------------------------------------------------------------------------- label noise
def train_on_noisy_labels(common: Common, arm: OptimizerConfig, data: DigitsSplit, noisy_labels: torch.Tensor,
                          seed: int, model: torch.nn.Module | None = None, penalty=None,
                          description: str | None = None) -> dict:
    """Train one arm on the noisy labels; per-epoch accuracy on the noisy and the clean training
    labels and on the clean test set, always measured at the clean weights.

    `model` defaults to the seed's MLP; `penalty(labels)` is added to every mini-batch loss;
    `description` names the run on the progress bar (default: the optimizer's name).
    """
    model = model if model is not None else _seeded_model(common, seed)
    optimizer = make_optimizer(arm, model.parameters(), steps_per_epoch(len(noisy_labels), common.batch_size), seed)
    batches = torch.Generator().manual_seed(seed)
    curves = {"noisy_train": [], "clean_train": [], "test": []}
    for _ in range(common.epochs):
        train_epoch(model, optimizer, data.x_train, noisy_labels, common.batch_size, batches, penalty=penalty)
        with clean_weights(optimizer):
            curves["noisy_train"].append(accuracy(model, data.x_train, noisy_labels))
            curves["clean_train"].append(accuracy(model, data.x_train, data.y_train))
            curves["test"].append(accuracy(model, data.x_test, data.y_test))
        common.tick(f"{description or arm.name} seed {seed}")
    return curves


def final_accuracies(runs: dict) -> dict:
    """Mean/std over seeds of the last epoch's accuracies, per arm."""
    return {name: {metric: mean_std([run[metric][-1] for run in seed_runs])
                   for metric in ("noisy_train", "clean_train", "test")}
            for name, seed_runs in runs.items()}


def noisy_digits(seed: int, noise: str, rate: float, device: str) -> tuple[DigitsSplit, torch.Tensor]:
    """The seed's digits split and its corrupted training labels (test labels stay clean)."""
    data = load_digits_split(seed).to(device)
    noisy = corrupt_labels(data.y_train.cpu().numpy(), rate, noise, seed)
    return data, torch.as_tensor(noisy, device=device)


def label_noise_run(common: Common, name: str, seed: int, noise: str, rate: float) -> dict:
    """One arm of one seed of `label_noise`."""
    data, noisy = noisy_digits(seed, noise, rate, common.device)
    arm = OptimizerConfig(name, common.lr, common.momentum, common.weight_decay, common.variability)
    return train_on_noisy_labels(common, arm, data, noisy, seed)


def by_arm(keys, seeds: int, results: list) -> dict:
    """{key: [result of seed 0, seed 1, ...]} from results listed seed by seed, key by key."""
    keys = list(keys)
    return {key: results[position::len(keys)][:seeds] for position, key in enumerate(keys)}


def label_noise(common: Common, noise: str = "pair", rate: float = 0.4,
                arms=("sgd", "nvrm-sgd", "psgd")) -> dict:
    """Claim 3: SGD memorizes noisy labels, NVRM does not (PSGD: noise without denoising)."""
    results = common.run_all([Run(f"{name} seed {seed}", label_noise_run,
                                  dict(name=name, seed=seed, noise=noise, rate=rate))
                              for seed in range(common.seeds) for name in arms])
    runs = by_arm(arms, common.seeds, results)
    return {"experiment": "label-noise", "config": common.config(noise=noise, rate=rate, arms=list(arms)),
            "runs": runs, "summary": final_accuracies(runs)}


# ---------------------------------------------------------------------------------- regularizers
#: The methods the `regularizers` experiment compares, all on the same CNN (build_cnn):
#: plain SGD, FusedVSGD (NVRM), FusedAMP around SGD, SGD with Disout after the last conv layer,
#: and SGD with NSR on the penultimate (fully connected) layer.
REGULARIZER_METHODS = ("sgd", "nvrm-sgd", "amp-sgd", "sgd+disout", "sgd+nsr")


@dataclass(frozen=True)
class RegularizerSettings:
    """Each method's own hyperparameters (the shared ones -- lr, momentum, weight decay, batch size,
    and FusedVSGD's variability -- come from Common). amp_epsilon, disout_prob and nsr_lam are the
    tuned defaults (tune.tune_regularizers at lr 0.1); the rest are fixed: AMP's published
    inner_lr, a 3x3 Disout block (the published 6 would cover most of an 8x8 map) with the published
    alpha 5, and NSR on the batch alone."""

    amp_epsilon: float = 0.5
    amp_inner_lr: float = 1.0
    disout_prob: float = 0.1
    disout_block_size: int = 3
    disout_alpha: float = 5.0
    nsr_lam: float = 0.001
    nsr_queue_length: int = 0


def train_regularized_cnn(common: Common, method: str, settings: RegularizerSettings, data: DigitsSplit,
                          noisy_labels: torch.Tensor, seed: int) -> dict:
    """One method of the regularizers comparison on the seed's CNN (same initial weights and batch
    order for every method of a seed); returns train_on_noisy_labels' curves."""
    if method not in REGULARIZER_METHODS:
        raise ValueError(f"unknown method {method!r} (expected one of {REGULARIZER_METHODS})")
    optimizer_name = method.partition("+")[0]
    arm = OptimizerConfig(optimizer_name, common.lr, common.momentum, common.weight_decay, common.variability,
                          amp_epsilon=settings.amp_epsilon, amp_inner_lr=settings.amp_inner_lr)
    distortion = (Disout(settings.disout_prob, settings.disout_block_size, settings.disout_alpha)
                  if method == "sgd+disout" else None)
    torch.manual_seed(seed)  # the initial weights, and Disout's masks, which draw from the global generator
    model = build_cnn(common.hidden, distortion=distortion).to(common.device)
    if method != "sgd+nsr":
        return train_on_noisy_labels(common, arm, data, noisy_labels, seed, model=model, description=method)
    with NeuronSteadiness([model.penultimate], settings.nsr_lam, NUM_CLASSES, settings.nsr_queue_length) as nsr:
        return train_on_noisy_labels(common, arm, data, noisy_labels, seed, model=model, penalty=nsr.penalty,
                                     description=method)


def regularizers_run(common: Common, method: str, settings: RegularizerSettings, seed: int, noise: str,
                     rate: float) -> dict:
    """One method of one seed of `regularizers`."""
    data, noisy = noisy_digits(seed, noise, rate, common.device)
    return train_regularized_cnn(common, method, settings, data, noisy, seed)


def regularizers(common: Common, settings: RegularizerSettings = RegularizerSettings(), noise: str = "pair",
                 rate: float = 0.4, methods=REGULARIZER_METHODS, hyperparameter_source: str = "") -> dict:
    """SGD vs FusedVSGD vs FusedAMP vs Disout vs NSR on the label-noise task, one CNN for all."""
    results = common.run_all([Run(f"{method} seed {seed}", regularizers_run,
                                  dict(method=method, settings=settings, seed=seed, noise=noise, rate=rate))
                              for seed in range(common.seeds) for method in methods])
    runs = by_arm(methods, common.seeds, results)
    config = common.config(noise=noise, rate=rate, methods=list(methods), model="cnn", **asdict(settings),
                           hyperparameter_source=hyperparameter_source)
    return {"experiment": "regularizers", "config": config, "runs": runs, "summary": final_accuracies(runs)}


# ---------------------------------------------------------------------------------- perturbation
def perturbation_run(common: Common, name: str, seed: int, sigmas: tuple, draws: int) -> dict:
    """One arm of one seed of `perturbation`: train on clean labels, then measure at the clean weights."""
    data = load_digits_split(seed).to(common.device)
    arm = OptimizerConfig(name, common.lr, common.momentum, common.weight_decay, common.variability)
    model = _seeded_model(common, seed)
    optimizer = make_optimizer(arm, model.parameters(), steps_per_epoch(len(data.y_train), common.batch_size), seed)
    batches = torch.Generator().manual_seed(seed)
    for _ in range(common.epochs):
        train_epoch(model, optimizer, data.x_train, data.y_train, common.batch_size, batches)
        common.tick(f"{name} seed {seed}")
    perturbations = torch.Generator().manual_seed(10_000 + seed)  # same draws for every arm
    with clean_weights(optimizer):
        train_acc = accuracy(model, data.x_train, data.y_train)
        test_acc = accuracy(model, data.x_test, data.y_test)
        curve = [perturbed_accuracy(model, data.x_test, data.y_test, s, draws, perturbations) for s in sigmas]
    return {"train": train_acc, "test": test_acc, "gap": train_acc - test_acc, "perturbed_test": curve}


def perturbation(common: Common, sigmas=(0.0, 0.01, 0.02, 0.05, 0.1, 0.15, 0.2), draws: int = 5,
                 arms=("sgd", "nvrm-sgd")) -> dict:
    """Claims 1 and 2 on clean labels: test accuracy when N(0, sigma^2) is added to every clean
    weight, and the generalization gap (train minus test accuracy) at the end of training."""
    results = common.run_all([Run(f"{name} seed {seed}", perturbation_run,
                                  dict(name=name, seed=seed, sigmas=tuple(sigmas), draws=draws))
                              for seed in range(common.seeds) for name in arms])
    runs = by_arm(arms, common.seeds, results)
    summary = {name: {"train": mean_std([r["train"] for r in rs]), "test": mean_std([r["test"] for r in rs]),
                      "gap": mean_std([r["gap"] for r in rs]),
                      "perturbed_test": [mean_std([r["perturbed_test"][i] for r in rs]) for i in range(len(sigmas))]}
               for name, rs in runs.items()}
    return {"experiment": "perturbation", "config": common.config(sigmas=list(sigmas), draws=draws, arms=list(arms)),
            "runs": runs, "summary": summary}


# ---------------------------------------------------------------------------------- forgetting
class EWC:
    """Elastic weight consolidation (Kirkpatrick et al. 2017): after each task, anchor the
    weights with a quadratic penalty weighted by the diagonal empirical Fisher information."""

    def __init__(self, model: torch.nn.Module, strength: float):
        self.model = model
        self.strength = strength
        self.anchors: list[tuple[dict, dict]] = []

    def consolidate(self, x: torch.Tensor, y: torch.Tensor, samples: int = 256, chunk: int = 128) -> None:
        """Record the (clean) current weights and their Fisher, estimated from per-sample
        gradients on the first `samples` (already shuffled) training examples of the task."""
        x, y = x[:samples], y[:samples]
        params = {k: v.detach().clone() for k, v in self.model.named_parameters()}

        def sample_loss(p, xi, yi):
            return F.cross_entropy(functional_call(self.model, p, (xi[None],)), yi[None])

        per_sample_grad = vmap(grad(sample_loss), in_dims=(None, 0, 0))
        fisher = {k: torch.zeros_like(v) for k, v in params.items()}
        for xs, ys in zip(x.split(chunk), y.split(chunk)):
            for k, g in per_sample_grad(params, xs, ys).items():
                fisher[k] += g.pow(2).sum(0)
        self.anchors.append((params, {k: f / len(y) for k, f in fisher.items()}))

    def penalty(self, labels: torch.Tensor | None = None) -> torch.Tensor:
        """The EWC term (`labels`, the mini-batch's, are not needed)."""
        total = torch.zeros((), device=next(self.model.parameters()).device)
        for params, fisher in self.anchors:
            for k, p in self.model.named_parameters():
                total = total + (fisher[k] * (p - params[k]).pow(2)).sum()
        return 0.5 * self.strength * total


def forgetting_run(common: Common, name: str, ewc: float, data: DigitsSplit | None, num_tasks: int,
                   seed: int) -> dict:
    """One arm learning the permuted tasks in sequence with one optimizer; after each task, the
    clean-weight test accuracy on every task. `data` defaults to the seed's digits split."""
    data = data if data is not None else load_digits_split(seed).to(common.device)
    permutations = [p.to(common.device) for p in permutation_tasks(num_tasks, seed=seed)]
    arm = OptimizerConfig(name, common.lr, 0.0, common.weight_decay, common.variability)
    model = _seeded_model(common, seed)
    optimizer = make_optimizer(arm, model.parameters(), steps_per_epoch(len(data.y_train), common.batch_size), seed)
    regularizer = EWC(model, ewc) if ewc > 0 else None
    batches = torch.Generator().manual_seed(seed)
    matrix = []  # matrix[t][j]: accuracy on task j after training on task t
    for task, permutation in enumerate(permutations):
        x_task = data.x_train[:, permutation]
        for _ in range(common.epochs):
            train_epoch(model, optimizer, x_task, data.y_train, common.batch_size, batches,
                        penalty=regularizer.penalty if regularizer else None)
            common.tick(f"{_variant_key(name, ewc)} seed {seed} task {task}")
        with clean_weights(optimizer):
            matrix.append([accuracy(model, data.x_test[:, p], data.y_test) for p in permutations])
            if regularizer:
                regularizer.consolidate(x_task, data.y_train)
    return {"accuracy_matrix": matrix,
            "base_task": [row[0] for row in matrix],
            "mean_seen": [float(np.mean(row[:t + 1])) for t, row in enumerate(matrix)]}


def forgetting(common: Common, num_tasks: int = 5, ewc: float = 0.0, arms=("adam", "nvrm-adam")) -> dict:
    """Claim 4: permuted digits learned in sequence; accuracy on every task after each task.
    `common.epochs` is epochs *per task*. With ewc > 0 each arm also runs with EWC."""
    variants = [(name, 0.0) for name in arms] + ([(name, ewc) for name in arms] if ewc > 0 else [])
    results = common.run_all([Run(f"{_variant_key(name, strength)} seed {seed}", forgetting_run,
                                  dict(name=name, ewc=strength, data=None, num_tasks=num_tasks, seed=seed))
                              for seed in range(common.seeds) for name, strength in variants])
    runs = by_arm([_variant_key(name, strength) for name, strength in variants], common.seeds, results)
    summary = {key: {metric: [mean_std([r[metric][t] for r in rs]) for t in range(num_tasks)]
                     for metric in ("base_task", "mean_seen")}
               for key, rs in runs.items()}
    return {"experiment": "forgetting",
            "config": common.config(num_tasks=num_tasks, ewc=ewc, arms=list(arms), epochs_per_task=common.epochs,
                                    task_0="identity permutation (original digits)"),
            "runs": runs, "summary": summary}


def _variant_key(name: str, ewc: float) -> str:
    return f"{name}+ewc" if ewc > 0 else name


# ---------------------------------------------------------------------------------- noise types
def weight_rms(model: torch.nn.Module) -> float:
    """Root-mean-square of all weights and biases: the yardstick the noise scale is relative to."""
    squares = torch.cat([p.detach().flatten().pow(2) for p in model.parameters()])
    return squares.mean().sqrt().item()


def noise_types_run(common: Common, name: str, noise_type: str, scale: float, seed: int, noise: str,
                    rate: float) -> dict:
    """One arm of one seed of `noise_types` (plain SGD where name is 'sgd')."""
    data, noisy = noisy_digits(seed, noise, rate, common.device)
    arm = OptimizerConfig(name, common.lr, common.momentum, common.weight_decay, scale, noise_type)
    return train_on_noisy_labels(common, arm, data, noisy, seed)


def noise_types(common: Common, scales=(0.01, 0.03, 0.1, 0.2), noise: str = "pair", rate: float = 0.4) -> dict:
    """Gaussian vs Laplace vs Uniform NVRM-SGD across variability scales, on the label-noise
    task, with plain SGD as the scale-free reference."""
    arms = [("sgd", "Gaussian", 0.0)] + [("nvrm-sgd", kind, scale) for kind in NOISE_TYPES for scale in scales]
    results = common.run_all([Run(f"{name if name == 'sgd' else f'{kind} {scale:g}'} seed {seed}", noise_types_run,
                                  dict(name=name, noise_type=kind, scale=scale, seed=seed, noise=noise, rate=rate))
                              for seed in range(common.seeds) for name, kind, scale in arms])
    per_arm = by_arm(range(len(arms)), common.seeds, results)
    runs: dict = {"sgd": per_arm[0]}
    runs.update({kind: {str(s): [] for s in scales} for kind in NOISE_TYPES})
    for position, (name, kind, scale) in enumerate(arms[1:], start=1):
        runs[kind][str(scale)] = per_arm[position]
    initial_rms = [weight_rms(_seeded_model(common, seed)) for seed in range(common.seeds)]
    rms = float(np.mean(initial_rms))
    final = lambda seed_runs, metric: mean_std([r[metric][-1] for r in seed_runs])  # noqa: E731
    summary = {"sgd": {m: final(runs["sgd"], m) for m in ("noisy_train", "test")}}
    for kind in NOISE_TYPES:
        summary[kind] = [{"variability": s, "noise_std": s * NOISE_STD_PER_VARIABILITY[kind],
                          "std_over_weight_rms": s * NOISE_STD_PER_VARIABILITY[kind] / rms,
                          "noisy_train": final(runs[kind][str(s)], "noisy_train"),
                          "test": final(runs[kind][str(s)], "test")} for s in scales]
    return {"experiment": "noise-types",
            "config": common.config(scales=list(scales), noise=noise, rate=rate, initial_weight_rms=rms),
            "runs": runs, "summary": summary}
