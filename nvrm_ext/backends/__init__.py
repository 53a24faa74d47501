"""Backends: the torch reference, the Triton kernel and the compiled (CPU / CUDA) libraries.

Every backend implements `Backend`: it receives the launch tables of `nvrm_ext.backends.tables`
and performs the whole step for one (device, dtype) bucket in one launch. The fused backends
read the tables on the parameters' device through raw addresses; the torch reference
(torch_ref.TORCH) reads them on the host together with the rows' tensors, which the callers
always pass (`rows=`) and the fused backends ignore. The optimizers never see more than this seam.
"""
from __future__ import annotations

from typing import Protocol

import torch


class Backend(Protocol):
    name: str
    block_size: int  # elements per block_table row this backend wants (0: it reads no block table)
    uses_alignment_flag: bool  # whether its kernel reads tables.FLAG_ALIGNED (else it may stay 0)
    # whether it writes the tensors through raw addresses, so that the caller must advance their
    # autograd version counters (torch's in-place ops advance their own)
    writes_through_addresses: bool
    host_tables: bool  # whether it reads the tables as host arrays (else tensors on the device)
    capturable: bool  # whether its launch can be captured in a CUDA graph (reads nothing on the host)

    def unavailable_reason(self, device: torch.device, dtype: torch.dtype) -> str | None:
        """None if this backend can run on (device, dtype), else a sentence saying why not."""

    def launch(self, op: int, dtype: torch.dtype, ints: torch.Tensor, floats: torch.Tensor,
               blocks: torch.Tensor | None, seed: int, *, rows=None, live: torch.Tensor | None = None,
               commit_rows: int = 0, grad_scale: torch.Tensor | None = None,
               found_inf: torch.Tensor | None = None, samples: torch.Tensor | None = None) -> None:
        """One launch: apply `op` (tables.OP_*) to every row, then advance the live counters of
        the first commit_rows rows and copy the weight samples of the first len(samples) rows
        (tables.SAMPLE_SIZE). `rows`: (param, grad, states, compensation) per row, or a function
        that makes them; `live`: the capturable counters ([rows, LIVE_COLUMNS] float64) the
        ints' I_LIVE column points into -- read by the torch reference, which has no raw
        addresses, ignored by the fused kernels. Tables a kernel cannot run safely raise
        ValueError before anything changes, as far as the backend can read them (host tables:
        tables.check_table_contents)."""


FusedBackend = Backend  # the name this seam had before the torch reference joined it


def fused_backend(name: str) -> Backend:
    """The fused backend called `name` ('triton', 'cpu' or 'cuda'), imported lazily."""
    if name == "triton":
        from .triton import TRITON
        return TRITON
    if name in ("cpu", "cuda"):
        from .compiled import compiled_backend
        return compiled_backend(name)
    raise ValueError(f"unknown fused backend {name!r}")
