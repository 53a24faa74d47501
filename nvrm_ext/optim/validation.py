"""Checks of everything a kernel trusts: hyperparameters, per-parameter state, parameter layouts.

The compiled and Triton kernels follow raw addresses, sizes and counters from the launch tables
and check none of them, so a wrong value there is memory corruption, a signal or silently wrong
weights, never an exception. Everything that goes into a table is therefore checked here, where
it enters: a constructor argument, a param group edited between steps, a loaded state_dict (a
checkpoint is data people download and share: untrusted input), a state dict edited in place, a
parameter whose storage was swapped (`p.data = ...`). A malformed value raises a clear error
before anything changes.
"""
from __future__ import annotations

import math
import numbers
import operator

import numpy as np
import torch

from .. import noise as spec

FLOAT32_MAX = float(np.finfo(np.float32).max)
# A step count is a uint32 Philox counter word (docs/noise.md), and a step computes step + 1.
MAX_STEP = 2**32 - 2
MAX_NUM_ITERS = 2**63 - 1  # an int64 table column
# Per-parameter tensors a launch reads and writes like the parameter itself (same size, dtype,
# device and memory order); noisy copies are only in a state_dict taken while the noise is removed.
STATE_TENSOR_KEYS = ("momentum_buffer", "exp_avg", "exp_avg_sq", "max_exp_avg_sq", "compensation")
NOISY_TENSOR_KEYS = ("noisy_param", "noisy_compensation")
STEP_KEYS = ("step", "noise_step", "noisy_noise_step")


# ---------------------------------------------------------------------- hyperparameters
def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_number(message: str, value, *, low: float = 0.0, high: float | None = None,
                 high_open: bool = False) -> float:
    """A real number in [low, high] (or [low, high)) that float32 holds: the tables store
    float32, so 1e39 would reach the kernel as inf. `message`: the error's opening, in
    torch.optim's wording where torch has one ("Invalid momentum value")."""
    bound = "" if high is None else f" and {'<' if high_open else '<='} {high}"
    if not _is_real(value):
        raise ValueError(f"{message}: {value!r} (expected a number >= {low}{bound}, "
                         f"got a {type(value).__name__})")
    number = float(value)
    if not (number >= low and abs(number) <= FLOAT32_MAX
            and (high is None or (number < high if high_open else number <= high))):
        raise ValueError(f"{message}: {value!r} (expected a finite number >= {low}{bound} "
                         "that float32 can hold)")
    return number


def check_lr(lr, *, read_tensor: bool = True) -> None:
    """A number or a one-element real tensor, >= 0 (torch.optim's checks and wording). A
    tensor's value is read unless `read_tensor` is False (inside a CUDA graph capture)."""
    if isinstance(lr, torch.Tensor):
        if lr.numel() != 1:
            raise ValueError(f"Tensor lr must be 1-element (got {lr.numel()} elements, shape {tuple(lr.shape)})")
        if lr.is_complex() or lr.dtype == torch.bool:
            raise ValueError(f"Invalid learning rate: {lr!r} (expected a real number >= 0)")
        if lr.device.type == "meta":
            raise ValueError("Invalid learning rate: a meta tensor has no value")
        if read_tensor:
            check_number("Invalid learning rate", lr.item())
        return
    check_number("Invalid learning rate", lr)


