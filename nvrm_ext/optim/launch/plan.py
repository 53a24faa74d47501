"""A bucket's launch tables, built from plain data: what the optimizer hands in (the update
rule, the state dicts, the flags, a block-table cache), never a call back into it.

One plan per (device, dtype) bucket; how it is launched is the mode's: host.py (the counters in
the state dicts) or capturable.py (the counters on the device); steady.py checks that a step
fits the plan as it is.
"""
from __future__ import annotations

import itertools
import operator
import struct
from typing import Callable, NamedTuple

import numpy as np
import torch

from ... import noise as spec
from ...backends import tables as T
from .. import relative, validation as V
from ..keys import NOISY_KEYS
from ..params import _capturing, _compensation, _global_offset, _is_dtensor, _local
from . import scan
from .bucket import BlockTables
from .capturable import CapturableLaunch
from .host import HostLaunch
from .steady import SteadyCheck

_DOUBLES = struct.Struct(f"{T.FLOAT_COLUMNS}d")  # a group's float row, compared bit for bit
_DOUBLE = struct.Struct("d")


class UpdateRule(NamedTuple):
    """The update a plan fuses with the noise swap: its op (tables.OP_SGD / OP_ADAM, or
    OP_NOISE: the swap alone, NVRM's) and three functions of a param group."""

    op: int
    state_signature: Callable  # group -> which state tensors it needs (a change rebuilds the plan)
    # (group, param, state) -> (the I_STATE0..2 tensors, created where missing; whether a fresh
    # buffer needs FLAG_MOMENTUM_INIT)
    state_tensors: Callable
    group_row: Callable  # group -> (static flags, float64 row; step-dependent columns: tables.resolve_rows)


class GroupTables(NamedTuple):
    """The static columns with each group's hyperparameters spread over its rows (before the
    per-step columns), and the noise each row's state dict says it carries after a step."""

    ints: np.ndarray
    floats: np.ndarray
    new_scales: np.ndarray  # float64 per row: the new noise's scale (its group's variability)
    new_types: list  # per row: the new noise's type code
    new_scale_values: list  # new_scales as Python floats, as the state dicts hold them


class _GroupValues(NamedTuple):
    """What one group puts into the group tables, compared bit for bit between steps."""

    flags: int
    num_iters: int  # 1 for variability 0: every step is a num_iters-th step (no new noise)
    noise_type: str
    row: bytes  # the float64 row, packed
    variability: bytes  # packed
    relative: bool  # the scale is variability x the spread of the weights (relative.py)


class HostTables(NamedTuple):
    """Host mode: the tables a step writes its columns into, kept while the group tables
    they were copied from stay the same."""

    group_ints: np.ndarray  # GroupTables.ints they were made from (compared by identity)
    ints: np.ndarray
    floats: np.ndarray


class PendingCommit(NamedTuple):
    """Host mode: what commit() needs of the step whose tables were just built."""

    ints: np.ndarray
    floats: np.ndarray
    counters: np.ndarray  # float64 [rows, LIVE_COLUMNS]: the counters before the step (after it, once committed)
    group_tables: GroupTables
    committed_columns: list | None  # the state dicts' counter columns as the last commit() wrote them, if unchanged


