"""Data for the demo: scikit-learn's bundled digits (no download), label noise, permuted tasks.

Digits (1,797 8x8 images, 10 classes) is small enough that a 2-core CPU trains an MLP on it in
seconds per epoch, yet an MLP still overfits it, which is what the NVRM claims are about.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

NUM_CLASSES = 10
NUM_FEATURES = 64
NOISE_PATTERNS = ("pair", "symmetric")


@dataclass
class DigitsSplit:
    """A train/test split of digits as float32 features in [0, 1] and int64 labels."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor

    def to(self, device) -> "DigitsSplit":
        return DigitsSplit(*(t.to(device) for t in (self.x_train, self.y_train, self.x_test, self.y_test)))


def load_digits_split(seed: int, test_size: float = 0.3) -> DigitsSplit:
    """A stratified split of digits; pixel intensities 0..16 are scaled to [0, 1]."""
    features, labels = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(
        features / 16.0, labels, test_size=test_size, random_state=seed, stratify=labels)
    as_x = lambda a: torch.as_tensor(a, dtype=torch.float32)  # noqa: E731
    as_y = lambda a: torch.as_tensor(a, dtype=torch.int64)  # noqa: E731
    return DigitsSplit(as_x(x_train), as_y(y_train), as_x(x_test), as_y(y_test))


def corrupt_labels(labels: np.ndarray, rate: float, pattern: str, seed: int,
                   num_classes: int = NUM_CLASSES) -> np.ndarray:
    """A copy of `labels` with exactly round(rate * n) entries, chosen uniformly, made wrong.

    pattern 'pair' (asymmetric, pair-flip): class k becomes k + 1 mod num_classes, the classic
    structured noise a network can learn as a rule and so memorize; 'symmetric': a uniformly
    drawn *different* class. Exact count rather than per-sample coin flips, so the rate is what
    the table says.
    """
    if pattern not in NOISE_PATTERNS:
        raise ValueError(f"unknown noise pattern {pattern!r} (expected one of {NOISE_PATTERNS})")
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"noise rate must be in [0, 1], got {rate}")
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    noisy = labels.copy()
    flipped = rng.choice(labels.size, size=int(round(rate * labels.size)), replace=False)
    if pattern == "pair":
        noisy[flipped] = (labels[flipped] + 1) % num_classes
    else:
        offsets = rng.integers(1, num_classes, size=flipped.size)  # never 0: always a new class
        noisy[flipped] = (labels[flipped] + offsets) % num_classes
    return noisy


def permutation_tasks(num_tasks: int, num_features: int = NUM_FEATURES, seed: int = 0) -> list[torch.Tensor]:
    """Pixel permutations defining the permuted-digits tasks.

    Task 0 is the identity (the original digits, the "base task" whose forgetting we track);
    tasks 1.. are independent uniform random permutations.
    """
    generator = torch.Generator().manual_seed(seed)
    tasks = [torch.arange(num_features)]
    tasks += [torch.randperm(num_features, generator=generator) for _ in range(num_tasks - 1)]
    return tasks
