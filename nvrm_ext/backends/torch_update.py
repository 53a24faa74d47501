"""The 'torch' backend's update as a few large operations over groups of rows.

Same arithmetic as torch_math's per-tensor `update_one` (the readable statement of it), the same
single binary ops on the same operands in the same precision, so the same bits; only the
order of work differs. Rows that share everything the arithmetic branches on (op, flags,
dtypes, device, which tensors are present, the float coefficients) form a group; a group's
small rows are copied into flat batches (one `cat` each, written back with one foreach copy)
and its large rows are worked on where they lie. Each step of the arithmetic is then one
`torch._foreach_*` call (or one op per batch) over the group instead of one Python-level op
per row: on 2,000 small tensors the per-tensor Python and dispatch cost was the whole update.

Temporaries are updated in place where the op is commutative (IEEE add and mul are, bit for
bit, except which NaN payload survives when both operands are NaN, which ATen's own kernels do
not pin either) or where the operand order is kept; the parameter itself is updated in place
when it is already in the math dtype, so a large float32 row costs few passes over memory.
"""
from __future__ import annotations

import torch
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from . import tables as T
from .torch_noise import consecutive_runs
from .torch_math import _math_dtype, _sqrt_rn

# rows of at least this many elements are updated where they lie; smaller ones are batched
LARGE_ROW_ELEMENTS = 1 << 16
CHUNK_ELEMENTS = 1 << 18  # the work done from start to end at a time: temporaries stay small


def _dtype(tensor):
    return None if tensor is None else tensor.dtype


def run_grouped(op: int, rows, flags_per_row, float_rows, deltas, scale) -> None:
    """rows: (param, grad, states, compensation); flags and float coefficients per row; deltas:
    n_new - n_old shaped like each parameter, or None; scale: GradScaler's scale, or None."""
    groups: dict = {}
    for index, ((param, grad, states, comp), flags, floats, delta) in enumerate(
            zip(rows, flags_per_row, float_rows, deltas)):
        key = (flags & T.UPDATE_FLAGS, param.dtype, param.device, _dtype(grad), tuple(map(_dtype, states)),
               _dtype(comp), _dtype(delta), tuple(floats[:T.F_OLD_SCALE]))
        groups.setdefault(key, []).append(index)
    for key, indices in groups.items():
        _run_group(op, key[0], [rows[i] for i in indices], [deltas[i] for i in indices],
                   float_rows[indices[0]], scale)


class _Units:
    """A group's rows as work units: flat batches of small rows and large rows on their own.
    `gather` gives one tensor per unit in the math dtype (a flat copy, or the row's tensor where
    it already is in the math dtype: a view, written through); `scatter` writes units back."""

    def __init__(self, members, math_dtype):
        self.members = members  # per unit, its rows
        self.math_dtype = math_dtype

    def tensors(self, pick):
        """Per unit, the list of its rows' tensors picked by pick(row) (None if the first is None)."""
        out = [[pick(row) for row in unit] for unit in self.members]
        return None if out[0][0] is None else out

    def gather(self, per_unit, copy: bool = False):
        """One math-dtype tensor per unit: a row alone is itself (converted if needed, copied if
        `copy`), a batch a flat copy. Returns (tensors, written_through): the latter True where
        the tensor is the row's own memory, so in-place updates need no write-back."""
        if per_unit is None:
            return None, None
        out, through = [], []
        for tensors in per_unit:
            tensor = tensors[0] if len(tensors) == 1 else _flatten_dense_tensors(tensors)
            converted = tensor.to(self.math_dtype, copy=copy and len(tensors) == 1)
            out.append(converted)
            through.append(len(tensors) == 1 and converted is tensors[0])
        return out, through

    def scatter(self, targets_per_unit, values, through=None) -> None:
        """Copies each unit's value into its rows' tensors (rounding to their dtype), skipping
        units whose value is already the row's memory."""
        targets, sources = [], []
        for unit, (tensors, value) in enumerate(zip(targets_per_unit, values)):
            if through is not None and through[unit]:
                continue
            if len(tensors) == 1:
                targets.append(tensors[0])
                sources.append(value)
            else:
                targets.extend(tensors)
                sources.extend(_unflatten_dense_tensors(value, tensors))
        if targets:
            torch._foreach_copy_(targets, sources)


def _chunks(rows):
    """The group's rows as work units (a large row alone, small rows in flat batches), in chunks
    of at most CHUNK_ELEMENTS elements (a larger unit alone): each chunk runs the arithmetic from
    start to end, so its temporaries are few, small and reused by the allocator."""
    units, batch, size = [], [], 0
    for row in rows:
        numel = row[0].numel()
        if numel >= LARGE_ROW_ELEMENTS:
            units.append((numel, [row]))
            continue
        if batch and size + numel > CHUNK_ELEMENTS:
            units.append((size, batch))
            batch, size = [], 0
        batch.append(row)
        size += numel
    if batch:
        units.append((size, batch))
    yield from consecutive_runs([unit for _, unit in units], [numel for numel, _ in units], CHUNK_ELEMENTS)


def _run_group(op, flags, rows, deltas, f, scale) -> None:
    math_dtype = _math_dtype(rows[0][0].dtype)
    for chunk in _chunks([(*row, delta) for row, delta in zip(rows, deltas)]):
        _run_chunk(op, flags, _Units(chunk, math_dtype), f, scale)


