"""The 'torch' backend's compiled step programs: the noise swap and the update as one program.

Per large tensor (STEP_MIN_ELEMENTS elements or more): the batched path (torch_noise for the
noise, then the update in eager ops) makes some ten passes over memory and draws two noises per
element; on the CPU that is about twice the original algorithm's step. Here one torch.compile'd
program per (update, flags, noise types, dtypes) does it all in two loops over the tensor (one
over quads that draws Philox and the transform, one over elements that updates). Small tensors
take torch_batch's programs: the same, over flat copies of many of them. Both run the same operations as the eager path (nvrm_ext.noise's Philox and float64 transforms,
torch_math.update_one's arithmetic), so the same bits (tests/test_torch_step.py compares them).

The previous noise is not drawn again when it can be read: PreviousNoise keeps, per parameter,
the noise the last step program put on it (float32, one value per element; the original algorithm
keeps two such tensors), with the complete key of the pure function that made it (seed, parameter
key, step, noise type, scale, offset, size, device). A step subtracts it only when that key is the
one the launch table asks to remove; any other case (first step, a loaded checkpoint, a changed
group, a different step or scale) draws the old noise as well. It is a cache of a pure function,
never state: it is not saved, and nothing but speed depends on it. NVRM_TORCH_NOISE_CACHE=0 turns
it off (the step then draws both noises, keeping no memory).
"""
from __future__ import annotations

import os
import weakref

import torch

from .. import noise as spec
from . import tables as T
from . import torch_noise
from .torch_math import update_one

STEP_MIN_ELEMENTS = 1 << 16
"""Tensors smaller than this take the batched path: a call into a compiled program costs some
50 microseconds of host time, which a tensor of this size repays."""

_CACHE_ENV = "NVRM_TORCH_NOISE_CACHE"  # "0": draw the old noise again instead of keeping it
OLD_NONE, OLD_KEPT, OLD_DRAWN = "none", "kept", "drawn"

_programs: dict = {}  # program key -> compiled function, or None once it failed


class PreviousNoise:
    """Per parameter, the noise a step program last put on it and the key that made it; an entry
    goes with its parameter (by identity: tensors compare elementwise, so not a WeakKeyDictionary)."""

    def __init__(self):
        self._entries: dict = {}  # id(param) -> (weak reference to param, key, noise)

    def find(self, param: torch.Tensor, key: tuple) -> torch.Tensor | None:
        """The kept noise if it is the one `key` describes, else None."""
        entry = self._entries.get(id(param))
        if entry is None or entry[0]() is not param or entry[1] != key:
            return None
        return entry[2]

    def take(self, param: torch.Tensor, numel: int) -> torch.Tensor:
        """A float32 buffer for the parameter's next noise: its kept one (reused), or a new one.
        The entry is forgotten: until `keep` names the new noise, the buffer describes nothing."""
        entry = self._entries.pop(id(param), None)
        if entry is not None and entry[0]() is param and entry[2].numel() == numel and entry[2].device == param.device:
            return entry[2]
        return torch.empty(numel, dtype=torch.float32, device=param.device)

    def keep(self, param: torch.Tensor, key: tuple, noise: torch.Tensor) -> None:
        ident = id(param)
        self._entries[ident] = (weakref.ref(param, lambda _, ident=ident: self._entries.pop(ident, None)), key, noise)

    def forget(self, param: torch.Tensor) -> None:
        self._entries.pop(id(param), None)

    def __len__(self) -> int:
        return len(self._entries)


PREVIOUS_NOISE = PreviousNoise()


def cache_enabled() -> bool:
    return os.environ.get(_CACHE_ENV, "") != "0"


