"""Where the project's Triton kernels can run -- one answer for all of them -- and on which device.

CUDA tensors always; CPU tensors only in Triton's interpreter, which must be switched on
(TRITON_INTERPRET=1) before triton is first imported.
"""
from __future__ import annotations

import contextlib
import os

import torch
import triton.language as tl

INTERPRETING = os.environ.get("TRITON_INTERPRET", "") not in ("", "0")
TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def unavailable_reason(device: torch.device, dtype: torch.dtype, what: str, dtypes=TL_DTYPES) -> str | None:
    """None if `what` (e.g. "the Triton kernel"), which handles `dtypes`, can run on (device, dtype),
    else why not."""
    if dtype not in dtypes:
        names = [str(d).removeprefix("torch.") for d in dtypes]
        return f"{what} handles {', '.join(names[:-1])} and {names[-1]} tensors, not {dtype}"
    if device.type == "cuda" or (device.type == "cpu" and INTERPRETING):
        return None
    if device.type == "cpu":
        return ("Triton runs CPU tensors only in its interpreter: set TRITON_INTERPRET=1 "
                "before triton is imported (slow; meant for testing)")
    return f"Triton does not run on {device.type} tensors"


def device_guard(device: torch.device):
    """Make `device` current for a Triton launch, which runs on the current CUDA device and its
    current stream, not on its tensors' device. A no-op (no CUDA call) when it already is
    current, and for CPU tensors (the interpreter)."""
    if device.type == "cuda" and device.index is not None and device.index != torch.cuda.current_device():
        return torch.cuda.device(device)
    return contextlib.nullcontext()
