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

With capturable counters (on the device) the host does not know which step starts a period:
every step measures on the device and keeps the measurement only where the counter says so
(LiveRelativeScales), with the same operations as the host path (SpreadProgram), so the same bits.
"""
from __future__ import annotations

import itertools
import math
import operator

import numpy as np
import torch

from ..backends import tables as T

STATE_KEY = "weight_std"  # per-parameter state: the spread of the current period (a float; capturable: a
# 0-dim view of the plan's device spreads)


CHUNK = 1 << 14  # a torch sum of at most this many elements runs on one thread, in one order


def _sum(flat: torch.Tensor) -> torch.Tensor:
    """The sum of a 1-D float64 tensor in an order that does not depend on torch's thread count
    (a plain sum of a long tensor splits it by thread): the sums of its CHUNK-element pieces,
    one per output row, then the sums of those the same way, down to one."""
    while flat.numel() > CHUNK:
        whole = flat.numel() // CHUNK * CHUNK
        flat = torch.cat([flat[:whole].view(-1, CHUNK).sum(1), flat[whole:].sum().reshape(1)])
    return flat.sum()


class SpreadProgram:
    """The operations that measure the spreads of a fixed list of tensors, in a fixed order:
    tensors of the same device, dtype and shape up to CHUNK elements stacked and reduced one
    per row (a few ops for many small tensors; each row the same sum as the tensor's own on the
    CPU), a longer one alone, DTensor parameters through all-reduced sums (_dtensor_spreads), a
    tensor of fewer than two elements 0. The host path (spreads) and the capturable path
    (measure_on_device, every step on the device) run the same program over the same tensors --
    all the relative rows of a bucket -- so they get the same bits."""

    def __init__(self, params: list, tensors: list):
        from .params import _is_dtensor

        self.count = len(params)
        plain: dict = {}
        self.sharded, self.tiny = [], []
        for i, (p, t) in enumerate(zip(params, tensors)):
            if p.numel() < 2:  # a DTensor's numel() is the whole tensor's: the same on every rank
                self.tiny.append(i)
            elif _is_dtensor(p):
                self.sharded.append(i)
            else:
                plain.setdefault((t.device, t.dtype, t.shape) if t.numel() <= CHUNK else i, []).append(i)
        self.plain = [(rows, isinstance(key, tuple)) for key, rows in plain.items()]
        self._sharded_groups = _sharded_groups([params[i] for i in self.sharded]) if self.sharded else []
        self.order = ([i for rows, _ in self.plain for i in rows]  # the rows in the order measure() gives them
                      + [self.sharded[j] for rows, _, _ in self._sharded_groups for j in rows])
        self._inverse = None  # measure_on_device: row order from the measured order, on the device

    @torch.no_grad()
    def measure(self, params: list, tensors: list) -> list:
        """(rows, float64 tensor of their spreads) per piece of the program, on the tensors' device."""
        out = []
        for rows, stacked in self.plain:
            if stacked:  # cat always copies: the in-place ops below are on the copy
                block = torch.cat([tensors[i].reshape(-1) for i in rows]).double().reshape(len(rows), -1)
                size = block.shape[1]
                means = block.sum(1) / size
                out.append((rows, (block.sub_(means[:, None]).square_().sum(1) / size).sqrt()))
            else:
                flat = tensors[rows[0]].reshape(-1).to(torch.float64, copy=True)  # changed in place below
                mean = _sum(flat) / flat.numel()
                out.append((rows, (_sum(flat.sub_(mean).square_()) / flat.numel()).sqrt().reshape(1)))
        for group_rows, groups, counts in self._sharded_groups:
            rows = [self.sharded[j] for j in group_rows]
            out.append((rows, _dtensor_spreads([params[i] for i in rows], groups, counts)))
        return out

    def measure_on_device(self, params: list, tensors: list, device: torch.device) -> torch.Tensor:
        """The spreads in row order as one float64 tensor on `device` (all the tensors there):
        nothing read back, no host-to-device copy once the first call made the index."""
        pieces = [values for _, values in self.measure(params, tensors)]
        if self.tiny:
            pieces.append(torch.zeros(len(self.tiny), dtype=torch.float64, device=device))
        if self._inverse is None:
            position = np.empty(self.count, dtype=np.int64)
            position[self.order + self.tiny] = np.arange(self.count)
            self._inverse = torch.as_tensor(position, device=device)
        return torch.cat(pieces).index_select(0, self._inverse)


