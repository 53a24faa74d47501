"""The 'torch' backend's batch programs: the step of many small tensors as one compiled program.

A model's small tensors (biases, norms, small layers: below torch_step.STEP_MIN_ELEMENTS) cost
host time per tensor, not arithmetic. The rows that share their update (same flags, dtypes, float
coefficients and noise types; contiguous; sizes and offsets whole quads; a new noise) are copied
into flat buffers with one foreach copy per column, stepped by one compiled program (the batched
Philox and transforms of torch_noise, the arithmetic of torch_math.update_one) and copied back
with one foreach copy per written column. Three things keep the per-tensor host time low:

* A Workspace per batch: the flat buffers and views of them shaped like the members, made once
  and reused while the members keep their shapes, dtypes and device (checked every step). They
  are scratch space, written from the members before each program reads them. Creating 2,000
  views costs more than the copies themselves, and a fresh flatten / unflatten per step was a
  third of the step on 2,000 tensors of 1k elements.
* Grouping reads the launch table's columns in numpy; per row only the tensor attributes the
  table does not carry (dtype, device, contiguity) are read in Python.
* Like torch_step's per-tensor programs, a batch keeps the noise it put on (float32, one value
  per element) with the key of the pure function that made it: the members' keys, offsets,
  sizes, steps, noise types and scales, in order, and the seed (bytes of the table's columns).
  The next step subtracts it only when its rows ask to remove exactly that noise; anything else
  draws it. NVRM_TORCH_NOISE_CACHE=0 turns it off.

Memory: a workspace holds a copy of its members' parameters, gradients and states (the buffers a
per-step flatten would allocate anyway, kept instead of freed) and, with the cache, their noise.
It goes with the first parameter of its batch, when a batch that begins elsewhere takes that
parameter, or after some batch runs unused (_IDLE_RUNS).
"""
from __future__ import annotations

import math
import operator
import weakref

import numpy as np
import torch

from .. import noise as spec
from . import tables as T
from . import torch_noise
from .torch_step import OLD_DRAWN, OLD_KEPT, OLD_NONE, compiled, fail, swap_and_update

BATCH_ELEMENTS = 1 << 20  # small tensors share a batch up to this size: the temporaries stay bounded

# what a kept noise is keyed by, per member: these int columns, the side's step and noise type, its scale's bits
_KEY_COLUMNS = [T.I_KEY, T.I_OFFSET, T.I_NUMEL]
_SIDES = {"old": (T.I_OLD_STEP, T.FLAG_OLD_TYPE_SHIFT, T.F_OLD_SCALE),
          "new": (T.I_NEW_STEP, T.FLAG_NEW_TYPE_SHIFT, T.F_NEW_SCALE)}


