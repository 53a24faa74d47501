"""How the noise engine sees a parameter: its local shard (a DTensor's, under FSDP2), the global
index of its first element (the noise follows it), its 16-bit compensation buffer, whether its
memory is dense, and whether a CUDA graph is being captured around it."""
from __future__ import annotations

import math

import numpy as np
import torch

from .. import _compiler, noise as spec


def _is_dense(t: torch.Tensor) -> bool:
    """Non-overlapping and dense: its elements fill its storage span exactly once."""
    if t.is_contiguous():
        return True
    expected = 1
    for d in reversed(spec.memory_order_permutation(t)):
        if t.size(d) != 1 and t.stride(d) != expected:
            return False
        expected *= t.size(d)
    return True


def _fp32(values) -> tuple:
    """Round host-computed (float64) constants to float32 once, as the kernels will see them."""
    return tuple(np.asarray(values, dtype=np.float32).tolist())


def _dtensor_type():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return ()
    return DTensor


_DTENSOR = None


def _is_dtensor(t) -> bool:
    global _DTENSOR
    if _DTENSOR is None:
        _DTENSOR = _dtensor_type()
    return isinstance(t, _DTENSOR)


def _local(t):
    """The local shard of a DTensor (FSDP2), the tensor itself otherwise (None stays None)."""
    return t.to_local() if _is_dtensor(t) else t


_COMPENSATED_DTYPES = (torch.float16, torch.bfloat16)


def _compensation(p, state):
    """The compensation buffer of a 16-bit parameter (created on first use), else None.

    Adding and subtracting noise in an 8- or 11-bit mantissa would round the clean weights
    away (w + n - n != w); the buffer keeps what each rounding dropped, so the weight is
    param + compensation, exact to about twice the storage precision (2 bytes per parameter).
    """
    if p.dtype not in _COMPENSATED_DTYPES:
        return None
    if "compensation" not in state:
        state["compensation"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    return state["compensation"]


def _global_offset(p) -> int:
    """Global index of the first local element: noise follows the global element index, so a
    sharded run draws exactly the unsharded run's noise. Supports shards along dim 0
    (FSDP2's layout) and replication."""
    if not _is_dtensor(p):
        return 0
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    if any(isinstance(pl, Shard) and pl.dim != 0 for pl in p.placements):
        raise ValueError(f"DTensor parameters sharded along a dimension other than 0 are not "
                         f"supported (placements {p.placements}); FSDP2's default is Shard(0)")
    _, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    return int(offset[0]) * math.prod(p.shape[1:]) if p.dim() else 0


def _capture_underway() -> bool:
    """Whether a CUDA graph is being captured on the current stream (the check of torch.optim's
    _cuda_graph_capture_health_check)."""
    return (torch.backends.cuda.is_built() and torch.cuda.is_available() and not _compiler.is_compiling()
            and torch.cuda.is_current_stream_capturing())


def _refuse_capture(why: str) -> None:
    """Raise before anything changes if a CUDA graph is being captured on the current stream."""
    if _capture_underway():
        raise RuntimeError(f"CUDA graph capture of {why}")


def _capturing(device: torch.device) -> bool:
    """Whether a CUDA graph is being captured on the current stream of `device`."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _number(value):
    """A bookkeeping value as a Python number (a live counter view is read from the device)."""
    return value.item() if isinstance(value, torch.Tensor) else value


def _pinned_like(*tensors) -> tuple:
    """Page-locked host buffers shaped like `tensors` (for copies captured in a CUDA graph)."""
    return tuple(torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in tensors)
