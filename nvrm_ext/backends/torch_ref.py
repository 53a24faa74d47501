"""The 'torch' backend: docs/noise.md §7 in PyTorch ops, on any device.

It is the fallback where no fused backend runs (MPS, XPU, 'auto' without a kernel) and, in its
readable per-row form (TorchBackend(grouped=False), or NVRM_TORCH_COMPILE=0 for the noise), the
oracle the fused kernels are tested against. A step takes, in order: a compiled step program
per large tensor (torch_step: noise swap and update in one program, the previous noise kept),
a compiled batch program per group of small tensors that share their update (torch_batch), and
for the rest the batched noise (torch_noise) with the update as foreach operations over groups
of rows (torch_update). Every path runs the arithmetic of torch_math and the noise of
nvrm_ext.noise (float64 transforms), so they agree with each other (docs/noise.md §8).
"""
from __future__ import annotations

import numpy as np
import torch

from .. import noise as spec
from . import tables as T
from . import torch_batch, torch_noise, torch_step
from .torch_math import update_one
from .torch_update import run_grouped


def _noise_deltas(rows, ints, floats, seed: int) -> list:
    """Per row, n_new - n_old laid out like the row's parameter (None where neither step
    carries noise): one batch per (old type, new type) of up to torch_batch.BATCH_ELEMENTS elements, not
    one draw per tensor (torch_noise)."""
    by_types: dict = {}
    for index, ((param, _, _, _), ints_row, floats_row) in enumerate(zip(rows, ints, floats)):
        flags = int(ints_row[T.I_FLAGS])
        old = _side(ints_row[T.I_OLD_STEP], flags >> T.FLAG_OLD_TYPE_SHIFT, floats_row[T.F_OLD_SCALE])
        new = _side(ints_row[T.I_NEW_STEP], flags >> T.FLAG_NEW_TYPE_SHIFT, floats_row[T.F_NEW_SCALE])
        if old[0] != 0 or new[0] != 0:
            member = (int(ints_row[T.I_KEY]), int(ints_row[T.I_OFFSET]), param.numel(), old, new)
            types = (old[1], new[1], param.device, param.dtype == torch.float64)  # float64: delta in float64
            by_types.setdefault(types, []).append((index, member))
    out = [None] * len(rows)
    for (_, _, device, wide), indexed in by_types.items():
        sizes = [member[2] for _, member in indexed]
        for batch in torch_noise.consecutive_runs(indexed, sizes, torch_batch.BATCH_ELEMENTS):
            deltas = torch_noise.noise_differences(seed, [member for _, member in batch], device, wide=wide)
            for (index, _), delta in zip(batch, deltas):
                out[index] = spec.from_memory_order(delta, rows[index][0])
    return out


def _side(step, type_bits, scale):
    """(step, noise type, scale) of one side of a row's noise swap (type None at step 0: no noise)."""
    step = int(step)
    return step, spec.NOISE_TYPES[int(type_bits) & T.NOISE_TYPE_MASK] if step else None, scale


