"""The noise specification, executable (see docs/noise.md).

Noise is a pure function of (seed, parameter key, step, element index): nothing is stored.
This module is the readable reference every backend is tested against. It computes the
transforms (log, sqrt, sin, cos) in float64 from the exactly representable uniforms and
rounds once to float32, so it is the "mathematically exact" form of the specification; the
fused kernels use the float32 polynomials of docs/noise.md and agree with it to a few ulp.
"""
from __future__ import annotations

import math

import torch

NOISE_TYPES = ("Gaussian", "Laplace", "Uniform")
"""Noise type names in the order of their integer codes (0, 1, 2) used by the kernels."""

# Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11);
# the Random123 constants, shared with curand and Triton.
PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9
PHILOX_W1 = 0xBB67AE85
PHILOX_ROUNDS = 10

_MASK32 = 0xFFFFFFFF


def noise_type_code(noise_type: str) -> int:
    """The integer code of a noise type name ('Gaussian' -> 0, 'Laplace' -> 1, 'Uniform' -> 2)."""
    try:
        return NOISE_TYPES.index(noise_type)
    except ValueError:
        raise ValueError(
            f"Invalid noise_type {noise_type!r}: expected one of {', '.join(NOISE_TYPES)}"
        ) from None


def _mulhilo32(a: torch.Tensor, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit halves of the 64-bit product a*b, a in int64 holding uint32 values.

    One int64 multiplication: the product may exceed 2**63 and wrap to a negative int64, but
    wrapping keeps all 64 bits (two's complement), and the masks read both halves from them."""
    product = a * b
    return (product >> 32) & _MASK32, product & _MASK32


def philox4x32(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 on int64 tensors holding uint32 counter words; key (k0, k1) as ints or
    int64 tensors that broadcast with the counters.

    Returns the four uint32 output words as int64 tensors, in Random123 order.
    """
    c0, c1, c2, c3 = (torch.as_tensor(c, dtype=torch.int64) for c in (c0, c1, c2, c3))
    c0, c1, c2, c3 = torch.broadcast_tensors(c0, c1, c2, c3)
    for _ in range(PHILOX_ROUNDS):
        hi0, lo0 = _mulhilo32(c0, PHILOX_M0)
        hi1, lo1 = _mulhilo32(c2, PHILOX_M1)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = (k0 + PHILOX_W0) & _MASK32
        k1 = (k1 + PHILOX_W1) & _MASK32
    return c0, c1, c2, c3


def uniform_from_bits(x: torch.Tensor) -> torch.Tensor:
    """u = ((x >> 8) | 1) * 2**-24: the 24 high bits, forced odd, so u lies in the open
    interval (0, 1), is exact in float32 and is symmetric about 1/2 (never 0, 1/2 or 1)."""
    return ((x >> 8) | 1).to(torch.float64) * 2.0**-24


def raw_bits(seed: int, key: int, step: int, numel: int, *, offset: int = 0, device=None):
    """The Philox words for elements offset .. offset+numel-1, as four int64 tensors over quads.

    Element i belongs to quad j = i // 4 and takes lane i % 4. Counter: (lo32(j), hi32(j),
    key, step); Philox key: (lo32(seed), hi32(seed)).
    """
    return _segment_bits(seed, [(key, step, offset, numel)], device)[0]


def segment_quads(segments, device=None):
    """Per quad of several (key, step, offset, numel) segments laid end to end: its quad index
    j within its parameter, key and step (int64 tensors); and each segment's quad count."""
    counts = [(offset + numel + 3) // 4 - offset // 4 for _, _, offset, numel in segments]
    segment = torch.repeat_interleave(torch.arange(len(segments), device=device),
                                      torch.tensor(counts, device=device))
    starts = torch.tensor([0] + counts[:-1], device=device).cumsum(0)
    first_quads = torch.tensor([offset // 4 for _, _, offset, _ in segments], device=device)
    keys = torch.tensor([key & _MASK32 for key, _, _, _ in segments], device=device)
    steps = torch.tensor([step & _MASK32 for _, step, _, _ in segments], device=device)
    quads = torch.arange(sum(counts), device=device) - starts[segment] + first_quads[segment]
    return quads, keys[segment], steps[segment], counts


def _segment_bits(seed: int, segments, device):
    """One Philox pass over the quads of several (key, step, offset, numel) segments: the four
    words over all their quads, and each segment's quad count."""
    quads, keys, steps, counts = segment_quads(segments, device)
    words = philox4x32(quads & _MASK32, quads >> 32, keys, steps, seed & _MASK32, (seed >> 32) & _MASK32)
    return words, counts


def unit_lanes_of_words(code: int, words) -> list:
    """The transform of §4 on the four Philox words of each quad: the four lanes' z (float32,
    shaped like the words), each value computed in float64 and rounded once. Lanes rather than
    one [quads, 4] tensor, so that a compiled caller computes all four in one loop over quads."""
    u0, u1, u2, u3 = (uniform_from_bits(x) for x in words)
    if code == 0:
        r01 = torch.sqrt(-2.0 * torch.log(u0))
        r23 = torch.sqrt(-2.0 * torch.log(u2))
        t1, t3 = 2.0 * math.pi * u1, 2.0 * math.pi * u3
        lanes = [r01 * torch.cos(t1), r01 * torch.sin(t1), r23 * torch.cos(t3), r23 * torch.sin(t3)]
    elif code == 1:
        lanes = [_laplace(u) for u in (u0, u1, u2, u3)]
    else:
        lanes = [2.0 * u - 1.0 for u in (u0, u1, u2, u3)]
    return [lane.to(torch.float32) for lane in lanes]  # rounded once to float32


def _laplace(u: torch.Tensor) -> torch.Tensor:
    """ln(2u) if u < 1/2, else -ln(2(1 - u)): one logarithm per element (of 2 min(u, 1 - u),
    exact), not two under a torch.where that evaluates both."""
    log = torch.log(2.0 * torch.minimum(u, 1.0 - u))
    return torch.where(u < 0.5, log, -log)


def unit_noise_of_words(code: int, words) -> torch.Tensor:
    """unit_lanes_of_words as one float32 [quads, 4] tensor (element order)."""
    return torch.stack(unit_lanes_of_words(code, words), dim=1)


def unit_noise_of_quads(code: int, seed: int, quads, keys, steps) -> torch.Tensor:
    """Unit noise z of the given quads (int64 tensors: quad index, key, step), float32 [quads, 4].

    Computed in pieces of _CHUNK_QUADS quads: Philox and the transform are some hundred
    elementwise operations, and on pieces that small their temporaries stay in the cache
    instead of making a pass over memory each."""
    out = torch.empty(quads.numel(), 4, dtype=torch.float32, device=quads.device)
    k0, k1 = seed & _MASK32, (seed >> 32) & _MASK32
    for start in range(0, quads.numel(), _CHUNK_QUADS):
        piece = slice(start, start + _CHUNK_QUADS)
        words = philox4x32(quads[piece] & _MASK32, quads[piece] >> 32, keys[piece], steps[piece], k0, k1)
        out[piece] = unit_noise_of_words(code, words)
    return out


_CHUNK_QUADS = 1 << 14


def standard_noise_segments(noise_type: str, seed: int, segments, *, device=None) -> list:
    """Unit-scale noise for several (key, step, offset, numel) segments at once -- one Philox
    pass and one transform over all of them (what makes the torch backend usable with many
    small tensors). Returns each segment's flat float32 noise; see `standard_noise`."""
    code = noise_type_code(noise_type)
    quads, keys, steps, counts = segment_quads(segments, device)
    z = unit_noise_of_quads(code, seed, quads, keys, steps).reshape(-1)
    return split_segments(z, segments, counts)


def split_segments(z: torch.Tensor, segments, counts) -> list:
    """Each segment's elements of the flat noise of their quads laid end to end."""
    pieces = z[:4 * sum(counts)].split([4 * count for count in counts])  # views, one call
    return [piece if offset % 4 == 0 and piece.numel() == numel else piece[offset % 4:offset % 4 + numel]
            for piece, (_, _, offset, numel) in zip(pieces, segments)]


def standard_noise(noise_type: str, seed: int, key: int, step: int, numel: int, *,
                   offset: int = 0, device=None) -> torch.Tensor:
    """Unit-scale noise z for elements offset .. offset+numel-1, float32, flat.

    Gaussian: Box-Muller on lane pairs (0, 1) and (2, 3):
        z0 = sqrt(-2 ln u0) cos(2 pi u1),  z1 = sqrt(-2 ln u0) sin(2 pi u1)
    Laplace (unit scale): z = ln(2u) if u < 1/2 else -ln(2(1 - u))
    Uniform on [-1, 1]:   z = 2u - 1
    """
    return standard_noise_segments(noise_type, seed, [(key, step, offset, numel)], device=device)[0]


def noise(noise_type: str, scale: float, seed: int, key: int, step: int, numel: int, *,
          offset: int = 0, device=None) -> torch.Tensor:
    """The noise added to elements offset .. offset+numel-1 of parameter `key` at `step`:
    float32(scale) * z, one float32 multiplication. Step 0 means "no noise" (zeros)."""
    if step == 0:
        return torch.zeros(numel, dtype=torch.float32, device=device)
    z = standard_noise(noise_type, seed, key, step, numel, offset=offset, device=device)
    return z * torch.tensor(scale, dtype=torch.float32, device=device)


def memory_order_permutation(t: torch.Tensor) -> list[int]:
    """Dimensions of a dense tensor sorted from the outermost to the innermost in memory."""
    return sorted(range(t.dim()), key=lambda d: (-t.stride(d), -t.size(d)))


def from_memory_order(flat: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Lay out `flat` (numbered in `like`'s memory order) with `like`'s shape."""
    if like.is_contiguous():
        return flat.view(like.shape)
    perm = memory_order_permutation(like)
    permuted = flat.view([like.size(d) for d in perm])
    inverse = [perm.index(d) for d in range(like.dim())]
    return permuted.permute(inverse)
