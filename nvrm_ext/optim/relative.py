"""Relative variability: a noise scale proportional to each tensor's own spread.

σ only matters relative to the weights (a variability of 0.01 is tiny for one layer and large
for another), so a group with ``relative=True`` gives tensor k the scale
``variability × spread_k``, where spread_k is the standard deviation of tensor k's weights
(docs/noise.md §5.1 says exactly which statistic, when and in which precision).

The statistic is taken at the first step of each ``num_iters`` period -- a parameter's step t
with ``(t - 1) % num_iters == 0``, from the weights before that step's update, which are the
clean weights then (the step before removed the noise; at t = 1 nothing was added yet) -- and
kept for the period in the parameter's state (``weight_std``), so the scale is fixed while noise
of that period is on the weights, a checkpoint resumes with it, and removal stays exact: the
counters record the scale each noise was added with, as for absolute variability.
"""
from __future__ import annotations

import itertools
import math

import numpy as np
import torch

from ..backends import tables as T

STATE_KEY = "weight_std"  # per-parameter state: the spread of the current period (float)


CHUNK = 1 << 14  # a torch sum of at most this many elements runs on one thread, in one order


def _sum(flat: torch.Tensor) -> torch.Tensor:
    """The sum of a 1-D float64 tensor in an order that does not depend on torch's thread count
    (a plain sum of a long tensor splits it by thread): the sums of its CHUNK-element pieces,
    one per output row, then the sums of those the same way, down to one."""
    while flat.numel() > CHUNK:
        whole = flat.numel() // CHUNK * CHUNK
        flat = torch.cat([flat[:whole].view(-1, CHUNK).sum(1), flat[whole:].sum().reshape(1)])
    return flat.sum()


def _plain_spreads(tensors: list) -> list[float]:
    """The spreads of tensors on one device (at least two elements each): two passes in float64,
    each sum in _sum's order over the elements in their logical (row-major) order. Tensors of
    the same shape up to CHUNK elements are concatenated and reduced one per row (each row the
    same sum as the tensor's own): a few ops for many small tensors instead of a few each. One
    device-to-host read."""
    by_shape: dict = {}
    for i, t in enumerate(tensors):
        by_shape.setdefault(t.shape if t.numel() <= CHUNK else i, []).append(i)
    order, values = [], []
    for shape, rows in by_shape.items():
        if isinstance(shape, torch.Size):  # cat always copies: the in-place ops below are on the copy
            stacked = torch.cat([tensors[i] for i in rows]).double().reshape(len(rows), -1)
            size = stacked.shape[1]
            means = stacked.sum(1) / size
            values.append((stacked.sub_(means[:, None]).square_().sum(1) / size).sqrt())
        else:
            flat = tensors[rows[0]].reshape(-1).to(torch.float64, copy=True)  # changed in place below
            mean = _sum(flat) / flat.numel()
            values.append((_sum(flat.sub_(mean).square_()) / flat.numel()).sqrt().reshape(1))
        order += rows
    out: list = [None] * len(tensors)
    for i, value in zip(order, torch.cat(values).tolist()):
        out[i] = value
    return out


@torch.no_grad()
def spreads(params: list, tensors: list) -> list[float]:
    """The population standard deviation (correction 0) of each parameter's elements, computed
    in float64 in two passes (the mean, then the mean squared deviation), each sum in an order
    that does not depend on torch's thread count (_sum; docs/noise.md §5.1); 0.0 for tensors of
    fewer than two elements. A DTensor's statistic is the whole tensor's, from sums all-reduced
    over the mesh dimensions it is sharded on, so every rank gets the same value. One
    device-to-host read per device for the plain tensors."""
    from .params import _is_dtensor

    out: list = [None] * len(params)
    by_device: dict = {}
    sharded = []
    for i, (p, t) in enumerate(zip(params, tensors)):
        if p.numel() < 2:  # a DTensor's numel() is the whole tensor's: the same on every rank
            out[i] = 0.0
        elif _is_dtensor(p):
            sharded.append(i)
        else:
            by_device.setdefault(t.device, []).append(i)
    for rows in by_device.values():
        for i, value in zip(rows, _plain_spreads([tensors[i] for i in rows])):  # no_grad: no detach needed
            out[i] = value
    if sharded:
        for i, value in zip(sharded, _dtensor_spreads([params[i] for i in sharded])):
            out[i] = value
    return out


def _reduction_groups(p) -> tuple:
    """The process groups over which a DTensor's local shards add up to the whole tensor: one
    per mesh dimension it is sharded on (a replicated dimension already holds all of it)."""
    from torch.distributed.tensor import Replicate, Shard

    groups = []
    for dim, placement in enumerate(p.placements):
        if isinstance(placement, Shard):
            groups.append(p.device_mesh.get_group(dim))
        elif not isinstance(placement, Replicate):
            raise ValueError(f"relative=True supports DTensor parameters that are sharded or replicated; this "
                             f"one has placements {p.placements} (a partial sum is not the parameter's value)")
    return tuple(groups)


