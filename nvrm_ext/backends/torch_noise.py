"""The noise swap of the 'torch' backend: n_new - n_old for many tensors in a few operations.

The torch backend is what every device without a fused kernel runs (MPS, XPU, float64
parameters), so its noise must not cost more than the original algorithm's torch.normal.
Drawing it with nvrm_ext.noise's readable code costs some hundred elementwise operations per
element (Philox's ten rounds in int64, the float64 transforms), each a pass over the tensors.
Here the same code runs as one program per (old type, new type) through torch.compile, which
fuses it into one loop (C++ on the CPU, Triton on CUDA, Metal on MPS): Philox, the float64
transforms rounded once to float32, the scales and the difference, over all the tensors of a
batch at once. The operations are those of nvrm_ext.noise, so the result is its result
(tests/test_torch_noise.py compares them element by element).

Where torch.compile is unavailable or fails (no C++ compiler, an unsupported device), or for
batches too small to repay a call into a compiled program, the same function runs eagerly,
in cache-sized pieces (nvrm_ext.noise.unit_noise_of_quads); a failure says so once.
"""
from __future__ import annotations

import os
import warnings

import numpy as np
import torch

from .. import noise as spec

COMPILE_MIN_ELEMENTS = 1 << 16
"""Batches smaller than this run eagerly: compiling costs seconds once per (old type, new type)
and device, which only a long run over large batches repays."""

_COMPILE_ENV = "NVRM_TORCH_COMPILE"  # "0": never compile (eager pieces only)

_programs: dict = {}  # (device type, old code, new code) -> compiled function, or None once it failed


def scaled_unit_lanes(code: int, quads, keys, steps, scales, k0, k1) -> list:
    """float32(scale) * z of the given quads, as four lanes (scale and counters per quad)."""
    words = spec.philox4x32(quads & spec._MASK32, quads >> 32, keys, steps, k0, k1)
    return [lane * scales for lane in spec.unit_lanes_of_words(code, words)]


def noise_difference_lanes(old_code: int | None, new_code: int | None, wide: bool, segment, quad_starts,
                           first_quads, keys, old_steps, new_steps, old_scales, new_scales, k0, k1) -> tuple:
    """n_new - n_old over the quads of segments laid end to end, as four lanes (lane l holds
    element 4j + l of quad j), float32, or float64 when `wide` (float64 parameters: both float32
    noises widened exactly, docs/noise.md §7) (segment: each quad's segment, which indexes the
    per-segment tables). Four lanes and not one [quads, 4] tensor: compiled, the lanes are one
    loop over quads that draws Philox and the transforms once per quad; a stack inside the
    program would make the compiler evaluate the transform of every lane for every element.
    A missing side (code None) is left out, not subtracted as zero (-n_old, not 0 - n_old: the
    sign of a zero is kept as the per-tensor code keeps it). Every argument but the codes is a
    tensor, so one compiled program serves every step, seed and batch."""
    positions = torch.arange(segment.shape[0], device=segment.device)
    quads = positions - quad_starts[segment] + first_quads[segment]
    keys = keys[segment]
    new = old = None
    if new_code is not None:
        new = scaled_unit_lanes(new_code, quads, keys, new_steps[segment], new_scales[segment], k0, k1)
    if old_code is not None:
        old = scaled_unit_lanes(old_code, quads, keys, old_steps[segment], old_scales[segment], k0, k1)
    if wide:
        new, old = (None if side is None else [lane.to(torch.float64) for lane in side] for side in (new, old))
    if new is None:
        return tuple(-lane for lane in old)
    if old is None:
        return tuple(new)
    return tuple(n - o for n, o in zip(new, old))


def _program(device: torch.device, old_code, new_code, wide: bool):
    """The compiled noise_difference_lanes of this (device type, old type, new type, width), or None."""
    if os.environ.get(_COMPILE_ENV, "") == "0":
        return None
    slot = (device.type, old_code, new_code, wide)
    if slot not in _programs:
        def program(*tensors):
            return noise_difference_lanes(old_code, new_code, wide, *tensors)
        # a code object of its own: torch.compile caches per code object, and the closures of
        # the (old, new) pairs sharing one would count as recompilations of one function
        program.__code__ = program.__code__.replace(co_name=f"noise_difference_{old_code}_{new_code}_{int(wide)}")
        try:
            _programs[slot] = torch.compile(program, dynamic=True, fullgraph=True)
        except Exception as error:  # torch.compile missing or refusing this platform
            _fail(slot, error)
    return _programs[slot]


def _fail(slot, error: Exception) -> None:
    _programs[slot] = None
    warnings.warn(f"nvrm_ext: torch.compile of the 'torch' backend's noise failed on {slot[0]} "
                  f"({type(error).__name__}: {error}); using the slower eager noise there",
                  RuntimeWarning, stacklevel=3)


