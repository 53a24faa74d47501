"""Model, optimizers and the training / evaluation loops shared by every experiment."""
from __future__ import annotations

import contextlib
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .. import FusedAMP, FusedVAdam, FusedVSGD
from .data import NUM_CLASSES, NUM_FEATURES

#: Optimizer arms. 'psgd' is FusedVSGD(denoise=False): the same noise added and never removed,
#: the paper's perturbed-gradient baseline that separates "noise in the weights" from NVRM.
#: 'amp-sgd' is FusedAMP (adversarial model perturbation) around torch SGD.
OPTIMIZERS = ("sgd", "nvrm-sgd", "psgd", "amp-sgd", "adam", "nvrm-adam")
LABELS = {"sgd": "SGD", "nvrm-sgd": "NVRM-SGD", "psgd": "PSGD", "amp-sgd": "AMP-SGD", "adam": "Adam",
          "nvrm-adam": "NVRM-Adam", "sgd+disout": "SGD + Disout", "sgd+nsr": "SGD + NSR"}

#: Side of the digits images; the CNN unflattens the 64 features back to (1, 8, 8).
IMAGE_SIDE = 8


@dataclass
class OptimizerConfig:
    """Hyperparameters of one arm; the NVRM arms use the same base hyperparameters plus noise."""

    name: str
    lr: float
    momentum: float = 0.9
    weight_decay: float = 5e-4
    variability: float = 0.1
    noise_type: str = "Gaussian"
    amp_epsilon: float = 0.5  # FusedAMP: radius of the per-tensor perturbation ball
    amp_inner_lr: float = 1.0  # FusedAMP: step size of the inner ascent
    relative: bool = False  # NVRM arms: variability x each tensor's weight std (docs/noise.md 5.1)


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


def build_cnn(hidden: int = 128, channels: tuple[int, int] = (32, 64), distortion: nn.Module | None = None,
              num_classes: int = NUM_CLASSES) -> nn.Sequential:
    """A small CNN for the flattened 8x8 digits (it takes the same (N, 64) tensors as the MLP).

    unflatten to (1, 8, 8) -> conv 3x3 -> ReLU -> conv 3x3 -> ReLU -> `distortion` (e.g. Disout;
    identity when None) -> 2x2 max-pool -> fully connected `hidden` -> ReLU ('penultimate', the
    layer NSR regularizes) -> linear to the classes. `distortion` has no parameters, so every
    variant of the same seed starts from the same weights.
    """
    first, second = channels
    pooled_side = IMAGE_SIDE // 2
    return nn.Sequential(OrderedDict([
        ("image", nn.Unflatten(1, (1, IMAGE_SIDE, IMAGE_SIDE))),
        ("conv1", nn.Conv2d(1, first, 3, padding=1)), ("relu1", nn.ReLU()),
        ("conv2", nn.Conv2d(first, second, 3, padding=1)), ("relu2", nn.ReLU()),
        ("distortion", distortion if distortion is not None else nn.Identity()),
        ("pool", nn.MaxPool2d(2)), ("flatten", nn.Flatten()),
        ("fc", nn.Linear(second * pooled_side * pooled_side, hidden)), ("penultimate", nn.ReLU()),
        ("classifier", nn.Linear(hidden, num_classes)),
    ]))


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
                         noise_type=config.noise_type, seed=seed, denoise=(name == "nvrm-sgd"),
                         relative=config.relative)
    if name == "amp-sgd":
        return FusedAMP(params, lr=config.lr, epsilon=config.amp_epsilon, inner_lr=config.amp_inner_lr,
                        base_optimizer=torch.optim.SGD, momentum=config.momentum,
                        weight_decay=config.weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    if name == "nvrm-adam":
        return FusedVAdam(params, lr=config.lr, variability=config.variability, num_iters=steps_per_epoch,
                          weight_decay=config.weight_decay, noise_type=config.noise_type, seed=seed,
                          relative=config.relative)
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

    `penalty(labels)` (a callable returning a scalar, e.g. EWC or NSR; it gets the mini-batch's
    labels) is added to every mini-batch loss. Optimizers that re-evaluate the loss themselves
    (FusedAMP) get the loss as a closure; the others step after one backward pass.
    """
    model.train()
    order = torch.randperm(x.shape[0], generator=generator).to(x.device)
    total = 0.0
    for batch in order.split(batch_size):
        def forward_backward(inputs=x[batch], labels=y[batch]):
            optimizer.zero_grad(set_to_none=True)
            outputs = model(inputs)
            loss = F.cross_entropy(outputs, labels)
            if penalty is not None:
                loss = loss + penalty(labels)
            loss.backward()
            return outputs, loss

        if isinstance(optimizer, FusedAMP):
            _, loss = optimizer.step(forward_backward)
        else:
            _, loss = forward_backward()
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
