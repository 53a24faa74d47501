"""Backends: the torch reference, the Triton kernel and the compiled (CPU / CUDA) libraries.

Every fused backend implements `FusedBackend`: it receives the launch tables of
`nvrm_ext.backends.tables` (already on the parameters' device) and performs the whole step for
one (device, dtype) bucket in one launch. The optimizers never see more than this seam.
"""
from __future__ import annotations

from typing import Protocol

import torch


class FusedBackend(Protocol):
    name: str
    block_size: int  # elements per block_table row this backend wants
    uses_alignment_flag: bool  # whether its kernel reads tables.FLAG_ALIGNED (else it may stay 0)

    def unavailable_reason(self, device: torch.device, dtype: torch.dtype) -> str | None:
        """None if this backend can run on (device, dtype), else a sentence saying why not."""

    def launch(self, op: int, dtype: torch.dtype, ints: torch.Tensor, floats: torch.Tensor,
               blocks: torch.Tensor, seed: int, *, commit_rows: int = 0,
               grad_scale: torch.Tensor | None = None, found_inf: torch.Tensor | None = None,
               samples: torch.Tensor | None = None) -> None:
        """One launch: apply `op` (tables.OP_*) to every row, then advance the live counters of
        the first commit_rows rows and copy the weight samples of the first len(samples) rows
        (tables.SAMPLE_SIZE). Tensors live on the device. Tables a kernel cannot run safely
        raise ValueError before anything changes, as far as the backend can read them (host
        tables: tables.check_table_contents)."""


def fused_backend(name: str) -> FusedBackend:
    """The fused backend called `name` ('triton', 'cpu' or 'cuda'), imported lazily."""
    if name == "triton":
        from .triton import TRITON
        return TRITON
    if name in ("cpu", "cuda"):
        from .compiled import compiled_backend
        return compiled_backend(name)
    raise ValueError(f"unknown fused backend {name!r}")