def noise_differences(seed: int, members, device: torch.device, compile_min: int | None = None, *,
                      wide: bool = False) -> list:
    """n_new - n_old, flat float32 (float64 when `wide`), for members (key, offset, numel, (old_step, old_type,
    old_scale), (new_step, new_type, new_scale)) that all have the same old and new type (a
    step of 0 means no noise on that side: its type is then ignored). At least one side present."""
    limit = COMPILE_MIN_ELEMENTS if compile_min is None else compile_min
    old_code = _code(members[0][3])
    new_code = _code(members[0][4])
    segments = [(key, 0, offset, numel) for key, offset, numel, _, _ in members]
    counts = [(offset + numel + 3) // 4 - offset // 4 for _, offset, numel, _, _ in members]
    total = sum(counts)
    k0, k1 = seed & spec._MASK32, (seed >> 32) & spec._MASK32
    program = _program(device, old_code, new_code, wide) if 4 * total >= limit else None
    if program is not None:
        keys, offsets, _, olds, news = zip(*members)
        tables = segment_tables(counts, np.asarray(offsets) // 4, keys, [old[0] for old in olds],
                                [new[0] for new in news], [old[2] for old in olds], [new[2] for new in news], device)
        try:
            # no_grad as in a step: a program compiled under one grad mode is recompiled under the other
            with torch.no_grad():
                segment = torch.repeat_interleave(torch.arange(len(counts), device=device),
                                                  torch.tensor(counts, device=device))
                lanes = program(segment, *tables,
                                torch.tensor(k0, device=device), torch.tensor(k1, device=device))
                delta = flat_lanes(lanes)
        except Exception as error:  # a compiler missing on this machine, an unsupported op
            _fail((device.type, old_code, new_code, wide), error)
        else:
            return spec.split_segments(delta, segments, counts)
    return spec.split_segments(_eager_difference(old_code, new_code, seed, members, device, wide), segments, counts)


def consecutive_runs(items, sizes, limit: int):
    """Consecutive runs of `items` whose `sizes` add up to at most `limit` (a larger item alone):
    the batches the torch backend works in, so that temporaries stay bounded."""
    run, total = [], 0
    for item, size in zip(items, sizes):
        if run and total + size > limit:
            yield run
            run, total = [], 0
        run.append(item)
        total += size
    if run:
        yield run


def _code(side) -> int | None:
    step, noise_type, _ = side
    return None if step == 0 else spec.noise_type_code(noise_type)


def segment_tables(counts, first_quads, keys, old_steps, new_steps, old_scales, new_scales, device) -> list:
    """Per segment (numpy columns in, tensors out): first quad in the batch, first quad in its
    parameter, key and steps (the low 32 bits the counters take), scales. Padded to two segments
    (a one-element dimension would be specialized by torch.compile and cost a second compilation)."""
    counts = np.asarray(counts, dtype=np.int64)
    mask = spec._MASK32
    ints = np.stack([np.cumsum(counts) - counts, first_quads, np.asarray(keys) & mask,
                     np.asarray(old_steps) & mask, np.asarray(new_steps) & mask]).astype(np.int64)
    floats = np.stack([old_scales, new_scales]).astype(np.float32)
    if ints.shape[1] == 1:
        ints = np.concatenate([ints, ints], axis=1)
        ints[0, 1] = counts[0]  # past the end: never selected
        floats = np.concatenate([floats, floats], axis=1)
    return [*torch.from_numpy(ints).to(device), *torch.from_numpy(floats).to(device)]


def flat_lanes(lanes) -> torch.Tensor:
    """Four lanes as one flat tensor in element order: element 4j + l is lane l of quad j."""
    return torch.stack(lanes, dim=1).reshape(-1)


def _eager_difference(old_code, new_code, seed, members, device, wide: bool) -> torch.Tensor:
    """noise_difference_lanes' result, in element order, computed by nvrm_ext.noise eagerly, per side."""
    sides = []
    for code, column in ((new_code, 4), (old_code, 3)):
        if code is None:
            sides.append(None)
            continue
        segments = [(key, side[0], offset, numel) for key, offset, numel, *rest in members
                    for side in (rest[column - 3],)]
        quads, keys, steps, counts = spec.segment_quads(segments, device)
        z = spec.unit_noise_of_quads(code, seed, quads, keys, steps)
        scales = torch.tensor([m[column][2] for m in members], dtype=torch.float32, device=device)
        sides.append(z * torch.repeat_interleave(scales, torch.tensor(counts, device=device)).unsqueeze(1))
    new, old = sides
    if wide:
        new, old = (None if side is None else side.to(torch.float64) for side in (new, old))
    delta = -old if new is None else new if old is None else new - old
    return delta.reshape(-1)