class _BucketPlan(HostLaunch, CapturableLaunch, SteadyCheck):
    """Launch data of one (device, dtype) bucket, built once while its parameters and their
    state tensors stay the same. Per step only a few columns change -- gradient addresses,
    step counters, flags, hyperparameters -- and they are written with numpy into tables kept
    for the plan's life, so the host cost of a step is about a microsecond per tensor
    (bench/test_host_overhead.py).

    Host mode: the counters live in `optimizer.state`; each step reads them (a float64 mirror,
    reused while the dicts hold what the last step wrote), resolves them into the tables
    (tables.resolve_rows; on the CPU the kernel does it from the mirror) and commits them
    after the launch. Capturable mode: they live in `self.live` on the device (the state holds
    views of it), the tables stay on the device and the kernel resolves and commits the
    counters itself, so a step needs nothing from the host and can be captured in a CUDA graph.
    Either way the launch also copies a few elements of every parameter (tables.SAMPLE_SIZE),
    which the weight records keep (record_weights).
    """

    def __init__(self, rule: UpdateRule, members, backend, *, states, denoise: bool, capturable: bool,
                 block_tables: BlockTables, owner: str):
        self.signature = None
        self.backend = backend
        self.params = [p for _, _, p, _ in members]
        self.states = []
        group_ids: dict = {}
        group_of, momentum_init, plans = [], [], []
        for key, group, p, _ in members:
            state = states[p]
            for extra in NOISY_KEYS:  # put in by a loader other than ours (ZeRO): its noise_step says 0
                state.pop(extra, None)
            if len(state) == 0:
                state["step"] = 0
                state["noise_step"] = 0
                state["noise_type"] = spec.noise_type_code(group["noise_type"])
                state["noise_scale"] = float(group["variability"])
            tensors, fresh_buffer = rule.state_tensors(group, p, state)
            compensation = _compensation(p, state)
            self.states.append(state)
            group_of.append(group_ids.setdefault(id(group), len(group_ids)))
            momentum_init.append(fresh_buffer)
            plans.append(T.TensorPlan(param=_local(p), grad=None, states=tuple(_local(t) for t in tensors),
                                      key=key, old_step=0, new_step=0, flags=0,
                                      floats=(0.0,) * T.FLOAT_COLUMNS, offset=_global_offset(p),
                                      compensation=_local(compensation)))
        self.rule = rule
        self.denoise = denoise
        self.block_tables = block_tables  # shared with the optimizer (and its other plans)
        self.owner = owner  # the optimizer's class name, for error messages
        self.groups = [None] * len(group_ids)
        for _, group, _, _ in members:
            self.groups[group_ids[id(group)]] = group
        self.group_of = np.asarray(group_of, dtype=np.int64)
        self.momentum_init = np.asarray(momentum_init, dtype=bool)
        self.static_ints, _ = T.build_rows(plans)
        self.row_tensors = [(plan.param, plan.states, plan.compensation) for plan in plans]
        self.param_tensors = [plan.param for plan in plans]  # the local tensors (DTensor shards)
        self.layouts = [(t.dtype, tuple(t.shape), t.stride()) for t in self.param_tensors]
        # the storages the rows point at, alive as long as the plan: no other tensor can be allocated
        # at a row's address while the plan may still launch on it (steady_grad_pointers)
        self._kept_storages = [t.detach() for t in self.param_tensors]
        # the state tensors the rows point at, per key any row has: replaced ones make the plan stale.
        # (getter, key, tensors): an itemgetter where every row has the key, else None (dict.get)
        self._state_refs = [
            (operator.itemgetter(key) if all(key in state for state in self.states) else None, key,
             [state.get(key) for state in self.states])
            for key in V.STATE_TENSOR_KEYS if any(key in state for state in self.states)]
        # a key every row has: a dict cleared in place fails its scan (KeyError), no emptiness scan needed
        self.refs_see_cleared_states = any(getter is not None for getter, _, _ in self._state_refs)
        device, dtype = plans[0].param.device, plans[0].param.dtype
        # weight samples after each step (tables.SAMPLE_SIZE): a fused launch copies them into
        # self.samples itself (kept for the plan's life, so a captured graph's replays refresh
        # them too); the torch backend gathers views. Row r's sample starts at _sample_starts[r].
        counts = [min(T.SAMPLE_SIZE, t.numel()) for t in self.param_tensors]
        if not backend.writes_through_addresses:  # the torch reference
            self.samples = None
            self._sample_views = [T.sample_view(t) for t in self.param_tensors]
            self._sample_starts = np.cumsum([0] + counts[:-1]).tolist()
        else:
            self.samples = torch.zeros((len(plans), T.SAMPLE_SIZE), dtype=dtype, device=device)
            self._flat_samples = self.samples.view(-1)
            self._sample_views = None
            self._sample_starts = list(range(0, len(plans) * T.SAMPLE_SIZE, T.SAMPLE_SIZE))
        self._sample_counts = counts
        self.weights_record = None  # (version counters, flat samples) after our last step
        # the parameters a fused launch writes through raw addresses, for bump_versions (the
        # torch backend's in-place ops bump their own counters)
        self._written = list(self.param_tensors) if backend.writes_through_addresses else []
        # whether bump_versions advances each parameter's counter by exactly one (views and
        # detached aliases share a counter): found at the first record_weights, None until then
        self._bumps_once = None
        # Host mode on the CPU (the compiled library, or Triton's interpreter): host memory is
        # the kernel's memory, so the kernel resolves and commits the counters itself (as in
        # capturable mode) from the plan's float64 mirror of the state dicts (_counters);
        # elsewhere tables.resolve_rows / commit_rows do it here.
        self._kernel_resolves = not capturable and not backend.host_tables and device.type == "cpu"
        self._live_offsets = np.arange(len(plans), dtype=np.int64) * (T.LIVE_COLUMNS * np.dtype(np.float64).itemsize)
        self._versions_read = None  # the counters weights_unchanged() read during this step
        self._converted = [None] * len(plans)  # gradients in another dtype or layout, converted
        self._grads = None
        self._pending = None  # host mode: a PendingCommit between tables() and commit()
        self.measured_spreads = None  # capturable mode: relative rows' spreads measured before an update (NVRM)
        self.host_blocks = None  # host mode: the block table of the fused launch (sizes are fixed)
        self.state_signatures = [rule.state_signature(group) for group in self.groups]
        # what steady_grad_pointers compares: the parameters' dtype, shapes, strides, addresses;
        # None for DTensor parameters, whose local shards take the full path at every step
        # (lists compared whole: types and dtypes are singletons, so equal lists compare by identity)
        self._steady_meta = None if any(map(_is_dtensor, self.params)) else (
            [torch.Tensor] * len(plans), [dtype] * len(plans), list(map(scan.SHAPE, self.param_tensors)),
            list(map(scan.STRIDE, self.param_tensors)), self.static_ints[:, T.I_PARAM].tolist())
        # scan.layout_guard: the gradients' types, dtypes, shapes and strides as _steady_meta
        # says, checked in one call; made when a step's gradients first pass the scans
        self._grad_guard = None
        self._static_alignment = T.alignment_flags(self.static_ints)  # the gradient address (0) aside
        self._group_key = None     # [denoise, a _GroupValues tuple per group] behind self._group_tables
        # (ints, floats, (row scales, the types and scales the state dicts get)) before the per-step columns
        self._group_tables = None
        self._relative = None      # relative.RelativeScales (LiveRelativeScales if capturable): rows with relative=True
        self._relative_key = None  # (rows, variabilities, num_iters) self._relative was made for
        self._committed = None     # host mode: (counter columns written by commit(), their array)
        self._host_tables = None   # host mode: HostTables
        self._bound_live = None    # host mode on the CPU: the counter mirror whose rows I_LIVE points to
        self._tabled_pointers = None  # host mode on the CPU: the gradient addresses in the host tables
        self._prepared = None      # host mode on the CPU: PreparedLaunch (host.py)
        self._fresh = bool(self.momentum_init.any())  # some momentum buffer not used yet
        # capturable mode: the live counters, [rows, tables.LIVE_COLUMNS] float64 on the device (the
        # state dicts hold views of it; capturable.py); None in host mode
        self.live = None
        if capturable:
            self._init_live(plans[0].param.device)

    def noise_on_weights(self) -> dict:
        """id(param) -> (noise step, type code, scale, 16-bit compensation buffer | None) of the
        noise this plan's last step left on its parameters, from its own copy of the counters
        (the state dicts may have been cleared since); empty when it has none."""
        if self.live is not None:
            rows = self.live.cpu().tolist()
        elif self._committed is not None:
            rows = self._committed[1].tolist()
        else:
            return {}
        return {id(p): (int(row[T.L_NOISE_STEP]), int(row[T.L_NOISE_TYPE]), row[T.L_NOISE_SCALE], compensation)
                for p, row, (_, _, compensation) in zip(self.params, rows, self.row_tensors) if row[T.L_NOISE_STEP]}

    def weights_unchanged(self) -> bool:
        """No parameter's version counter moved since our last step (state dicts and storage
        addresses are fixed for the plan's life by its signature). Keeps the counters read
        for record_weights."""
        self._versions_read = list(map(scan.VERSION, self.param_tensors))
        return self.weights_record is not None and self._versions_read == self.weights_record[0]

    def bump_versions(self) -> None:
        """Advance the version counters of the parameters a fused launch wrote, as an in-place
        torch op would: autograd then refuses a backward through weights a step() changed after
        the forward pass, and another owner of these parameters sees the change. One C call
        (about 0.07 us per tensor). The state buffers and compensation, which autograd never
        sees unless a user feeds them to a forward pass, are left as they are: bumping them too
        would double or triple that cost at every step. Not inside a CUDA graph capture: a
        replay runs the kernels only, so replays leave the counters as they are."""
        if self._written:
            scan.increment_versions(self._written)

    def record_weights(self) -> None:
        """Remember how our step left the weights: version counters (after bump_versions) and
        samples. The counters of a fused launch are the ones weights_unchanged() read, plus
        the one bump each, and it copied the samples itself; the torch backend's in-place ops
        advanced the counters, and its samples are gathered here."""
        versions = None
        if self.samples is not None and self._versions_read is not None and self._bumps_once is not False:
            versions = list(map(operator.add, self._versions_read, itertools.repeat(1)))
            if self._bumps_once is None:  # the first time: see whether that is what the counters say
                self._bumps_once = versions == list(map(scan.VERSION, self.param_tensors))
                if not self._bumps_once:
                    versions = None
        if versions is None:
            versions = list(map(scan.VERSION, self.param_tensors))
        self._versions_read = None
        samples = torch.cat(self._sample_views) if self.samples is None else self._flat_samples
        self.weights_record = (versions, samples)

    def spill_weights_record(self, records: dict) -> None:
        """Move the plan's record into per-parameter records (records.WeightRecordsMixin._check_weights)."""
        if self.weights_record is None:
            return
        versions, samples = self.weights_record
        for p, state, start, count, version, address in zip(
                self.params, self.states, self._sample_starts, self._sample_counts, versions,
                self.static_ints[:, T.I_PARAM].tolist()):
            records[id(p)] = ((id(state), version, address), samples, start, count)
        self.weights_record = None

    # ------------------------------------------------------------------ every step
    def rows(self) -> list:
        """(param, grad, states, compensation) per row, as the torch backend reads them (after tables())."""
        return [(param, grad, states, comp) for (param, states, comp), grad in zip(self.row_tensors, self._grads)]

    def _local_grads(self, grads) -> list:
        """The gradients as the kernels read them: in the parameter's dtype and memory order."""
        out = []
        for row, ((param, _, _), g) in enumerate(zip(self.row_tensors, grads)):
            g = _local(g)
            if g.dtype != param.dtype or g.stride() != param.stride():
                buffer = self._converted[row]
                if buffer is None:
                    buffer = self._converted[row] = torch.empty_like(param)
                g = buffer.copy_(g)
            out.append(g)
        return out

    def tables(self, grads, grad_pointers=None, spreads=None):
        """The int64 and float32 tables of this step (host numpy). Host mode: resolved from
        the counters in `optimizer.state` (by the kernel itself on the CPU), in two arrays kept
        for the plan's life and rewritten in place (a host-mode launch reads or copies them
        before it returns); capturable mode: fresh arrays, which upload() compares with the
        last ones, and the kernel resolves the counters. `grad_pointers`: the gradients'
        addresses where steady_grad_pointers vouched for them; otherwise gradients in another
        dtype or layout than their parameter are converted. `spreads`: relative rows' spreads
        measured before another optimizer's update (relative.measure_before_update)."""
        if grad_pointers is None:
            self._grads = self._local_grads(grads)
            grad_pointers = [t.data_ptr() for t in self._grads]
        else:
            self._grads = grads
        group_tables = self._group_columns()
        group_ints, group_floats = group_tables.ints, group_tables.floats
        if self.live is None:
            if self._host_tables is None or self._host_tables.group_ints is not group_ints:
                self._host_tables = HostTables(group_ints, group_ints.copy(), group_floats.copy())
                self._bound_live = None
                self._tabled_pointers = None
            _, ints, floats = self._host_tables
        else:
            ints, floats = group_ints.copy(), group_floats.copy()
            if self._relative is not None:  # edited spreads checked now; the scales are set on the device
                self._relative.check()
                self.measured_spreads = relative.measured_for(self._relative, spreads)
        # Where the kernel resolves the counters, nothing but this writes the host tables' gradient
        # and flag columns: with the same addresses as at the last step (the same gradient tensors)
        # they hold them already. Elsewhere resolve_rows rewrites the flags; capturable tables are new.
        if not (self._kernel_resolves and grad_pointers == self._tabled_pointers):
            addresses = np.asarray(grad_pointers, dtype=np.int64)
            ints[:, T.I_GRAD] = addresses
            if self.backend.uses_alignment_flag:  # tables.alignment_flags(ints): only the gradients' addresses change
                ints[:, T.I_FLAGS] = group_ints[:, T.I_FLAGS] | np.where(addresses % 16 == 0, self._static_alignment, 0)
            self._tabled_pointers = grad_pointers if self._kernel_resolves else None
        if self.live is None:
            committed_columns, counters = self._counters()
            if self._relative is not None:  # this step's scales of the relative rows (relative.py)
                rows = self._relative.rows
                scales = self._relative.scales(ints, counters, spreads)
                floats[rows, T.F_NEW_SCALE] = scales
                row_scales = group_tables.new_scales.copy()
                row_scales[rows] = scales
                group_tables = group_tables._replace(new_scales=row_scales, new_scale_values=row_scales.tolist())
            if self._kernel_resolves:
                if counters is not self._bound_live:  # a new mirror (the state dicts were changed)
                    ints[:, T.I_LIVE] = counters.ctypes.data + self._live_offsets
                    self._bound_live = counters
            else:
                T.resolve_rows(self.rule.op, ints, floats, counters)
            self._pending = PendingCommit(ints, floats, counters, group_tables, committed_columns)
        return ints, floats

    def _group_columns(self) -> GroupTables:
        """The static columns with the rows' hyperparameters filled in -- flags, num_iters, the
        float row, the new noise scale -- from each group's values, and the rows' new noise
        types and scales as the state dicts will hold them. Spread over the rows only when a
        group's values change (compared bit for bit), not at every step."""
        key = [self.denoise]
        rows = []
        for group in self.groups:
            flags, row = self.rule.group_row(group)
            variability = group["variability"]
            rows.append(row)
            # a _GroupValues as a plain tuple (built at every step); variability 0: every step is
            # a num_iters-th step (no new noise; old noise removed)
            key.append((flags, group["num_iters"] if variability else 1, group["noise_type"],
                        _DOUBLES.pack(*row), _DOUBLE.pack(variability), bool(group.get("relative", False))))
        if key != self._group_key:
            g = self.group_of
            ints = self.static_ints.copy()
            values = [_GroupValues._make(k) for k in key[1:]]
            ints[:, T.I_NUM_ITERS] = np.asarray([v.num_iters for v in values], dtype=np.int64)[g]
            new_types = np.asarray([spec.noise_type_code(v.noise_type) for v in values], dtype=np.int64)[g]
            ints[:, T.I_FLAGS] = (np.asarray([v.flags for v in values], dtype=np.int64)[g]
                                  | (new_types << T.FLAG_NEW_TYPE_SHIFT)
                                  | (0 if self.denoise else T.FLAG_KEEP_NOISE))  # | alignment, per step
            floats = np.asarray(rows, dtype=np.float64)[g].astype(np.float32)  # rounded once
            row_scales = np.asarray([float(group["variability"]) for group in self.groups], dtype=np.float64)[g]
            floats[:, T.F_NEW_SCALE] = row_scales
            self._group_key = key
            self._group_tables = GroupTables(ints, floats, row_scales, new_types.tolist(), row_scales.tolist())
            relative_rows = np.flatnonzero(np.asarray([v.relative for v in values], dtype=bool)[g] & (row_scales != 0))
            relative_num_iters = ints[relative_rows, T.I_NUM_ITERS]
            # what the relative rows' data is made of: kept while only other values change (an lr, say)
            relative_key = (relative_rows.tobytes(), row_scales[relative_rows].tobytes(), relative_num_iters.tobytes())
            if relative_key != self._relative_key:
                self._relative, self._relative_key = None, None
                if len(relative_rows) and self.live is not None:  # measured on the device at every step
                    if _capturing(self.live.device):
                        self._group_key = None  # not built: the next eager step builds it
                        raise RuntimeError(f"{self.owner}: the relative groups' launch data must be rebuilt (a "
                                           "group's relative, variability or num_iters changed) while a CUDA "
                                           "graph is being captured; run one step() eagerly after such changes, "
                                           "then capture")
                    self._relative = relative.LiveRelativeScales(relative_rows, row_scales[relative_rows],
                                                                 relative_num_iters, self, self.owner)
                elif len(relative_rows):
                    self._relative = relative.RelativeScales(relative_rows, row_scales[relative_rows], self.params,
                                                             self.param_tensors, self.states, self.owner,
                                                             self.static_ints[:, T.I_KEY])
                self._relative_key = relative_key
        return self._group_tables