@torch.no_grad()
def spreads(params: list, tensors: list) -> list[float]:
    """The population standard deviation (correction 0) of each parameter's elements, computed
    in float64 in two passes (the mean, then the mean squared deviation), each sum in an order
    that does not depend on torch's thread count (_sum; docs/noise.md §5.1); 0.0 for tensors of
    fewer than two elements. A DTensor's statistic is the whole tensor's, from sums all-reduced
    over the mesh dimensions it is sharded on, so every rank gets the same value. One
    device-to-host read per device."""
    return _in_row_order(SpreadProgram(params, tensors), params, tensors)


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


def _sharded_groups(params: list) -> list:
    """DTensor parameters by the process groups their sums are all-reduced over: (their
    positions in `params`, the groups, their element counts as a float64 tensor on their device)."""
    by_groups: dict = {}
    for i, p in enumerate(params):
        groups = _reduction_groups(p)
        by_groups.setdefault(tuple(map(id, groups)), (groups, []))[1].append(i)
    return [(rows, groups, torch.tensor([params[i].numel() for i in rows], dtype=torch.float64,
                                        device=params[rows[0]].to_local().device))
            for groups, rows in by_groups.values()]


def _dtensor_spreads(params: list, groups: tuple, counts: torch.Tensor) -> torch.Tensor:
    """The whole-tensor spreads of DTensor parameters sharded over the same process groups: the
    float64 sums of the local shards all-reduced (one collective per process group for all of
    them), the mean, then the sums of squared deviations from it all-reduced the same way.
    Every rank runs the same collectives in the same order: the parameters and their step
    counters are the same on every rank."""
    import torch.distributed as dist

    local = [p.to_local().detach().double() for p in params]
    sums = torch.stack([_sum(t.reshape(-1)) for t in local])
    for group in groups:
        dist.all_reduce(sums, group=group)
    means = sums / counts
    squares = torch.stack([_sum((t - mean).square().reshape(-1)) for t, mean in zip(local, means)])
    for group in groups:
        dist.all_reduce(squares, group=group)
    return (squares / counts).sqrt()


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
        self.ids = tuple(map(id, self.params))
        self.program = SpreadProgram(self.params, self.tensors)  # all the rows: the capturable path's
        self._last = None  # (the spreads the states held after the last call, the scales it returned)

    def where(self, i: int) -> str:
        return f"{self.name}: parameter {self.keys[i]}'s state"

    def scales(self, ints: np.ndarray, live: np.ndarray, measured: dict | None = None) -> np.ndarray:
        """Host mode, before a step: the float64 scales (variability × spread) of the relative
        rows, measuring the spread of those that start a period (or have none recorded) now.
        `live`: the rows' counters before the step (tables.LIVE_COLUMNS); `measured`: id(param)
        -> spread taken before another optimizer's update of this step (NVRM), used instead.
        A steady step (no row starts a period, the states hold the spreads the last call left)
        reuses the last scales: no per-row Python work. A spread edited into a state is checked
        (a finite number >= 0) before it is used. Where some row needs a measurement, all are
        measured (one SpreadProgram over the same tensors as a capturable step's: the same bits)."""
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
            check_spread(self.where(i), self.states[i])
            if isinstance(held[i], torch.Tensor):  # a one-element tensor edited in: kept as a number
                self.states[i][STATE_KEY] = float(held[i])
        measure = np.flatnonzero(starting | ~known).tolist()
        measured = measured or {}
        taken = [i for i in measure if id(self.params[i]) in measured]
        measure = [i for i in measure if id(self.params[i]) not in measured]
        if measure:
            values = _in_row_order(self.program, self.params, self.tensors)
            for i in measure:
                self.states[i][STATE_KEY] = values[i]
        for i in taken:
            self.states[i][STATE_KEY] = measured[id(self.params[i])]
        held = [s[STATE_KEY] for s in self.states]
        result = self.variability * np.asarray(held, dtype=np.float64)
        self._last = (held, result)
        return result


def _in_row_order(program: SpreadProgram, params: list, tensors: list) -> list[float]:
    """A program's spreads as Python floats in row order (one device-to-host read per device)."""
    out: list = [0.0] * program.count
    by_device: dict = {}
    for rows, values in program.measure(params, tensors):
        by_device.setdefault(values.device, []).append((rows, values))
    for pieces in by_device.values():
        rows = [i for piece_rows, _ in pieces for i in piece_rows]
        for i, value in zip(rows, torch.cat([values for _, values in pieces]).tolist()):
            out[i] = value
    return out


