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

    def unavailable_reason(self, device: torch.device, dtype: torch.dtype) -> str | None:
        """None if this backend can run on (device, dtype), else a sentence saying why not."""

    def launch(self, op: int, dtype: torch.dtype, ints: torch.Tensor, floats: torch.Tensor,
               blocks: torch.Tensor, seed: int) -> None:
        """One launch: apply `op` (tables.OP_*) to every row. Tensors live on the device."""


def fused_backend(name: str) -> FusedBackend:
    """The fused backend called `name` ('triton', 'cpu' or 'cuda'), imported lazily."""
    if name == "triton":
        from .triton import TRITON
        return TRITON
    if name in ("cpu", "cuda"):
        from .compiled import compiled_backend
        return compiled_backend(name)
    raise ValueError(f"unknown fused backend {name!r}")
