"""Which backend runs one (device, dtype) bucket: the one resolver of the NVRM optimizers and
FusedAMP.

Both offer the same choice -- 'torch' (the plain-torch reference), 'auto' (the fastest backend
that can run there, else the reference) or a fused backend by name (an error if it cannot run
there) -- over their own set of backends: the NVRM step kernels (backends.fused_backend) and
the AMP perturbation kernels (ops.amp_triton).
"""
from __future__ import annotations

import functools
import logging
import warnings
from typing import Callable, Iterable

import torch

NVRM_BACKENDS = ("auto", "torch", "triton", "cpu", "cuda")  # backend= of FusedVSGD / FusedVAdam
AMP_BACKENDS = ("auto", "torch", "triton")  # backend= of FusedAMP (its perturbation engine)
FUSED_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)  # what the fused NVRM kernels store


@functools.lru_cache(maxsize=None)
def warn_once(message: str) -> None:
    """A RuntimeWarning shown once per process: a slower backend is a fact of the machine, not
    of each step."""
    warnings.warn(message, RuntimeWarning, stacklevel=4)


@functools.lru_cache(maxsize=None)
def note_once(message: str) -> None:
    """An INFO record of the 'nvrm_ext' logger, once per process: what 'auto' chose where the
    choice is the best the machine allows -- worth finding (logging.basicConfig(level=logging.INFO)),
    not worth a warning at every start."""
    logging.getLogger("nvrm_ext").info(message)


def rocm() -> bool:
    """Whether this torch is built for ROCm: its 'cuda' devices are then AMD GPUs, which Triton
    compiles for and the CUDA library (NVIDIA code) cannot run."""
    return bool(getattr(torch.version, "hip", None))


def rocm_cuda_library_reason() -> str:
    """Why backend='cuda' cannot run under ROCm, and what runs instead."""
    return (f"this torch is built for ROCm (HIP {torch.version.hip}): its 'cuda' devices are AMD GPUs, "
            "and the CUDA library holds NVIDIA code only; use backend='triton' (what backend='auto' picks there)")


def resolve(name: str, device: torch.device, dtype: torch.dtype, *, reference, load: Callable,
            auto: Iterable[str], unavailable: Callable | None = None, warn_dtypes: tuple = ()):
    """The backend object for parameters of `dtype` on `device`.

    name: 'torch' gives `reference`; 'auto' the first of the names `auto` whose `load(name)`
    succeeds and that can run here, else `reference` (with a warning saying why when `dtype` is
    in `warn_dtypes`, and when a faster candidate was passed over); any other name gives
    `load(name)`, or a RuntimeError saying why it cannot run here. `unavailable(backend)`: None
    if it can run here, else why not (default: backend.unavailable_reason(device, dtype))."""
    if unavailable is None:
        unavailable = lambda backend: backend.unavailable_reason(device, dtype)  # noqa: E731
    if name == "torch":
        return reference
    if name == "auto":
        reasons = []
        for candidate in auto:
            try:
                backend = load(candidate)
            except ImportError as error:
                reasons.append(f"{candidate}: {error}")
                continue
            reason = unavailable(backend)
            if reason is None:
                if reasons and warn_dtypes:  # a faster backend could not run here: say why, and the fix
                    warn_once(f"nvrm_ext: backend='auto' uses '{candidate}' for {dtype} parameters "
                              f"on {device}, not {'; '.join(reasons)}")
                return backend
            reasons.append(f"{candidate}: {reason}")
        if reasons and dtype in warn_dtypes:
            warn_once(f"nvrm_ext: no fused backend for {dtype} parameters on {device.type} "
                      f"({'; '.join(reasons)}); using the much slower 'torch' backend")
        return reference
    try:
        backend = load(name)
    except ImportError as error:
        raise RuntimeError(f"backend={name!r} is not available: {error}") from error
    reason = unavailable(backend)
    if reason is not None:
        raise RuntimeError(f"backend={name!r} cannot run {dtype} parameters on {device}: {reason}")
    return backend


def nvrm_backend(name: str, device: torch.device, dtype: torch.dtype):
    """The NVRM step backend for one bucket: TORCH (backends.torch_ref) or a fused backend;
    'auto' prefers the CUDA library, then Triton, on an NVIDIA GPU, Triton on an AMD GPU (ROCm's
    'cuda' devices: the CUDA library is not even loaded) and the CPU library on the CPU."""
    from . import fused_backend
    from .torch_ref import TORCH

    on_amd = device.type == "cuda" and rocm()
    auto = (("triton",) if on_amd else ("cuda", "triton")) if device.type == "cuda" \
        else ("cpu",) if device.type == "cpu" else ()
    backend = resolve(name, device, dtype, reference=TORCH, load=fused_backend, auto=auto, warn_dtypes=FUSED_DTYPES)
    if on_amd and name == "auto" and backend.name == "triton":
        note_once(f"nvrm_ext: ROCm (HIP {torch.version.hip}): backend='auto' runs the Triton kernels on the "
                  f"AMD GPUs (the CUDA library is for NVIDIA GPUs)")
    return backend