def flat_in_memory_order(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor | None:
    """`t` as a flat view numbered in memory order, or None where it cannot be one that agrees
    with `like`'s numbering (other strides, overlapping or gapped memory)."""
    if t.stride() != like.stride() or t.shape != like.shape:
        return None
    if t.is_contiguous():
        return t.view(-1)
    ordered = t.permute(spec.memory_order_permutation(t))
    return ordered.view(-1) if ordered.is_contiguous() else None


def noise_key(seed: int, key: int, side, offset: int, numel: int, device: torch.device) -> tuple:
    """What determines the noise of one side (step, type, scale) of a row: the pure function's arguments."""
    step, noise_type, scale = side
    return (seed, key, step, noise_type, scale, offset, numel, device)


def compiled(config: tuple, make):
    """The compiled form of make(config) (the function to compile), or None where compiling is
    off or has failed for this configuration."""
    if os.environ.get(torch_noise._COMPILE_ENV, "") == "0":
        return None
    if config not in _programs:
        function = make(config)
        function.__code__ = function.__code__.replace(
            co_name=f"{function.__name__}_" + "_".join(str(part) for part in config))
        try:
            # emulate_precision_casts: round at every cast to a 16-bit type as eager does (the
            # compensation is what that rounding drops); by default inductor may keep float32
            _programs[config] = torch.compile(function, dynamic=True, fullgraph=True,
                                              options={"emulate_precision_casts": True})
        except Exception as error:  # torch.compile missing or refusing this platform
            fail(config, error)
    return _programs[config]


def fail(config: tuple, error: Exception) -> None:
    """A program that failed to compile or run (nothing written): say so once, never try it again."""
    torch_noise._fail((config, "step"), error)
    _programs[config] = None


def _tensor_step(config: tuple):
    """The step of one tensor: draw the new noise, take the old (kept or drawn), update."""
    _, op, flags, old_mode, old_code, new_code, wide, *_ = config

    def tensor_step(param, grad, states, comp, floats, counters, kept, grad_scale):
        # kept: the parameter's kept-noise buffer (None without the cache)
        quads = torch.arange((param.shape[0] + 3) // 4, device=param.device) + counters[3]
        new = _drawn(new_code, quads, counters, counters[2], floats[T.F_NEW_SCALE], param.shape[0])
        swap_and_update(config, new, kept,
                        lambda: _drawn(old_code, quads, counters, counters[1], floats[T.F_OLD_SCALE], param.shape[0]),
                        param, grad, states, comp, floats, grad_scale)
    return tensor_step


def swap_and_update(config: tuple, new, kept, draw_old, param, grad, states, comp, floats, grad_scale) -> None:
    """What every step program does once it has the new noise: take the old one (the kept buffer,
    draw_old(), or none: config's mode), the update with new - old (float64 for float64
    parameters), then the new noise into the kept buffer, element by element after reading it."""
    _, op, flags, old_mode, _, _, wide, *_ = config
    if old_mode == OLD_KEPT:
        old = kept
    elif old_mode == OLD_DRAWN:
        old = draw_old()
    else:
        old = None
    if wide:
        delta = new.to(torch.float64) if old is None else new.to(torch.float64) - old.to(torch.float64)
    else:
        delta = new if old is None else new - old
    update_one(op, param, grad, states, comp, flags, floats, delta, grad_scale)
    if kept is not None:
        kept.copy_(new)


def _drawn(code: int, quads, counters, step, scale, numel: int) -> torch.Tensor:
    """float32(scale) * z of the elements of these quads, flat in element order, `numel` long."""
    lanes = torch_noise.scaled_unit_lanes(code, quads, counters[0], step, scale, counters[4], counters[5])
    return torch_noise.flat_lanes(lanes)[:numel]


def try_step(op: int, row, ints_row, float_row, seed: int, grad_scale, cache: PreviousNoise | None) -> bool:
    """Run one table row through its step program; False (nothing changed) where this row is not
    one for it: too small, no new noise, a shard not starting on a quad, a layout the flat views
    cannot follow, or no compiled program on this platform."""
    param, grad, states, comp = row
    numel = param.numel()
    flags = int(ints_row[T.I_FLAGS])
    offset = int(ints_row[T.I_OFFSET])
    new_step, old_step = int(ints_row[T.I_NEW_STEP]), int(ints_row[T.I_OLD_STEP])
    if (op == T.OP_NOISE or numel < STEP_MIN_ELEMENTS or new_step == 0 or offset % 4 != 0 or grad is None
            or param.dtype not in T.STORAGE_CODES):
        return False
    flat = [flat_in_memory_order(t, param) for t in (param, grad, comp) if t is not None]
    flat_states = [None if t is None else flat_in_memory_order(t, param) for t in states]
    if any(t is None for t in flat) or any(f is None for f, t in zip(flat_states, states) if t is not None):
        return False
    key = int(ints_row[T.I_KEY])
    new_code = (flags >> T.FLAG_NEW_TYPE_SHIFT) & T.NOISE_TYPE_MASK
    old_code = (flags >> T.FLAG_OLD_TYPE_SHIFT) & T.NOISE_TYPE_MASK
    new_side = (new_step, spec.NOISE_TYPES[new_code], float_row[T.F_NEW_SCALE])
    old_side = (old_step, spec.NOISE_TYPES[old_code], float_row[T.F_OLD_SCALE])
    old_noise = None
    if old_step == 0:
        old_mode = OLD_NONE
    elif cache is not None:
        old_noise = cache.find(param, noise_key(seed, key, old_side, offset, numel, param.device))
        old_mode = OLD_DRAWN if old_noise is None else OLD_KEPT
    else:
        old_mode = OLD_DRAWN
    config = ("tensor", op, flags & T.UPDATE_FLAGS, old_mode, old_code if old_mode == OLD_DRAWN else None,
              new_code, param.dtype == torch.float64, comp is not None, grad_scale is not None,
              tuple(t is not None for t in states))
    program = compiled(config, _tensor_step)
    if program is None:
        return False
    device = param.device
    floats = torch.tensor(float_row, dtype=torch.float32).to(device)
    counters = torch.tensor([key & spec._MASK32, old_step & spec._MASK32, new_step & spec._MASK32, offset // 4,
                             seed & spec._MASK32, (seed >> 32) & spec._MASK32], dtype=torch.int64).to(device)
    if cache is not None:
        kept = cache.take(param, numel)  # the old noise itself in the "kept" mode
    else:
        kept = None
    try:
        with torch.no_grad():
            program(flat[0], flat[1], flat_states, flat[2] if comp is not None else None,
                    floats, counters, kept, grad_scale)
    except Exception as error:  # compiling failed (a compiler missing, an unsupported op): nothing ran
        fail(config, error)
        return False
    if cache is not None:
        cache.keep(param, noise_key(seed, key, new_side, offset, numel, device), kept)
    return True