def _run_chunk(op, flags, units, f, scale) -> None:
    param_dtype = units.members[0][0][0].dtype
    math_dtype = units.math_dtype
    params = units.tensors(lambda row: row[0])
    comps = units.tensors(lambda row: row[3])
    p, p_through = units.gather(params, copy=comps is not None)  # with comp: never the param itself
    if comps is not None:  # 16-bit parameters: the weight is param + comp
        torch._foreach_add_(p, units.gather(comps)[0])
    if op != T.OP_NOISE:
        grads = units.tensors(lambda row: row[1])
        g, _ = units.gather(grads)
        if scale is not None:  # GradScaler's fused protocol: unscale, round, write back
            g = [torch.div(x, scale) for x in g]
            units.scatter(grads, g)
            g, _ = units.gather(grads)
        states = [units.tensors(lambda row, k=k: row[2][k]) for k in range(len(units.members[0][0][2]))]
        gathered = [units.gather(s) for s in states]
        state_values = [values for values, _ in gathered]
        (_sgd if op == T.OP_SGD else _adam)(p, g, flags, f, state_values)
        for targets, (values, through) in zip(states, gathered):
            if values is not None:
                units.scatter(targets, values, through)
    delta = units.tensors(lambda row: row[4])
    if delta is not None:  # n_new - n_old (torch_noise)
        torch._foreach_add_(p, units.gather(delta)[0])
    if comps is not None:  # keep what rounding to the storage type drops
        stored = [x.to(param_dtype) for x in p]
        torch._foreach_sub_(p, [x.to(math_dtype) for x in stored])
        units.scatter(comps, p)
        units.scatter(params, stored)
    else:
        units.scatter(params, p, p_through)


def _weight_decayed(g, p, weight_decay):
    """g + weight_decay * p as a new list (a temporary the caller may update in place)."""
    decayed = torch._foreach_mul(p, weight_decay)
    torch._foreach_add_(decayed, g)  # commutative: the same bits as g + decayed
    return decayed


def _sgd(p, g, flags, f, states) -> None:
    """torch_math._sgd on lists, p updated in place; d_is_temp tracks whether d may be overwritten."""
    d, d_is_temp = g, False
    if flags & T.FLAG_WEIGHT_DECAY:
        d, d_is_temp = _weight_decayed(g, p, f[T.F_WEIGHT_DECAY]), True
    if flags & T.FLAG_MOMENTUM:
        buf = states[0]
        if flags & T.FLAG_MOMENTUM_INIT:
            torch._foreach_copy_(buf, d)
        else:
            torch._foreach_mul_(buf, f[T.F_MOMENTUM])
            keep_d = flags & T.FLAG_NESTEROV or not d_is_temp
            scaled = torch._foreach_mul(d, f[T.F_MOMENTUM_COEF]) if keep_d else d
            if not keep_d:
                torch._foreach_mul_(scaled, f[T.F_MOMENTUM_COEF])
            torch._foreach_add_(buf, scaled)  # momentum * buf + coef * d, in that order
        if flags & T.FLAG_NESTEROV:
            pushed = torch._foreach_mul(buf, f[T.F_MOMENTUM])
            if d_is_temp:
                torch._foreach_add_(d, pushed)
            else:
                d, d_is_temp = torch._foreach_add(d, pushed), True
        else:
            d, d_is_temp = buf, False
    if d_is_temp:
        torch._foreach_mul_(d, f[T.F_LR])
        step = d
    else:
        step = torch._foreach_mul(d, f[T.F_LR])
    torch._foreach_sub_(p, step)


def _adam(p, g, flags, f, states) -> None:
    """torch_math._adam on lists, p and the states updated in place."""
    if flags & T.FLAG_DECOUPLED:
        torch._foreach_mul_(p, f[T.F_DECAY])
    else:
        g = _weight_decayed(g, p, f[T.F_WEIGHT_DECAY])
    exp_avg, exp_avg_sq, max_exp_avg_sq = states
    torch._foreach_mul_(exp_avg, f[T.F_MOMENTUM])
    torch._foreach_add_(exp_avg, torch._foreach_mul(g, f[T.F_MOMENTUM_COEF]))
    squared = torch._foreach_mul(g, f[T.F_BETA2_COEF])
    torch._foreach_mul_(squared, g)  # (coef * g) * g
    torch._foreach_mul_(exp_avg_sq, f[T.F_BETA2])
    torch._foreach_add_(exp_avg_sq, squared)
    v = exp_avg_sq
    if flags & T.FLAG_AMSGRAD:  # torch_math._adam's NaN rule: the NaN operand itself
        for vmax, value in zip(max_exp_avg_sq, exp_avg_sq):
            torch.where((vmax > value) | vmax.isnan(), vmax, value, out=vmax)
        v = max_exp_avg_sq
    denom = [_sqrt_rn(x) for x in v]
    for x in denom:  # a division per unit, as the per-row path: no reciprocal-multiply foreach form
        x.div_(f[T.F_SQRT_BC2])
    torch._foreach_add_(denom, f[T.F_EPS])
    ratio = [torch.div(m, d) for m, d in zip(exp_avg, denom)]
    torch._foreach_mul_(ratio, f[T.F_STEP_SIZE])
    torch._foreach_sub_(p, ratio)