class LiveRelativeScales:
    """Capturable mode: the relative rows' spreads live on the device (plan.weight_stds, float64
    per row; the state dicts hold 0-dim views of it as ``weight_std``), and every step sets their
    new-noise scales in the device float table without the host: the program measures every
    relative row, torch.where keeps the measurement only where the live step counter starts a
    period (or no spread is known yet, plan.spread_known), and variability × spread is rounded
    to float32 as the host tables round it. No value is read back and nothing branches on one,
    so the step can be captured in a CUDA graph; what it costs is one measurement per step."""

    def __init__(self, rows: np.ndarray, variability: np.ndarray, num_iters: np.ndarray, plan, name: str):
        device = plan.live.device
        self.device = device
        self.rows = rows
        self.index = torch.as_tensor(rows, dtype=torch.int64, device=device)
        self.variability = torch.as_tensor(variability, dtype=torch.float64, device=device)
        # float64 like the counters: a step (< 2**32) is exact, and a num_iters above 2**53 rounds to a
        # value above every step, so step % num_iters == 0 still holds exactly where the integers say so
        self.num_iters = torch.as_tensor(num_iters.astype(np.float64), device=device)
        self.params = [plan.params[r] for r in rows]
        self.tensors = [plan.param_tensors[r] for r in rows]
        self.states = [plan.states[r] for r in rows]
        self.views = [plan.weight_stds[r] for r in rows]  # what the states hold while nobody edits them
        self.weight_stds, self.known = plan.weight_stds, plan.spread_known
        self.name = name
        self.keys = plan.static_ints[rows, T.I_KEY].tolist()
        self.ids = tuple(map(id, self.params))
        self.program = SpreadProgram(self.params, self.tensors)
        self._edits: list = []  # (row, value) of states whose entry is not the view (check())

    def check(self) -> None:
        """Host side, before anything changes: the states whose ``weight_std`` is not the view
        of the device spreads -- deleted (measured at this step, as in host mode) or edited (a
        number checked here; a tensor read only on the CPU, as the live counters) -- are noted
        for write_scales. One C-level scan when nothing was edited."""
        held = list(map(dict.get, self.states, itertools.repeat(STATE_KEY)))
        if all(map(operator.is_, held, self.views)):
            self._edits = []
            return
        edits = []
        for i, (value, view) in enumerate(zip(held, self.views)):
            if value is not view:
                check_spread(f"{self.name}: parameter {self.keys[i]}'s state", self.states[i],
                             read=self.device.type == "cpu")
                edits.append((i, value))
        self._edits = edits

    def measure(self) -> torch.Tensor:
        """The spreads of the relative rows' weights as they are now, in row order, on the device."""
        return self.program.measure_on_device(self.params, self.tensors, self.device)

    def write_scales(self, live: torch.Tensor, device_floats: torch.Tensor, measured: torch.Tensor | None) -> None:
        """On the device, before the launch: the edits check() noted, this step's spreads (the
        measurement `measured` taken before another optimizer's update, NVRM, or taken now) and
        their scales in the F_NEW_SCALE column; then the states hold the views again."""
        for i, value in self._edits:
            row = int(self.rows[i])
            if value is None:
                self.known[row] = False
            else:
                if isinstance(value, torch.Tensor):
                    self.weight_stds[row].copy_(value.reshape(()))
                else:
                    self.weight_stds[row].fill_(float(value))
                self.known[row] = True
        if measured is None:
            measured = self.measure()
        steps = live.select(1, T.L_STEP).index_select(0, self.index)
        take = (torch.fmod(steps, self.num_iters) == 0) | ~self.known.index_select(0, self.index)
        spread = torch.where(take, measured, self.weight_stds.index_select(0, self.index))
        self.weight_stds.index_copy_(0, self.index, spread)
        self.known.index_fill_(0, self.index, True)
        device_floats.select(1, T.F_NEW_SCALE).index_copy_(0, self.index, (self.variability * spread).float())
        for i, _ in self._edits:
            self.states[i][STATE_KEY] = self.views[i]
        self._edits = []


