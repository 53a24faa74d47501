"""One launch of one bucket's tables -- the call every launch goes through, whatever the
backend -- and the block tables it needs."""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from ...backends import tables as T

_MAX_CACHED_LAYOUTS = 32  # block tables kept per optimizer (one per bucket in steady state)


class BucketWork(NamedTuple):
    """One bucket's part of a step, as the full path (engine._prepare_work) and the steady path
    (steady.steady_work) hand it to the launches."""

    bucket: tuple  # (device, dtype)
    backend: object  # backends.Backend
    plan: object  # plan._BucketPlan
    grads: list  # the bucket's gradients, in its rows' order
    grad_pointers: list | None  # their addresses, where the steady path vouched for them


class BlockTables:
    """Block tables (tables.build_block_table) on the device, one per layout of row sizes and
    offsets, kept for the launches that are not a plan's own (the noise-only launch)."""

    def __init__(self):
        self._tables: dict = {}

    def get(self, backend, device: torch.device, ints: np.ndarray) -> torch.Tensor:
        """The block table of these rows' sizes and offsets on `device`."""
        numels = tuple(ints[:, T.I_NUMEL].tolist())
        offsets = tuple(ints[:, T.I_OFFSET].tolist())
        layout = (device, backend.name, numels, offsets)
        blocks = self._tables.get(layout)
        if blocks is None:
            if len(self._tables) >= _MAX_CACHED_LAYOUTS:  # layouts that keep changing
                self._tables.clear()
            array = T.build_block_table(numels, offsets, backend.block_size)
            blocks = self._tables[layout] = T.to_device(array, device)
        return blocks


def launch(backend, op: int, bucket, rows, ints: np.ndarray, floats: np.ndarray, seed: int, blocks=None,
           block_tables: BlockTables | None = None, *, commit_rows: int = 0, samples=None) -> None:
    """One launch over the rows of one bucket. `rows`: what the torch backend reads per row,
    or a function that makes them (the fused backends never need them); `blocks`: the block
    table, where the caller keeps it (else from `block_tables`); `commit_rows`, `samples`: see
    backends.Backend.launch."""
    if len(ints) == 0:
        return
    device, dtype = bucket
    if blocks is None and backend.block_size:
        blocks = block_tables.get(backend, device, ints)
    if not backend.host_tables:
        ints, floats = T.to_device(ints, device), T.to_device(floats, device)
    backend.launch(op, dtype, ints, floats, blocks, seed, rows=rows, commit_rows=commit_rows, samples=samples)
