"""Disout: feature-map distortion (Tang et al., "Beyond Dropout: Feature Map Distortion to
Regularize Deep Neural Networks", AAAI 2020). See docs/regularizers.md.

In training, square blocks of each (n, c) plane are *replaced* by small Gaussian values
``alpha * 0.01 * std(x) * eps`` and the whole map is rescaled by ``numel / kept``, where ``kept``
counts the elements no block covers (as the published code divides by the kept fraction).
``std(x)`` is the unbiased standard deviation of the whole input, detached, as published, so the
gradient is ``grad_out * scale`` on kept elements and zero on distorted ones.

Two implementations share these definitions: the torch path below (seed mask from
``torch.rand``, dilation equal to a ``max_pool2d`` of the anchors) and the fused Triton kernels of
``nvrm_ext.ops.disout_triton`` (mask recomputed from a counter-based RNG, never stored).
"""
from __future__ import annotations

import math
import numbers
import os

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..ops.disout_common import DISTORTION_STD_FACTOR, input_std

BACKENDS = ("auto", "torch", "triton")


# --- validation ----------------------------------------------------------------------------

def _check_dist_prob(dist_prob, name: str = "dist_prob") -> float:
    if isinstance(dist_prob, bool) or not isinstance(dist_prob, numbers.Real):
        raise ValueError(f"{name} must be a real number in [0, 1); got {dist_prob!r}")
    if not 0.0 <= float(dist_prob) < 1.0:
        raise ValueError(f"{name} must be in [0, 1); got {dist_prob!r}")
    return float(dist_prob)


def _check_block_size(block_size) -> int:
    if isinstance(block_size, bool) or not isinstance(block_size, numbers.Integral):
        raise ValueError(f"block_size must be an integer >= 1; got {block_size!r}")
    if block_size < 1:
        raise ValueError(f"block_size must be an integer >= 1; got {block_size!r}")
    return int(block_size)


def _check_alpha(alpha) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not math.isfinite(alpha):
        raise ValueError(f"alpha must be a finite real number >= 0; got {alpha!r}")
    if alpha < 0:
        raise ValueError(f"alpha must be >= 0; got {alpha!r}")
    return float(alpha)


def _check_backend(backend) -> str:
    if backend not in BACKENDS:
        choices = ", ".join(map(repr, BACKENDS))
        raise ValueError(f"backend must be one of {choices}; got {backend!r}")
    return backend


def _check_input(x, block_size: int) -> None:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"Disout expects a torch.Tensor; got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"Disout expects a 4-D (N, C, H, W) input; got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"Disout expects a floating-point input; got dtype {x.dtype}")
    height, width = x.shape[2], x.shape[3]
    if block_size > height or block_size > width:
        raise ValueError(f"block_size {block_size} does not fit the {height}x{width} feature map "
                         f"(needs block_size <= H and block_size <= W)")


# --- shared definitions ---------------------------------------------------------------------

def seed_rate(dist_prob: float, block_size: int, height: int, width: int) -> float:
    """Bernoulli rate gamma of block anchors so that about `dist_prob` of elements are covered.

    DropBlock's rule: dist_prob / block_size**2 * (H*W) / ((H-bs+1)(W-bs+1)); it ignores
    overlaps, so the covered fraction is slightly below dist_prob for large rates.
    """
    valid_anchors = (height - block_size + 1) * (width - block_size + 1)
    return dist_prob / block_size**2 * (height * width) / valid_anchors


def block_mask_from_anchors(anchors: torch.Tensor, block_size: int) -> torch.Tensor:
    """Dilate fired anchors (N, C, H-bs+1, W-bs+1) into the (N, C, H, W) distorted mask.

    An anchor is a block's top-left corner, so element (h, w) is covered by anchors
    (h-dy, w-dx) for 0 <= dy, dx < block_size. This equals max_pool2d over the anchor map padded
    by block_size - 1 (the tests check it), computed as a separable OR of shifted views: on CPU
    max_pool2d was 40-70x slower for a 32x64x32x32 map.
    """
    anchors = anchors.bool()
    n, c, anchor_rows, anchor_cols = anchors.shape
    rows = anchors.new_zeros(n, c, anchor_rows, anchor_cols + block_size - 1)
    for dx in range(block_size):
        rows[..., dx:dx + anchor_cols] |= anchors
    mask = anchors.new_zeros(n, c, anchor_rows + block_size - 1, rows.shape[-1])
    for dy in range(block_size):
        mask[..., dy:dy + anchor_rows, :] |= rows
    return mask


def sample_block_mask(shape, dist_prob: float, block_size: int, *,
                      generator: torch.Generator | None = None,
                      device: torch.device | str = "cpu") -> torch.Tensor:
    """Boolean (N, C, H, W) mask of distorted elements, drawn with torch.rand (torch path)."""
    n, c, height, width = shape
    gamma = seed_rate(dist_prob, block_size, height, width)
    anchor_shape = (n, c, height - block_size + 1, width - block_size + 1)
    anchors = torch.rand(anchor_shape, generator=generator, device=device) < gamma
    return block_mask_from_anchors(anchors, block_size)


