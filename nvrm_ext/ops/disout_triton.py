"""Disout as fused Triton kernels whose block mask is never stored.

Every random number is a pure function of ``(seed, stream, counter)`` through Philox4x32-10
(``tl.philox``):

* stream 0, counter = global anchor index ``(plane * Ha + ay) * Wa + ax``: the uniform that
  decides whether the block anchored (top-left corner) at ``(ay, ax)`` of plane ``n * C + c`` is
  distorted (``u < gamma``). ``Ha = H - block_size + 1`` and ``Wa = W - block_size + 1`` are the
  valid anchors, so every block lies inside the map;
* stream 1, counter = element index in NCHW order: the N(0, 1) draw of the distortion.

An element is distorted iff one of the ``block_size**2`` anchors whose block covers it fired, so
each kernel recomputes those draws instead of reading a mask (dilation by recomputation). The
kept count the rescale needs is a separate counting launch; the backward recomputes the mask a
third time. Cost: ``block_size**2`` Philox calls per element per launch, no mask memory.

Under ``TRITON_INTERPRET=1`` (set before triton is imported) these run on CPU tensors.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..backends.triton_support import device_guard
from .disout_common import DISTORTION_STD_FACTOR, input_std

ELEMENTS_PER_PROGRAM = 1024
MASK_STREAM = tl.constexpr(0)  # third Philox counter word of the anchor draws
NOISE_STREAM = tl.constexpr(1)  # ... and of the per-element normal draws
# Sizes and seeds may equal 1; without this Triton would turn them into compile-time constants.
_RUNTIME_INTS = ("numel", "height", "width", "seed", "block_size")


@triton.jit
def _philox_words(seed, counter, stream: tl.constexpr):
    """Two Philox outputs for an int64 counter in the given stream (third counter word)."""
    lo = counter.to(tl.uint32)
    hi = (counter >> 32).to(tl.uint32)
    zero = lo * 0
    r0, r1, _, _ = tl.philox(seed, lo, hi, zero + stream, zero)
    return r0, r1


@triton.jit
def _distorted(seed, plane, row, col, gamma, block_size, anchor_rows, anchor_cols):
    """True where one of the anchors whose block covers (row, col) fired."""
    hit = row < 0  # all False, with the right shape
    for dy in range(0, block_size):
        anchor_row = row - dy
        row_valid = (anchor_row >= 0) & (anchor_row < anchor_rows)
        for dx in range(0, block_size):
            anchor_col = col - dx
            valid = row_valid & (anchor_col >= 0) & (anchor_col < anchor_cols)
            anchor = (plane * anchor_rows + anchor_row) * anchor_cols + anchor_col
            bits, _ = _philox_words(seed, anchor, MASK_STREAM)
            hit = hit | (valid & (tl.uint_to_uniform_float(bits) < gamma))
    return hit


@triton.jit
def _element_coordinates(numel, height, width, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_bounds = offsets < numel
    plane = offsets // (height * width)
    within = offsets % (height * width)
    return offsets, in_bounds, plane, within // width, within % width


@triton.jit
def _standard_normal(seed, offsets):
    bits0, bits1 = _philox_words(seed, offsets, NOISE_STREAM)
    normal, _ = tl.pair_uniform_to_normal(tl.uint_to_uniform_float(bits0),
                                          tl.uint_to_uniform_float(bits1))
    return normal


@triton.jit(do_not_specialize=_RUNTIME_INTS)
def _count_kept_kernel(kept_ptr, numel, height, width, seed, gamma, block_size,
                       BLOCK: tl.constexpr):
    offsets, in_bounds, plane, row, col = _element_coordinates(numel, height, width, BLOCK)
    hit = _distorted(seed, plane, row, col, gamma, block_size,
                     height - block_size + 1, width - block_size + 1)
    kept = tl.sum((in_bounds & (~hit)).to(tl.int64), axis=0)
    tl.atomic_add(kept_ptr, kept)


@triton.jit(do_not_specialize=_RUNTIME_INTS)
def _forward_kernel(x_ptr, out_ptr, std_ptr, scale_ptr, numel, height, width, seed, gamma,
                    block_size, distortion_coef, BLOCK: tl.constexpr):
    offsets, in_bounds, plane, row, col = _element_coordinates(numel, height, width, BLOCK)
    hit = _distorted(seed, plane, row, col, gamma, block_size,
                     height - block_size + 1, width - block_size + 1)
    x = tl.load(x_ptr + offsets, mask=in_bounds, other=0.0)
    std = tl.load(std_ptr)  # std and scale come in the compute dtype (>= float32)
    scale = tl.load(scale_ptr)
    distortion = distortion_coef * std * _standard_normal(seed, offsets).to(std.dtype)
    value = tl.where(hit, distortion, x.to(std.dtype))
    tl.store(out_ptr + offsets, (value * scale).to(x.dtype), mask=in_bounds)


@triton.jit(do_not_specialize=_RUNTIME_INTS)
def _backward_kernel(grad_out_ptr, grad_in_ptr, scale_ptr, numel, height, width, seed, gamma,
                     block_size, BLOCK: tl.constexpr):
    offsets, in_bounds, plane, row, col = _element_coordinates(numel, height, width, BLOCK)
    hit = _distorted(seed, plane, row, col, gamma, block_size,
                     height - block_size + 1, width - block_size + 1)
    grad = tl.load(grad_out_ptr + offsets, mask=in_bounds, other=0.0)
    scale = tl.load(scale_ptr)
    grad_in = tl.where(hit, 0.0, grad.to(scale.dtype) * scale)
    tl.store(grad_in_ptr + offsets, grad_in.to(grad.dtype), mask=in_bounds)


@triton.jit(do_not_specialize=_RUNTIME_INTS)
def _draws_kernel(distorted_ptr, noise_ptr, numel, height, width, seed, gamma, block_size,
                  BLOCK: tl.constexpr):
    offsets, in_bounds, plane, row, col = _element_coordinates(numel, height, width, BLOCK)
    hit = _distorted(seed, plane, row, col, gamma, block_size,
                     height - block_size + 1, width - block_size + 1)
    tl.store(distorted_ptr + offsets, hit.to(tl.int8), mask=in_bounds)
    tl.store(noise_ptr + offsets, _standard_normal(seed, offsets), mask=in_bounds)


def _grid(numel: int) -> tuple[int]:
    return (triton.cdiv(numel, ELEMENTS_PER_PROGRAM),)


def _int_seed(seed: int) -> int:
    if not 0 <= seed < 2**63:
        raise ValueError(f"seed must be in [0, 2**63); got {seed}")
    return int(seed)


def count_kept(shape: torch.Size, gamma: float, block_size: int, seed: int,
               device: torch.device) -> torch.Tensor:
    """Number of elements no block covers, as an int64 tensor of shape (1,) on `device`."""
    _, _, height, width = shape
    numel = int(torch.Size(shape).numel())
    kept = torch.zeros(1, dtype=torch.int64, device=device)
    if numel:
        with device_guard(kept.device):
            _count_kept_kernel[_grid(numel)](kept, numel, height, width, _int_seed(seed),
                                             float(gamma), block_size, BLOCK=ELEMENTS_PER_PROGRAM)
    return kept


def disout_draws(shape, gamma: float, block_size: int, seed: int,
                 device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """The (distorted mask, standard normal noise) the kernels use for `seed`, materialised.

    For tests and inspection: feeding these to the torch path's `apply_distortion` reproduces
    the Triton forward and backward.
    """
    shape = torch.Size(shape)
    numel = shape.numel()
    distorted = torch.empty(shape, dtype=torch.int8, device=device)
    noise = torch.empty(shape, dtype=torch.float32, device=device)
    if numel:
        with device_guard(noise.device):
            _draws_kernel[_grid(numel)](distorted, noise, numel, shape[2], shape[3],
                                        _int_seed(seed), float(gamma), block_size,
                                        BLOCK=ELEMENTS_PER_PROGRAM)
    return distorted.bool(), noise


class DisoutTritonFunction(torch.autograd.Function):
    """Disout forward/backward; the backward regenerates the mask from the seed.

    Only the rescale factor (one element) is saved. Arithmetic is done in float32 (float64 for
    float64 inputs) and rounded once to the input dtype, as in `apply_distortion`.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, gamma: float, block_size: int, alpha: float, seed: int):
        x = x.contiguous()
        numel = x.numel()
        _, _, height, width = x.shape
        compute_dtype = torch.promote_types(x.dtype, torch.float32)
        std = input_std(x.detach().to(compute_dtype)).reshape(1)
        kept = count_kept(x.shape, gamma, block_size, seed, x.device)
        scale = (numel / kept.clamp(min=1).to(torch.float64)).to(compute_dtype)
        out = torch.empty_like(x)
        if numel:
            with device_guard(x.device):
                _forward_kernel[_grid(numel)](x, out, std, scale, numel, height, width,
                                              _int_seed(seed), float(gamma), block_size,
                                              DISTORTION_STD_FACTOR * float(alpha),
                                              BLOCK=ELEMENTS_PER_PROGRAM)
        ctx.save_for_backward(scale)
        ctx.disout_args = (x.shape, gamma, block_size, seed)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (scale,) = ctx.saved_tensors
        shape, gamma, block_size, seed = ctx.disout_args
        grad_out = grad_out.contiguous()
        grad_in = torch.empty_like(grad_out)
        numel = grad_out.numel()
        if numel:
            with device_guard(grad_out.device):
                _backward_kernel[_grid(numel)](grad_out, grad_in, scale, numel, shape[2], shape[3],
                                               seed, float(gamma), block_size,
                                               BLOCK=ELEMENTS_PER_PROGRAM)
        return grad_in, None, None, None, None


def disout_triton(x: torch.Tensor, gamma: float, block_size: int, alpha: float,
                  seed: int) -> torch.Tensor:
    """Fused Disout of a 4-D tensor with anchor rate `gamma` (arguments already validated)."""
    return DisoutTritonFunction.apply(x, gamma, block_size, alpha, seed)