def measure_before_update(groups: list, states, name: str = "NVRM") -> dict | None:
    """NVRM runs its inner optimizer's update before the noise step, so the spread of a period's
    first step is measured here, from the weights before that update (id(param) -> spread),
    for the parameters with a gradient in relative groups; None when there are none. A spread
    kept for this step is checked here too, before that update changes anything. Where a
    (device, dtype) bucket has a parameter to measure, all its relative ones are measured, as
    its launch's RelativeScales would (the same program: the same bits)."""
    buckets: dict = {}
    key = -1
    for group in groups:
        relative = group.get("relative") and group["variability"]
        for p in group["params"]:
            key += 1
            if not relative or p.grad is None:
                continue
            state = states.get(p) or {}
            step = state.get("step", 0)
            if isinstance(step, torch.Tensor):  # capturable counters: measure_live_before_update
                continue
            bucket = buckets.setdefault((p.device, p.dtype), [[], False])
            bucket[0].append(p)
            if int(step) % group["num_iters"] == 0 or state.get(STATE_KEY) is None:
                bucket[1] = True
            else:
                check_spread(f"{name}: parameter {key}'s state", state)
    params = [p for bucket_params, needed in buckets.values() if needed for p in bucket_params]
    if not params:
        return None
    from .params import _local

    tensors = [_local(p) for p in params]
    return dict(zip(map(id, params), _in_row_order(SpreadProgram(params, tensors), params, tensors)))


def measure_live_before_update(engine, work) -> dict | None:
    """Capturable NVRM: the spreads of every relative row, measured on the device before the
    inner optimizer's update, whichever of them start a period (the host does not know the
    counters): {ids of the rows' parameters: float64 tensor in their order}, for each bucket;
    None without relative groups. `work`: the steady work the step will take (its plans' own
    programs, their groups' values brought up to date and edited spreads checked first), or
    None: the launch data will be rebuilt, and the bucket's relative parameters are measured
    in the order its rebuilt plan will have them."""
    groups = engine.param_groups
    if not any(group.get("relative") and group["variability"] for group in groups):
        return None
    out = {}
    if work is not None:
        for bucket_work in work:
            plan = bucket_work.plan
            plan._group_columns()  # raises for invalid group values before the update
            live = plan._relative
            if live is not None:
                live.check()
                out[live.ids] = live.measure()
        return out
    from .params import _local

    rows = [(key, group, p) for key, (group, p) in enumerate((group, p) for group in groups for p in group["params"])
            if p.grad is not None]
    for (device, _), members in T.by_bucket(rows, operator.itemgetter(2)).items():
        params = []
        for key, group, p in members:
            if group.get("relative") and group["variability"]:
                check_spread(f"{type(engine).__name__}: parameter {key}'s state", engine.state.get(p) or {},
                             read=device.type == "cpu")
                params.append(p)
        if params:
            tensors = [_local(p) for p in params]
            out[tuple(map(id, params))] = SpreadProgram(params, tensors).measure_on_device(params, tensors, device)
    return out


def measured_for(rows: "LiveRelativeScales", measured: dict | None) -> torch.Tensor | None:
    """The measurement measure_live_before_update took for these rows (None: none was taken)."""
    if not measured:
        return None
    found = measured.get(rows.ids)
    if found is not None:
        return found
    where = {}
    for ids, values in measured.items():
        where.update((pid, (values, j)) for j, pid in enumerate(ids))
    try:
        return torch.stack([where[pid][0][where[pid][1]] for pid in rows.ids])
    except KeyError:
        raise RuntimeError(f"{rows.name}: a relative parameter's spread was not measured before the inner "
                           "optimizer's update (its gradient appeared during that update?)") from None


def check_spread(where: str, state: dict, read: bool = True) -> None:
    """A loaded or edited ``weight_std``: a finite number >= 0, or a one-element real tensor
    (capturable mode keeps it on the device) whose value is checked if `read` (a device sync
    elsewhere than on the CPU, as for the live counters)."""
    value = state.get(STATE_KEY)
    if value is None:
        return
    number = value
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or not value.is_floating_point() or value.device.type == "meta":
            raise ValueError(f"{where}: invalid {STATE_KEY}: a tensor of shape {tuple(value.shape)} and dtype "
                             f"{value.dtype} (expected a finite number >= 0, the spread of the weights that "
                             "sets a relative noise scale)")
        if not read:
            return
        number = value.item()
    elif isinstance(value, np.floating):
        number = float(value)
    if isinstance(number, bool) or not isinstance(number, (int, float)) or not math.isfinite(number) or number < 0:
        raise ValueError(f"{where}: invalid {STATE_KEY} {value!r} (expected a finite number >= 0, the spread "
                         "of the weights that sets a relative noise scale)")