def apply_distortion(x: torch.Tensor, distorted: torch.Tensor, noise: torch.Tensor,
                     alpha: float, std: torch.Tensor | float | None = None) -> torch.Tensor:
    """Replace `distorted` elements of x by alpha * 0.01 * std * noise, rescale by numel/kept.

    std defaults to std(x). Differentiable in x; std and the rescale factor are constants for
    autograd, as in the published code (which detaches the variance).
    """
    # Computed in at least float32 and rounded once to x's dtype (as the Triton path): a
    # half-precision variance overflows and a bfloat16 scale is off by up to 0.4%.
    compute_dtype = torch.promote_types(x.dtype, torch.float32)
    if std is None:
        std = input_std(x.detach().to(compute_dtype))
    kept = (~distorted).sum().clamp(min=1)
    scale = (x.numel() / kept.to(torch.float64)).to(compute_dtype)
    distortion = (alpha * DISTORTION_STD_FACTOR * std) * noise.to(compute_dtype)
    return (torch.where(distorted, distortion, x.to(compute_dtype)) * scale).to(x.dtype)


# --- entry points ---------------------------------------------------------------------------

def _use_triton(x: torch.Tensor, backend: str) -> bool:
    if backend == "torch":
        return False
    if backend == "triton":
        if not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError("backend='triton' on a non-CUDA tensor needs the Triton interpreter: "
                             "set TRITON_INTERPRET=1 before triton is imported")
        return True
    if not x.is_cuda:
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _draw_seed(generator: torch.Generator | None) -> int:
    """A Philox seed from torch's CPU RNG, so torch.manual_seed makes the Triton path repeatable."""
    return int(torch.randint(0, 2**62, (1,), generator=generator).item())


def disout(x: torch.Tensor, dist_prob: float, block_size: int = 6, alpha: float = 1.0, *,
           training: bool = True, backend: str = "auto",
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Functional Disout of a (N, C, H, W) tensor; identity when not training or dist_prob == 0.

    `generator` (a CPU generator on the Triton path; on the torch path one on x's device) makes
    the draw repeatable.
    """
    dist_prob = _check_dist_prob(dist_prob)
    block_size = _check_block_size(block_size)
    alpha = _check_alpha(alpha)
    backend = _check_backend(backend)
    _check_input(x, block_size)
    if not training or dist_prob == 0.0:
        return x
    height, width = x.shape[2], x.shape[3]
    if _use_triton(x, backend):
        from ..ops.disout_triton import disout_triton
        gamma = seed_rate(dist_prob, block_size, height, width)
        return disout_triton(x, gamma, block_size, alpha, _draw_seed(generator))
    distorted = sample_block_mask(x.shape, dist_prob, block_size, generator=generator,
                                  device=x.device)
    noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return apply_distortion(x, distorted, noise, alpha)


class Disout(nn.Module):
    """Feature-map distortion for (N, C, H, W) activations; identity in eval mode.

    dist_prob: fraction of elements to distort, in [0, 1). block_size: side of the square
    distorted blocks. alpha: distortion intensity (>= 0). backend: 'auto' (Triton on CUDA,
    torch otherwise), 'torch', or 'triton' (on CPU only under TRITON_INTERPRET=1).
    """

    def __init__(self, dist_prob: float, block_size: int = 6, alpha: float = 1.0, *,
                 backend: str = "auto", generator: torch.Generator | None = None):
        super().__init__()
        self._dist_prob = _check_dist_prob(dist_prob)
        self.block_size = _check_block_size(block_size)
        self.alpha = _check_alpha(alpha)
        self.backend = _check_backend(backend)
        self.generator = generator

    @property
    def dist_prob(self) -> float:
        return self._dist_prob

    @dist_prob.setter
    def dist_prob(self, value: float) -> None:
        # Validated on assignment so a scheduler cannot leave the module in a bad state.
        self._dist_prob = _check_dist_prob(value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return disout(x, self._dist_prob, self.block_size, self.alpha, training=self.training,
                      backend=self.backend, generator=self.generator)

    def extra_repr(self) -> str:
        return (f"dist_prob={self._dist_prob}, block_size={self.block_size}, alpha={self.alpha}, "
                f"backend={self.backend!r}")


class LinearScheduler(nn.Module):
    """Ramps `disout.dist_prob` linearly from start_value to stop_value over nr_steps steps.

    The k-th call of step() (k = 0, 1, ...) sets the k-th of nr_steps evenly spaced values, then
    holds stop_value; forward delegates to the wrapped Disout (as published).
    """

    def __init__(self, disout: Disout, start_value: float, stop_value: float, nr_steps: int):
        super().__init__()
        if not isinstance(disout, Disout):
            raise ValueError("LinearScheduler expects a Disout module; "
                             f"got {type(disout).__name__}")
        start_value = _check_dist_prob(start_value, "start_value")
        stop_value = _check_dist_prob(stop_value, "stop_value")
        if isinstance(nr_steps, bool) or not isinstance(nr_steps, numbers.Integral) or nr_steps < 1:
            raise ValueError(f"nr_steps must be an integer >= 1; got {nr_steps!r}")
        self.disout = disout
        self.values = np.linspace(start_value, stop_value, int(nr_steps)).tolist()
        self.steps_taken = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.disout(x)

    def step(self) -> None:
        index = min(self.steps_taken, len(self.values) - 1)
        self.disout.dist_prob = self.values[index]
        self.steps_taken += 1