class TorchBackend:
    """Reads the same launch tables the fused kernels read. `grouped` (the default) runs the
    update as a few foreach operations over groups of rows (torch_update); without it, the
    per-row loop below, which states the arithmetic plainly (same bits, slower)."""

    name = "torch"
    block_size = 0  # it loops over the rows: no block table
    uses_alignment_flag = False
    writes_through_addresses = False  # in-place torch ops advance the version counters themselves
    host_tables = True
    capturable = False  # it reads the counters and the tables on the host

    def __init__(self, grouped: bool = True):
        self.grouped = grouped

    def unavailable_reason(self, device: torch.device, dtype: torch.dtype) -> str | None:
        return None  # plain torch ops run wherever torch does

    def launch(self, op: int, dtype: torch.dtype, ints, floats, blocks, seed: int, *, rows, live=None,
               commit_rows: int = 0, grad_scale: torch.Tensor | None = None,
               found_inf: torch.Tensor | None = None, samples: torch.Tensor | None = None) -> None:
        """The Backend interface (nvrm_ext.backends): run() over `rows` (or what the function
        `rows` makes). `blocks` is not read; the counters are committed into `live` when given
        (commit_rows is what a fused kernel reads instead); `samples` must be None: the caller
        gathers this backend's samples from the parameters (tables.sample_view)."""
        if samples is not None:
            raise ValueError("the torch backend copies no weight samples; gather them with tables.sample_view")
        self.run(op, rows() if callable(rows) else rows, ints, floats, seed, live=live,
                 grad_scale=grad_scale, found_inf=found_inf)

    @torch.no_grad()
    def run(self, op: int, rows: list, ints, floats, seed: int, *, live: torch.Tensor | None = None,
            grad_scale: torch.Tensor | None = None, found_inf: torch.Tensor | None = None) -> None:
        """rows: (param, grad, states, compensation) per table row; ints / floats: the tables
        (numpy, or tensors on any device). Capturable mode passes `live`, the counters the
        fused kernels resolve and commit; here they are read to the host (a sync) and the
        same resolve / commit (tables.resolve_rows / commit_rows) runs in numpy."""
        if found_inf is not None and found_inf.item() != 0:
            return  # a skipped step: nothing changes
        ints, floats = (t.cpu().numpy().copy() if isinstance(t, torch.Tensor) else t for t in (ints, floats))
        if live is not None:
            counters = live.cpu().numpy().copy()
            T.resolve_rows(op, ints, floats, counters)
        scale = None if grad_scale is None else grad_scale.item()
        float_rows = floats.tolist()
        # the readable per-row path (grouped=False) takes no compiled step program
        rest = list(range(len(rows)))
        if self.grouped:
            scale_tensor = None if grad_scale is None else grad_scale.reshape(())
            rest = self._run_step_programs(op, rows, ints, float_rows, seed, scale_tensor)
            rest = [rest[i] for i in torch_batch.run_batches(op, [rows[i] for i in rest], ints[rest], floats[rest],
                                                             seed, scale_tensor, torch_step.cache_enabled())]
        rows, rest_ints, rest_floats = [rows[i] for i in rest], ints[rest], [float_rows[i] for i in rest]
        deltas = _noise_deltas(rows, rest_ints, rest_floats, seed)
        if self.grouped:
            run_grouped(op, rows, rest_ints[:, T.I_FLAGS].tolist(), rest_floats, deltas, scale)
        else:
            self._run_rows(op, rows, rest_ints, rest_floats, deltas, scale)
        if live is not None:
            T.commit_rows(ints, floats, counters)
            live.copy_(torch.from_numpy(counters))

    @staticmethod
    def _run_step_programs(op: int, rows: list, ints, float_rows: list, seed: int, grad_scale) -> list:
        """Run the rows a compiled step program takes (torch_step: large tensors); the indices
        of the others. Their parameters' kept noise is forgotten: their weights change without it."""
        cache = torch_step.PREVIOUS_NOISE if torch_step.cache_enabled() else None
        large = np.flatnonzero(ints[:, T.I_NUMEL] >= torch_step.STEP_MIN_ELEMENTS).tolist()
        taken = {index for index in large
                 if torch_step.try_step(op, rows[index], ints[index], float_rows[index], seed, grad_scale, cache)}
        rest = [index for index in range(len(rows)) if index not in taken]
        if cache is not None and len(cache):
            for index in rest:
                cache.forget(rows[index][0])
        return rest

    def _run_rows(self, op, rows, ints, float_rows, deltas, scale) -> None:
        for (param, grad, states, comp), ints_row, float_row, delta in zip(rows, ints, float_rows, deltas):
            self._run_one(op, param, grad, states, comp, int(ints_row[T.I_FLAGS]), float_row, delta, scale)

    def _run_one(self, op, param, grad, states, comp, flags, f, delta, scale=None) -> None:
        update_one(op, param, grad, states, comp, flags, f, delta, scale)


TORCH = TorchBackend()
