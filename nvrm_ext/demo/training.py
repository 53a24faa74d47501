"""Model, optimizers and the training / evaluation loops shared by every experiment."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .. import FusedVAdam, FusedVSGD
from .data import NUM_CLASSES, NUM_FEATURES

#: Optimizer arms. 'psgd' is FusedVSGD(denoise=False): the same noise added and never removed,
#: the paper's perturbed-gradient baseline that separates "noise in the weights" from NVRM.
OPTIMIZERS = ("sgd", "nvrm-sgd", "psgd", "adam", "nvrm-adam")
LABELS = {"sgd": "SGD", "nvrm-sgd": "NVRM-SGD", "psgd": "PSGD", "adam": "Adam", "nvrm-adam": "NVRM-Adam"}


@dataclass
class OptimizerConfig:
    """Hyperparameters of one arm; the NVRM arms use the same base hyperparameters plus noise."""

    name: str
    lr: float
    momentum: float = 0.9
    weight_decay: float = 5e-4
    variability: float = 0.1
    noise_type: str = "Gaussian"


def build_mlp(hidden: int = 512, depth: int = 2, in_features: int = NUM_FEATURES,
              num_classes: int = NUM_CLASSES) -> nn.Sequential:
    """A ReLU MLP with `depth` hidden layers of width `hidden` (PyTorch default init)."""
    layers: list[nn.Module] = []
    width = in_features
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), nn.ReLU()]
        width = hidden
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


def make_optimizer(config: OptimizerConfig, params, steps_per_epoch: int, seed: int):
    """The torch or nvrm_ext optimizer of one arm.

    num_iters = steps_per_epoch, as in the paper, so the weights are clean after every epoch;
    the noise seed is the run's seed, so a run is reproducible.
    """
    name = config.name
    if name == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    if name in ("nvrm-sgd", "psgd"):
        return FusedVSGD(params, lr=config.lr, variability=config.variability, num_iters=steps_per_epoch,
                         momentum=config.momentum, weight_decay=config.weight_decay,
                         noise_type=config.noise_type, seed=seed, denoise=(name == "nvrm-sgd"))
    if name == "adam":
        return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    if name == "nvrm-adam":
        return FusedVAdam(params, lr=config.lr, variability=config.variability, num_iters=steps_per_epoch,
                          weight_decay=config.weight_decay, noise_type=config.noise_type, seed=seed)
    raise ValueError(f"unknown optimizer {name!r} (expected one of {OPTIMIZERS})")


def clean_weights(optimizer):
    """Context in which the model holds its clean weights: NVRM keeps perturbed weights
    between steps, so every evaluation must go through optimizer.denoised()."""
    denoised = getattr(optimizer, "denoised", None)
    return denoised() if denoised is not None else contextlib.nullcontext()


def steps_per_epoch(num_samples: int, batch_size: int) -> int:
    return -(-num_samples // batch_size)


def train_epoch(model: nn.Module, optimizer, x: torch.Tensor, y: torch.Tensor, batch_size: int,
                generator: torch.Generator, penalty=None) -> float:
    """One pass over (x, y) in shuffled mini-batches; returns the mean training loss.

    `penalty` (a callable returning a scalar, e.g. EWC) is added to every mini-batch loss.
    """
    model.train()
    order = torch.randperm(x.shape[0], generator=generator).to(x.device)
    total = 0.0
    for batch in order.split(batch_size):
        loss = F.cross_entropy(model(x[batch]), y[batch])
        if penalty is not None:
            loss = loss + penalty()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += loss.item() * batch.numel()
    return total / x.shape[0]


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Full-batch accuracy (the whole digits set fits in one forward pass)."""
    model.eval()
    return (model(x).argmax(dim=1) == y).float().mean().item()


@torch.no_grad()
def perturbed_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, sigma: float,
                       draws: int, generator: torch.Generator) -> float:
    """Mean accuracy over `draws` copies of the model with N(0, sigma^2) added to every weight
    and bias: how flat the minimum is around the clean weights."""
    if sigma == 0.0:
        return accuracy(model, x, y)
    clean = [p.detach().clone() for p in model.parameters()]
    scores = []
    try:
        for _ in range(draws):
            for p, w in zip(model.parameters(), clean):
                noise = torch.randn(p.shape, generator=generator, dtype=p.dtype).to(p.device)
                p.copy_(w + sigma * noise)
            scores.append(accuracy(model, x, y))
    finally:
        for p, w in zip(model.parameters(), clean):
            p.copy_(w)
    return sum(scores) / len(scores)
