"""Capturable mode: the counters live on the device (`plan.live`, [rows, tables.LIVE_COLUMNS]
float64; the state dicts hold views of it) and so do the tables, which the kernel resolves and
commits itself: a step reads nothing back to the host and can be captured in a CUDA graph."""
from __future__ import annotations

import numpy as np
import torch

from ...backends import tables as T
from .. import relative
from ..params import _capturing, _local, _pinned_like
from . import scan


def launch_capturable(plan, backend, bucket, grads, ints, floats, seed: int, grad_scale, found_inf, *, owner: str):
    """Capturable mode: bring the persistent device tables up to date, then one launch that
    resolves, updates and commits (the commit is a second small kernel on CUDA / Triton);
    nothing is read back to the host."""
    device, dtype = bucket
    if not backend.capturable and _capturing(device):
        raise RuntimeError(f"{owner}: the 'torch' backend reads the counters on the host "
                           "and cannot be captured in a CUDA graph; use backend='cuda' or 'triton'")
    plan.upload(ints, floats)
    plan.refresh_tensor_lrs()
    if plan._relative is not None:  # relative groups: this step's spreads and scales, on the device
        plan._relative.write_scales(plan.live, plan.device_floats, plan.measured_spreads)
    plan.measured_spreads = None
    scale, skip = (None if t is None else t.to(device=device, dtype=torch.float32, non_blocking=True)
                   for t in (grad_scale, found_inf))
    backend.launch(plan.rule.op, dtype, plan.device_ints, plan.device_floats, plan.blocks, seed,
                   rows=plan.rows, live=plan.live, commit_rows=len(plan.params), grad_scale=scale,
                   found_inf=skip, samples=plan.samples)
    if scale is not None:
        plan.write_back_converted(grads, skip)
        if backend.writes_through_addresses and not _capturing(device):  # it unscaled them in place
            scan.increment_versions(plan._grads)
    plan.release_grads()