def check_num_iters(value) -> int:
    """An integer >= 1 (1e3 is taken as 1000, as the original's default), within int64."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) \
            or value != int(value) or not 1 <= int(value) <= MAX_NUM_ITERS:
        raise ValueError(f"Invalid num_iters: {value!r} (expected an integer >= 1 and <= 2**63 - 1; "
                         "the number of steps per epoch)")
    return int(value)


def check_noise_type(value) -> int:
    if not isinstance(value, str):
        raise ValueError(f"Invalid noise_type {value!r}: expected one of {', '.join(spec.NOISE_TYPES)}")
    return spec.noise_type_code(value)


def check_flag(name: str, value) -> None:
    """A switch (nesterov, amsgrad, decoupled): a bool, or 0 / 1."""
    if not (isinstance(value, (bool, np.bool_)) or (isinstance(value, numbers.Integral) and value in (0, 1))):
        raise ValueError(f"Invalid {name}: {value!r} (expected True or False)")


def check_group_keys(group: dict, defaults: dict) -> None:
    """Every hyperparameter the optimizer reads is present (deleted or lost in a load: clear
    error instead of a KeyError inside step())."""
    missing = [name for name in defaults if name not in group]
    if missing:
        raise ValueError(f"parameter group lacks {', '.join(map(repr, missing))}")


def _unchanged(snapshot: tuple, group: dict) -> bool:
    """The same group with the same keys (interned strings: compared by identity first) and
    the same value objects (compared by identity only: a tensor compares elementwise)."""
    then, keys, values = snapshot
    return then is group and keys == list(group) and all(map(operator.is_, values, group.values()))


class GroupWatch:
    """Validates the param groups again whenever their entries change -- a key added or
    removed, a value replaced by another object (a scheduler's new float, a mid-run edit) --
    so a step with untouched groups pays one identity scan per group, not a validation.
    A tensor lr filled in place (a scheduler's fill_) keeps its identity: it is read at each
    step anyway (host mode) or on the device (capturable)."""

    def __init__(self):
        self._seen = None  # [(group, its keys, its values)] as last validated

    def validate(self, groups: list, validate_group) -> None:
        """Validate the groups whose entries changed since they last passed (raising the first
        error; a group's snapshot is taken only when it passes, so a refused value is refused
        again at the next step). A scheduler's new lr re-validates its group, not the others."""
        seen = self._seen
        if seen is not None and len(seen) == len(groups) and all(map(_unchanged, seen, groups)):
            return
        previous = {id(snapshot[0]): snapshot for snapshot in seen or ()}
        fresh = []
        for group in groups:
            snapshot = previous.get(id(group))
            if snapshot is None or not _unchanged(snapshot, group):
                validate_group(group)
                snapshot = (group, list(group), tuple(group.values()))
            fresh.append(snapshot)
        self._seen = fresh


# ---------------------------------------------------------------------- per-parameter state
def check_step(where: str, key: str, value, read: bool = True) -> None:
    """A step counter: an integer in [0, MAX_STEP] (a plain number, an integral float, or a
    one-element tensor holding one); never a bool, NaN, inf or a value the kernels' 32-bit
    counter word cannot hold."""
    number = _scalar(where, key, value, read)
    if number is _UNREAD:
        return
    if isinstance(number, bool) or not _is_real(number) or not math.isfinite(number) \
            or number != int(number) or not 0 <= int(number) <= MAX_STEP:
        raise ValueError(f"{where}: invalid {key} {value!r} (expected an integer in [0, {MAX_STEP}])")


def check_noise_code(where: str, value, read: bool = True) -> None:
    number = _scalar(where, "noise_type", value, read)
    if number is _UNREAD:
        return
    if isinstance(number, bool) or not _is_real(number) or number not in (0, 1, 2):
        raise ValueError(f"{where}: invalid noise_type {value!r} (expected the code 0, 1 or 2 of "
                         f"{', '.join(spec.NOISE_TYPES)})")


def check_noise_scale(where: str, value, read: bool = True) -> None:
    number = _scalar(where, "noise_scale", value, read)
    if number is _UNREAD:
        return
    if not _is_real(number) or not (0.0 <= float(number) <= FLOAT32_MAX):
        raise ValueError(f"{where}: invalid noise_scale {value!r} (expected a finite number >= 0 "
                         "that float32 can hold)")


_UNREAD = object()  # a tensor counter whose value was not read


def _scalar(where: str, key: str, value, read: bool):
    """A counter's value: numbers as they are, one-element real tensors read if `read` (a
    device sync: at a load, not when a plan is rebuilt in capturable mode, whose counters are
    0-dim tensors: their values cannot reach memory the kernel should not touch), _UNREAD if
    not; anything else refused."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.is_complex() or value.dtype == torch.bool or value.device.type == "meta":
            raise ValueError(f"{where}: invalid {key}: a tensor of shape {tuple(value.shape)} and dtype "
                             f"{value.dtype} (expected a number)")
        return value.item() if read else _UNREAD
    if isinstance(value, np.generic):
        return value.item()
    return value


def check_counters(where: str, state: dict, read: bool = True) -> None:
    """The bookkeeping numbers of one parameter's state, those present (tensors' values only
    if `read`)."""
    for key in STEP_KEYS:
        if key in state:
            check_step(where, key, state[key], read)
    if "noise_type" in state:
        check_noise_code(where, state["noise_type"], read)
    if "noise_scale" in state:
        check_noise_scale(where, state["noise_scale"], read)
    if "weight_std" in state:
        from .relative import check_spread

        check_spread(where, state, read)
    if "momentum_fresh" in state:
        fresh = _scalar(where, "momentum_fresh", state["momentum_fresh"], read)
        if fresh is not _UNREAD and (not isinstance(fresh, (numbers.Real, bool)) or fresh not in (0, 1)):
            raise ValueError(f"{where}: invalid momentum_fresh {state['momentum_fresh']!r} (expected a bool)")


def _layout(t: torch.Tensor) -> tuple:
    """The strides that decide which storage element is which (size-1 dimensions aside)."""
    return tuple(s for n, s in zip(t.shape, t.stride()) if n != 1)


def storage_holds(t: torch.Tensor) -> bool:
    """The tensor's elements lie inside its storage (a storage resized under it, as FSDP1 does
    with resize_(0), would leave the kernel a dangling address)."""
    if t.numel() == 0:
        return True
    span = 1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride()))
    return t.untyped_storage().nbytes() >= (t.storage_offset() + span) * t.element_size()


def check_parameter(where: str, p: torch.Tensor, is_dense) -> None:
    """What a launch needs of a parameter's storage: real data, dense, inside its storage."""
    if p.device.type == "meta":
        raise ValueError(f"{where} is on the meta device: it has no data to update; materialize the "
                         "module first (module.to_empty(device=...), then initialize or load the "
                         "weights) and build the optimizer after that")
    if not is_dense(p):
        raise ValueError(f"{where} (shape {tuple(p.shape)}, strides {p.stride()}) overlaps itself or has "
                         "gaps; parameters must be dense tensors")
    if not storage_holds(p):
        raise ValueError(f"{where} (shape {tuple(p.shape)}) lies outside its storage "
                         f"({p.untyped_storage().nbytes()} bytes; freed or resized under it)")