def _dtensor_spreads(params: list) -> list[float]:
    """The whole-tensor spreads of DTensor parameters: the float64 sums of the local shards
    all-reduced (one collective per process group for all of them), the mean, then the sums of
    squared deviations from it all-reduced the same way. Every rank runs the same collectives in
    the same order: the parameters and their step counters are the same on every rank."""
    import torch.distributed as dist

    by_groups: dict = {}
    for i, p in enumerate(params):
        groups = _reduction_groups(p)
        by_groups.setdefault(tuple(map(id, groups)), (groups, []))[1].append(i)
    out: list = [None] * len(params)
    for groups, rows in by_groups.values():
        local = [params[i].to_local().detach().double() for i in rows]
        counts = torch.tensor([params[i].numel() for i in rows], dtype=torch.float64, device=local[0].device)
        sums = torch.stack([_sum(t.reshape(-1)) for t in local])
        for group in groups:
            dist.all_reduce(sums, group=group)
        means = sums / counts
        squares = torch.stack([_sum((t - mean).square().reshape(-1)) for t, mean in zip(local, means)])
        for group in groups:
            dist.all_reduce(squares, group=group)
        for i, value in zip(rows, (squares / counts).sqrt().tolist()):
            out[i] = value
    return out


class RelativeScales:
    """The rows of one bucket's launch whose group has ``relative=True``: which of them start a
    period at this step, their spreads (measured then, kept in the state dicts otherwise), and
    the new-noise scale column they give the launch tables."""

    def __init__(self, rows: np.ndarray, variability: np.ndarray, params: list, tensors: list, states: list,
                 name: str, keys: np.ndarray):
        self.rows = rows
        self.variability = variability  # float64, per relative row
        self.params = [params[r] for r in rows]
        self.tensors = [tensors[r] for r in rows]
        self.states = [states[r] for r in rows]
        self.name = name  # the optimizer's, and the rows' parameter keys: how an error names a row
        self.keys = keys[rows].tolist()
        self._last = None  # (the spreads the states held after the last call, the scales it returned)

    def scales(self, ints: np.ndarray, live: np.ndarray, measured: dict | None = None) -> np.ndarray:
        """Host mode, before a step: the float64 scales (variability × spread) of the relative
        rows, measuring the spread of those that start a period (or have none recorded) now.
        `live`: the rows' counters before the step (tables.LIVE_COLUMNS); `measured`: id(param)
        -> spread taken before another optimizer's update of this step (NVRM), used instead.
        A steady step (no row starts a period, the states hold the spreads the last call left)
        reuses the last scales: no per-row Python work. A spread edited into a state is checked
        (a finite number >= 0) before it is used."""
        rows = self.rows
        starting = live[rows, T.L_STEP].astype(np.int64) % ints[rows, T.I_NUM_ITERS] == 0
        held = list(map(dict.get, self.states, itertools.repeat(STATE_KEY)))
        if not measured and self._last is not None and not starting.any():
            try:
                if held == self._last[0]:
                    return self._last[1]
            except RuntimeError:  # a tensor edited in compares elementwise: checked below
                pass
        known = np.fromiter((v is not None for v in held), bool, len(held))  # None: measured now
        for i in np.flatnonzero(known & ~starting).tolist():  # kept for this step: edited since?
            check_spread(f"{self.name}: parameter {self.keys[i]}'s state", self.states[i])
        measure = np.flatnonzero(starting | ~known).tolist()
        measured = measured or {}
        taken = [i for i in measure if id(self.params[i]) in measured]
        measure = [i for i in measure if id(self.params[i]) not in measured]
        values = spreads([self.params[i] for i in measure], [self.tensors[i] for i in measure]) if measure else []
        for i in taken:
            self.states[i][STATE_KEY] = measured[id(self.params[i])]
        for i, value in zip(measure, values):
            self.states[i][STATE_KEY] = float(value)
        held = [s[STATE_KEY] for s in self.states]
        result = self.variability * np.asarray(held, dtype=np.float64)
        self._last = (held, result)
        return result


def measure_before_update(groups: list, states, name: str = "NVRM") -> dict | None:
    """NVRM runs its inner optimizer's update before the noise step, so the spread of a period's
    first step is measured here, from the weights before that update (id(param) -> spread),
    for the parameters with a gradient in relative groups; None when there are none. A spread
    kept for this step is checked here too, before that update changes anything."""
    params = []
    key = -1
    for group in groups:
        relative = group.get("relative") and group["variability"]
        for p in group["params"]:
            key += 1
            if not relative or p.grad is None:
                continue
            state = states.get(p) or {}
            step = state.get("step", 0)
            if isinstance(step, torch.Tensor):  # capturable counters: refused when the plan is built
                continue
            if int(step) % group["num_iters"] == 0 or state.get(STATE_KEY) is None:
                params.append(p)
            else:
                check_spread(f"{name}: parameter {key}'s state", state)
    if not params:
        return None
    from .params import _local

    return {id(p): float(value) for p, value in zip(params, spreads(params, [_local(p) for p in params]))}


def check_spread(where: str, state: dict) -> None:
    """A loaded or edited ``weight_std``: a finite number >= 0."""
    value = state.get(STATE_KEY)
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{where}: invalid {STATE_KEY} {value!r} (expected a finite number >= 0, the spread "
                         "of the weights that sets a relative noise scale)")