class Workspace:
    """Flat buffers for one batch's columns (parameter, gradient, states, compensation), views of
    them shaped like the members, the quads' segment numbers, and the batch's kept noise."""

    def __init__(self, signature: tuple, numels: np.ndarray, columns: list):
        self.signature = signature  # (device, column dtypes, member shapes): what the views follow
        device, _, shapes = signature
        total = int(numels.sum())
        sizes = numels.tolist()
        self.buffers, self.views = [], []
        for column in columns:
            if column is None:
                self.buffers.append(None)
                self.views.append(None)
                continue
            buffer = torch.empty(total, dtype=column[0].dtype, device=device)
            self.buffers.append(buffer)
            self.views.append([piece.view(shape) for piece, shape in zip(buffer.split(sizes), shapes)])
        counts = torch.from_numpy(numels // 4).to(device)
        self.segment = torch.repeat_interleave(torch.arange(len(sizes), device=device), counts)
        self.kept = None       # float32 [total]: the noise the last program put on, or None
        self.kept_key = None   # the key that describes it (_noise_key), or None: it describes nothing
        self.last_run = 0      # when a batch last used it (_runs)


_SHAPE = operator.attrgetter("shape")
_IDLE_RUNS = 64  # a workspace no batch used in this many batch runs (or 4 per workspace) is dropped
_workspaces: dict = {}  # id(first parameter of the batch) -> (weak reference to it, Workspace)
_runs = 0  # batch runs so far


def _workspace(params, columns, numels: np.ndarray) -> Workspace | None:
    """The batch's workspace (made or remade when its members' layout changed), or None where a
    column's shapes are not its parameters' (the eager path then says what is wrong)."""
    global _runs
    _runs += 1
    shapes = tuple(map(_SHAPE, params))
    for column in columns[1:]:
        if column is not None and tuple(map(_SHAPE, column)) != shapes:
            return None
    if [math.prod(shape) for shape in shapes] != numels.tolist():
        return None
    for param in params[1:]:  # batches that began with another member are gone
        _workspaces.pop(id(param), None)
    signature = (params[0].device, tuple(None if c is None else c[0].dtype for c in columns), shapes)
    first = params[0]
    entry = _workspaces.get(id(first))
    if entry is not None and entry[0]() is first and entry[1].signature == signature:
        workspace = entry[1]
    else:
        try:
            workspace = Workspace(signature, numels, columns)
        except torch.OutOfMemoryError:  # the eager path needs less at a time
            return None
        ident = id(first)
        _workspaces[ident] = (weakref.ref(first, lambda _, ident=ident: _workspaces.pop(ident, None)), workspace)
    workspace.last_run = _runs
    idle = max(_IDLE_RUNS, 4 * len(_workspaces))
    for ident in [ident for ident, (_, other) in _workspaces.items() if _runs - other.last_run > idle]:
        del _workspaces[ident]  # its first parameter has left the batches (frozen, say)
    return workspace


def _noise_key(side: str, ints: np.ndarray, floats: np.ndarray, seed: int) -> tuple:
    """The arguments of the pure function that made one side's noise over a batch: the seed and
    the members' columns, as bytes."""
    step_column, type_shift, scale_column = _SIDES[side]
    codes = (ints[:, T.I_FLAGS] >> type_shift) & T.NOISE_TYPE_MASK
    columns = np.column_stack([ints[:, _KEY_COLUMNS], ints[:, step_column], codes,
                               floats[:, scale_column].view(np.int32).astype(np.int64)])
    return seed, columns.tobytes()


def _batch_step(config: tuple):
    """The step of a batch of small tensors laid end to end, each a whole number of quads."""
    _, _, _, _, old_code, new_code, *_ = config

    def batch_step(param, grad, states, comp, floats, segment, tables, kept, grad_scale):
        quad_starts, first_quads, keys, old_steps, new_steps, old_scales, new_scales, k0, k1 = tables
        positions = torch.arange(segment.shape[0], device=segment.device)
        quads = positions - quad_starts[segment] + first_quads[segment]
        keys = keys[segment]

        def drawn(code, steps, scales):
            return torch_noise.flat_lanes(torch_noise.scaled_unit_lanes(code, quads, keys, steps[segment],
                                                                        scales[segment], k0, k1))
        swap_and_update(config, drawn(new_code, new_steps, new_scales), kept,
                        lambda: drawn(old_code, old_steps, old_scales), param, grad, states, comp, floats, grad_scale)
    return batch_step


def _table_groups(ints: np.ndarray, floats: np.ndarray) -> np.ndarray:
    """Per row, a number shared by the rows whose table columns let them share a batch program
    (update flags, noise types, float coefficients bit for bit), or -1 for a row no batch
    program takes (no new noise, a size or offset not a whole number of quads)."""
    if len(ints) == 0:
        return np.zeros(0, dtype=np.int64)
    flags = ints[:, T.I_FLAGS]
    old_codes = np.where(ints[:, T.I_OLD_STEP] != 0, (flags >> T.FLAG_OLD_TYPE_SHIFT) & T.NOISE_TYPE_MASK, -1)
    new_codes = (flags >> T.FLAG_NEW_TYPE_SHIFT) & T.NOISE_TYPE_MASK
    coefficients = np.ascontiguousarray(floats[:, :T.F_OLD_SCALE]).view(np.int32).astype(np.int64)
    columns = np.column_stack([flags & T.UPDATE_FLAGS, old_codes, new_codes, coefficients])
    # rows of one parameter group are neighbours: number the runs of equal rows, then the runs'
    # distinct values (np.unique(axis=0) sorts, some 5 ms on 2,000 rows)
    starts = np.ones(len(columns), dtype=bool)
    starts[1:] = (columns[1:] != columns[:-1]).any(axis=1)
    numbers: dict = {}
    run_groups = [numbers.setdefault(columns[first].tobytes(), len(numbers)) for first in np.flatnonzero(starts)]
    groups = np.asarray(run_groups)[np.cumsum(starts) - 1]
    takes = (ints[:, T.I_NEW_STEP] != 0) & (ints[:, T.I_NUMEL] % 4 == 0) & (ints[:, T.I_OFFSET] % 4 == 0)
    return np.where(takes, groups, -1)


def _layout(row) -> tuple | None:
    """The dtypes and device of a row's tensors, or None where one is not contiguous (its flat
    copy would not be in memory order) or the gradient is missing."""
    param, grad, states, comp = row
    if grad is None or not param.is_contiguous() or not grad.is_contiguous():
        return None
    state_dtypes = []
    for state in states:
        if state is None:
            state_dtypes.append(None)
        elif state.is_contiguous():
            state_dtypes.append(state.dtype)
        else:
            return None
    if comp is not None and not comp.is_contiguous():
        return None
    return param.dtype, param.device, grad.dtype, tuple(state_dtypes), None if comp is None else comp.dtype


def run_batches(op: int, rows: list, ints: np.ndarray, floats: np.ndarray, seed: int, grad_scale,
                keep_noise: bool) -> list:
    """Run the small rows that can share a batch program; the indices of the others (sorted).
    A group smaller than torch_noise.COMPILE_MIN_ELEMENTS is not worth a compilation."""
    if op == T.OP_NOISE:
        return list(range(len(rows)))
    groups: dict = {}
    rest = []
    for index, (row, group) in enumerate(zip(rows, _table_groups(ints, floats).tolist())):
        layout = None if group < 0 else _layout(row)
        if layout is None:
            rest.append(index)
        else:
            groups.setdefault((group, layout), []).append(index)
    numels = ints[:, T.I_NUMEL]
    for (_, layout), indices in groups.items():
        sizes = numels[indices]
        if sizes.sum() < torch_noise.COMPILE_MIN_ELEMENTS:
            rest.extend(indices)
            continue
        for batch in torch_noise.consecutive_runs(indices, sizes.tolist(), BATCH_ELEMENTS):
            if not _run_batch(op, layout, [rows[i] for i in batch], ints[batch], floats[batch], seed, grad_scale,
                              keep_noise):
                rest.extend(batch)
    return sorted(rest)


def _run_batch(op: int, layout: tuple, rows: list, ints: np.ndarray, floats: np.ndarray, seed: int,
               grad_scale, keep_noise: bool) -> bool:
    """The rows through their workspace and program; False (nothing of theirs written) where
    their shapes disagree or compiling fails."""
    params, grads, states, comps = zip(*rows)
    columns = [params, grads, *(None if column[0] is None else column for column in zip(*states)),
               None if comps[0] is None else comps]
    workspace = _workspace(params, columns, ints[:, T.I_NUMEL])
    if workspace is None:
        return False
    flags = int(ints[0, T.I_FLAGS])
    old_code = (flags >> T.FLAG_OLD_TYPE_SHIFT) & T.NOISE_TYPE_MASK
    new_code = (flags >> T.FLAG_NEW_TYPE_SHIFT) & T.NOISE_TYPE_MASK
    if ints[0, T.I_OLD_STEP] == 0:
        old_mode = OLD_NONE
    elif keep_noise and workspace.kept_key is not None and workspace.kept_key == _noise_key("old", ints, floats, seed):
        old_mode = OLD_KEPT
    else:
        old_mode = OLD_DRAWN
    param_dtype, device, *_ = layout
    config = ("batch", op, flags & T.UPDATE_FLAGS, old_mode, old_code if old_mode == OLD_DRAWN else None, new_code,
              param_dtype == torch.float64, *layout, grad_scale is not None)
    program = compiled(config, _batch_step)
    if program is None:
        return False
    kept = None
    if keep_noise:
        if workspace.kept is None:
            workspace.kept = torch.empty(workspace.segment.shape[0] * 4, dtype=torch.float32, device=device)
        kept = workspace.kept
    workspace.kept_key = None  # until the program has put the new noise there, it describes nothing
    try:
        for views, column in zip(workspace.views, columns):
            if column is not None:
                torch._foreach_copy_(views, column)
    except RuntimeError:  # a tensor on another device, say: the eager path says what is wrong
        return False
    buffers = workspace.buffers
    try:
        with torch.no_grad():
            program(buffers[0], buffers[1], buffers[2:-1], buffers[-1], torch.from_numpy(floats[0]).to(device),
                    workspace.segment, _segment_tables(ints, floats, seed, device), kept, grad_scale)
    except Exception as error:  # compiling failed (a compiler missing, an unsupported op): nothing ran
        fail(config, error)
        return False
    written = [0, *range(2, len(columns))] + ([1] if grad_scale is not None else [])  # unscaled grads go back
    targets, sources = [], []
    for index in written:
        if columns[index] is not None:
            targets.extend(columns[index])
            sources.extend(workspace.views[index])
    torch._foreach_copy_(targets, sources)
    if keep_noise:
        workspace.kept_key = _noise_key("new", ints, floats, seed)
    return True


def _segment_tables(ints: np.ndarray, floats: np.ndarray, seed: int, device) -> list:
    """torch_noise.segment_tables of the batch's members (whole quads), then the seed's two words."""
    mask = spec._MASK32
    tables = torch_noise.segment_tables(ints[:, T.I_NUMEL] // 4, ints[:, T.I_OFFSET] // 4, ints[:, T.I_KEY],
                                        ints[:, T.I_OLD_STEP], ints[:, T.I_NEW_STEP], floats[:, T.F_OLD_SCALE],
                                        floats[:, T.F_NEW_SCALE], device)
    words = torch.tensor([seed & mask, (seed >> 32) & mask], dtype=torch.int64, device=device)
    return [*tables, words[0], words[1]]