def check_state_tensors(where: str, p: torch.Tensor, state: dict, keys=STATE_TENSOR_KEYS) -> None:
    """Every state tensor a launch indexes like the parameter: a dense tensor of the parameter's
    shape, dtype, device and memory order, inside its storage, not sharing the parameter's
    memory. (momentum_buffer may be None: torch.optim.SGD's "no buffer yet".)"""
    fix = ("; give it the parameter's shape, dtype, device and memory layout, or drop this "
           "parameter's state (del optimizer.state[p]) to start it afresh")
    seen = {p.data_ptr()} if p.numel() else set()
    for key in keys:
        if key not in state:
            continue
        t = state[key]
        if t is None and key == "momentum_buffer":
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{where}: state[{key!r}] is a {type(t).__name__}, expected a tensor{fix}")
        if t.layout != torch.strided:
            raise ValueError(f"{where}: state[{key!r}] is a {t.layout} tensor, expected a dense one{fix}")
        differs = [f"{what} {a}, the parameter {b}" for what, a, b in (
            ("shape", tuple(t.shape), tuple(p.shape)), ("dtype", t.dtype, p.dtype),
            ("device", t.device, p.device)) if a != b]
        if not differs and _layout(t) != _layout(p):
            differs.append(f"strides {t.stride()}, the parameter {p.stride()}")
        if differs:
            raise ValueError(f"{where}: state[{key!r}] has {'; '.join(differs)}{fix}")
        if not storage_holds(t):
            raise ValueError(f"{where}: state[{key!r}] lies outside its storage (freed or resized under it){fix}")
        if t.numel():
            if t.data_ptr() in seen:
                raise ValueError(f"{where}: state[{key!r}] shares its memory with the parameter or another "
                                 f"state tensor{fix}")
            seen.add(t.data_ptr())


def check_loaded_state(where: str, p: torch.Tensor, state) -> None:
    """One parameter's entry of a state_dict about to be loaded, before anything is changed.
    torch.optim's load then casts floating tensors to the parameter's dtype and device (so
    those may differ here) but keeps shapes, and turns strings into garbage: shapes and types
    are checked here; layouts again when the launch data is built."""
    if not isinstance(state, dict):
        raise TypeError(f"{where}: expected a dict, got a {type(state).__name__}")
    missing = {"step", "noise_step"} - set(state)
    if missing:
        raise ValueError(f"{where} lacks {sorted(missing)}")
    check_counters(where, state)
    for key in STATE_TENSOR_KEYS + NOISY_TENSOR_KEYS:
        t = state.get(key)
        if t is None and key in state and key == "momentum_buffer":
            continue
        if key not in state:
            continue
        if not isinstance(t, torch.Tensor) or t.layout != torch.strided or not (
                t.is_floating_point() and not t.is_complex()):
            kind = f"a {t.dtype} {t.layout} tensor" if isinstance(t, torch.Tensor) else f"a {type(t).__name__}"
            raise ValueError(f"{where}: state[{key!r}] is {kind}, expected a dense floating-point tensor")
        if tuple(t.shape) != tuple(p.shape):
            raise ValueError(f"{where}: state[{key!r}] has shape {tuple(t.shape)}, the parameter "
                             f"{tuple(p.shape)} (a state_dict of another model, or of parameters in "
                             "another order?); nothing was loaded")
        if type(t) is torch.Tensor and not storage_holds(t):  # a DTensor's shards are checked when used
            raise ValueError(f"{where}: state[{key!r}] lies outside its storage; nothing was loaded")