class CapturableLaunch:
    """The capturable-mode tables of a _BucketPlan (plan.py). `self.live`: the device counters
    (None in host mode)."""

    def _init_live(self, device: torch.device) -> None:
        """Move the counters to the device: `self.live` [T, LIVE_COLUMNS] float64, the state
        entries become views of it, and the tables get persistent device copies."""
        n = len(self.params)
        host = np.zeros((n, T.LIVE_COLUMNS), dtype=np.float64)
        carried = []  # (row, column, tensor): counters already on the device (an earlier plan)
        for row, (state, fresh) in enumerate(zip(self.states, self.momentum_init)):
            if "momentum_buffer" in state:
                state.setdefault("momentum_fresh", bool(fresh))
            for column, key in enumerate(T.LIVE_STATE_KEYS):
                value = state.get(key, 0)
                if isinstance(value, torch.Tensor):
                    carried.append((row, column, value))
                else:
                    host[row, column] = value
        self.live = torch.tensor(host, dtype=torch.float64, device=device)
        if carried:
            rows, columns, values = zip(*carried)
            index = (torch.tensor(rows, device=device), torch.tensor(columns, device=device))
            self.live.index_put_(index, torch.stack([v.to(device, torch.float64) for v in values]))
        for row, state in enumerate(self.states):
            for column, key in enumerate(T.LIVE_STATE_KEYS):
                if key in state:
                    state[key] = self.live[row, column]
        self._init_spreads(device)
        self.static_ints[:, T.I_LIVE] = (self.live.data_ptr()
                                         + np.arange(n, dtype=np.int64) * T.LIVE_COLUMNS * self.live.element_size())
        self.device_ints = torch.zeros((n, T.INT_COLUMNS), dtype=torch.int64, device=device)
        self.device_floats = torch.zeros((n, T.FLOAT_COLUMNS), dtype=torch.float32, device=device)
        self.blocks = None
        if self.backend.block_size:
            numels = self.static_ints[:, T.I_NUMEL].tolist()
            offsets = self.static_ints[:, T.I_OFFSET].tolist()
            self.blocks = T.to_device(T.build_block_table(numels, offsets, self.backend.block_size), device)
        self._group_rows = [torch.as_tensor(np.flatnonzero(self.group_of == g), device=device)
                            for g in range(len(self.groups))]
        self._uploaded = None     # the host tables last copied to the device
        self._spare_staging = None if device.type == "cpu" else _pinned_like(
            torch.from_numpy(self.static_ints), torch.from_numpy(np.zeros((n, T.FLOAT_COLUMNS), np.float32)))
        self._graph_staging = []  # pinned copies captured in CUDA graphs: kept for their replays
        # the storages a captured graph writes, kept even if a parameter gets another (p.data = ...)
        self._param_storages = [param.detach() for param, _, _ in self.row_tensors]
        self._graph_owned = False  # a captured upload may have run since: upload on every eager step

    def _init_spreads(self, device: torch.device) -> None:
        """Relative variability's spreads on the device: `self.weight_stds` float64 per row and
        `self.spread_known` (whether the row has one); a state's ``weight_std`` becomes a view
        of its row (relative.LiveRelativeScales keeps them up to date)."""
        n = len(self.params)
        host = np.zeros(n, dtype=np.float64)
        known = np.zeros(n, dtype=bool)
        carried = []  # (row, tensor): spreads already on the device (an earlier plan)
        for row, state in enumerate(self.states):
            value = state.get(relative.STATE_KEY)
            if isinstance(value, torch.Tensor):
                carried.append((row, value))
            elif value is not None:
                host[row] = value
            known[row] = value is not None
        self.weight_stds = torch.tensor(host, dtype=torch.float64, device=device)
        self.spread_known = torch.tensor(known, dtype=torch.bool, device=device)
        if carried:
            rows, values = zip(*carried)
            self.weight_stds.index_put_((torch.tensor(rows, device=device),),
                                        torch.stack([v.reshape(()).to(device, torch.float64) for v in values]))
        for row, state in enumerate(self.states):
            if known[row]:
                state[relative.STATE_KEY] = self.weight_stds[row]

    def upload(self, ints: np.ndarray, floats: np.ndarray) -> None:
        """Copy changed host tables into the persistent device tables (same addresses, so
        captured graphs keep reading them). Inside a capture the copy becomes part of the
        graph -- from pinned buffers allocated beforehand and kept as long as the optimizer --
        so each replay restores the tables it was captured with (e.g. the addresses of
        gradients allocated in the graph's pool); eager steps then always upload."""
        device = self.live.device
        capturing = _capturing(device)
        if (not capturing and not self._graph_owned and self._uploaded is not None
                and np.array_equal(ints, self._uploaded[0]) and np.array_equal(floats, self._uploaded[1])):
            return
        host_ints, host_floats = torch.from_numpy(ints), torch.from_numpy(floats)
        if device.type == "cpu":
            self.device_ints.copy_(host_ints)
            self.device_floats.copy_(host_floats)
        elif capturing:
            if self._spare_staging is None:
                raise RuntimeError("nvrm_ext: no spare pinned buffer for a table upload inside this CUDA "
                                   "graph capture (one step() per capture); run one step() eagerly "
                                   "before each capture")
            staging, self._spare_staging = self._spare_staging, None
            staging[0].copy_(host_ints)  # host to pinned host: no device work
            staging[1].copy_(host_floats)
            self.device_ints.copy_(staging[0], non_blocking=True)
            self.device_floats.copy_(staging[1], non_blocking=True)
            self._graph_staging.append(staging)
        else:
            self.device_ints.copy_(host_ints.pin_memory(), non_blocking=True)
            self.device_floats.copy_(host_floats.pin_memory(), non_blocking=True)
            if self._spare_staging is None:
                self._spare_staging = _pinned_like(host_ints, host_floats)
        self._graph_owned = self._graph_owned or capturing
        self._uploaded = None if capturing else (ints, floats)

    def refresh_tensor_lrs(self) -> None:
        """Groups whose lr is a tensor: copy it into their rows on the device, so a graph
        replay (or an LR scheduler's in-place fill_) sees the current value."""
        for group, rows in zip(self.groups, self._group_rows):
            lr = group["lr"]
            if isinstance(lr, torch.Tensor):
                self.device_floats[rows, T.F_LR] = lr.to(self.live.device, torch.float32)

    def write_back_converted(self, grads, found_inf) -> None:
        """Gradients the kernel read through a conversion buffer (another dtype or layout than
        the parameter): give them the unscaled values it wrote there, unless the step was skipped."""
        for g, buffer in zip(grads, self._grads):
            g = _local(g)
            if g.data_ptr() != buffer.data_ptr():
                unscaled = buffer.to(g.dtype)
                g.copy_(unscaled if found_inf is None else torch.where(found_inf != 0, g, unscaled))

    def release_grads(self) -> None:
        self._grads = None
