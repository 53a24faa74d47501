"""Adversarial model perturbation (FusedAMP): clip + perturb and restore as multi-tensor Triton launches.

One launch covers every tensor of a (device, dtype) bucket. Its pointer table holds, per tensor,
the addresses of the parameter, of its unperturbed copy, of the source of the perturbation (the
gradient, or the accumulated perturbation of an earlier inner iteration) and of the source's L2
norm, which `torch._foreach_norm` wrote on the device. The clip factor
``min(1, epsilon / (scale * norm + tiny)) * scale`` is computed inside the kernel, so no value
ever travels to the host.

The float math follows `nvrm_ext.optim.amp.TorchAMPEngine` operation for operation (no fp
contraction), so for float32 parameters both paths give the same bits.

Runs on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1 (set before triton is imported).
"""
from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

from ..backends import triton_support
from ..backends import tables as T
from ..backends.tables import build_block_table, to_device

BLOCK = 1024

# int64 pointer-table columns (one row per tensor). The column names are tl.constexpr, so the
# kernels read them as compile-time constants (and numpy indexes with them); the row strides
# INT_COLUMNS / FLOAT_COLUMNS are plain ints, passed to the kernels as constexpr parameters.
# the block table's columns (tables.py)
B_ROW = tl.constexpr(T.B_ROW)
B_START = tl.constexpr(T.B_START)
BLOCK_COLUMNS = tl.constexpr(T.BLOCK_COLUMNS)
I_PARAM = tl.constexpr(0)        # the parameter, overwritten with theta + delta (perturb) or theta (restore)
I_UNPERTURBED = tl.constexpr(1)  # theta: written by the first perturbation of a step, read afterwards
I_SOURCE = tl.constexpr(2)       # what delta is proportional to: the gradient or the accumulated perturbation
I_NORM = tl.constexpr(3)         # float32 scalar: the source's L2 norm
I_NUMEL = tl.constexpr(4)
INT_COLUMNS = 5

# float32 table columns
F_EPSILON = tl.constexpr(0)      # radius of the perturbation ball of this tensor
F_SCALE = tl.constexpr(1)        # delta = clip(scale * source): inner_lr for a gradient, 1 otherwise
FLOAT_COLUMNS = 2

_TL_DTYPES = triton_support.TL_DTYPES
SUPPORTED_DTYPES = tuple(_TL_DTYPES)


@triton.jit
def _clip_and_perturb_kernel(blocks, ints, floats, tiny, FIRST: tl.constexpr, DTYPE: tl.constexpr,
                             BLOCK: tl.constexpr, INT_COLUMNS: tl.constexpr,
                             FLOAT_COLUMNS: tl.constexpr):
    """param = base + min(1, eps / (scale * norm + tiny)) * scale * source, per tensor.

    FIRST: base is the parameter itself (theta), which is also saved as the unperturbed copy;
    otherwise base is the saved copy, so a later inner iteration replaces the old perturbation.
    """
    pid = tl.program_id(0).to(tl.int64)
    row = tl.load(blocks + BLOCK_COLUMNS * pid + B_ROW)
    start = tl.load(blocks + BLOCK_COLUMNS * pid + B_START)
    irow = ints + row * INT_COLUMNS
    frow = floats + row * FLOAT_COLUMNS
    numel = tl.load(irow + I_NUMEL)
    index = start + tl.arange(0, BLOCK).to(tl.int64)
    mask = index < numel

    norm = tl.load(tl.load(irow + I_NORM).to(tl.pointer_type(tl.float32)))
    epsilon = tl.load(frow + F_EPSILON)
    scale = tl.load(frow + F_SCALE)
    denominator = scale * norm + tiny
    factor = tl.minimum(epsilon * tl.div_rn(1.0, denominator), 1.0) * scale

    source = tl.load(tl.load(irow + I_SOURCE).to(tl.pointer_type(DTYPE)) + index, mask=mask, other=0.0)
    delta = (factor * source.to(tl.float32)).to(DTYPE)
    param_ptr = tl.load(irow + I_PARAM).to(tl.pointer_type(DTYPE))
    unperturbed_ptr = tl.load(irow + I_UNPERTURBED).to(tl.pointer_type(DTYPE))
    if FIRST:
        base = tl.load(param_ptr + index, mask=mask, other=0.0)
        tl.store(unperturbed_ptr + index, base, mask=mask)
    else:
        base = tl.load(unperturbed_ptr + index, mask=mask, other=0.0)
    tl.store(param_ptr + index, (base.to(tl.float32) + delta.to(tl.float32)).to(DTYPE), mask=mask)


@triton.jit
def _restore_kernel(blocks, ints, DTYPE: tl.constexpr, BLOCK: tl.constexpr, INT_COLUMNS: tl.constexpr):
    """param = unperturbed copy: theta comes back bit for bit."""
    pid = tl.program_id(0).to(tl.int64)
    row = tl.load(blocks + BLOCK_COLUMNS * pid + B_ROW)
    start = tl.load(blocks + BLOCK_COLUMNS * pid + B_START)
    irow = ints + row * INT_COLUMNS
    numel = tl.load(irow + I_NUMEL)
    index = start + tl.arange(0, BLOCK).to(tl.int64)
    mask = index < numel
    unperturbed = tl.load(tl.load(irow + I_UNPERTURBED).to(tl.pointer_type(DTYPE)) + index, mask=mask)
    tl.store(tl.load(irow + I_PARAM).to(tl.pointer_type(DTYPE)) + index, unperturbed, mask=mask)


def unavailable_reason(device: torch.device, dtype: torch.dtype) -> str | None:
    """None if the kernels can run on (device, dtype), else a sentence saying why not."""
    return triton_support.unavailable_reason(device, dtype, "the Triton AMP kernels")


class TritonAMPEngine:
    """The Triton twin of `nvrm_ext.optim.amp.TorchAMPEngine` (same methods, same math)."""

    name = "triton"

    def __init__(self):
        self._block_tables: dict = {}

    @staticmethod
    def unavailable_reason(device: torch.device, dtype: torch.dtype) -> str | None:
        return unavailable_reason(device, dtype)

    def _blocks(self, device: torch.device, numels: tuple) -> torch.Tensor:
        """Block table (tensor row, first element) for these sizes, cached per layout."""
        key = (device, numels)
        blocks = self._block_tables.get(key)
        if blocks is None:
            array = build_block_table(list(numels), [0] * len(numels), BLOCK)
            blocks = self._block_tables[key] = to_device(array, device)
        return blocks

    @staticmethod
    def _pointer_table(params, unperturbed, sources=None, norms=None) -> np.ndarray:
        ints = np.zeros((len(params), INT_COLUMNS), dtype=np.int64)
        for row, (p, u) in enumerate(zip(params, unperturbed)):
            ints[row, I_PARAM] = p.data_ptr()
            ints[row, I_UNPERTURBED] = u.data_ptr()
            ints[row, I_NUMEL] = p.numel()
            if sources is not None:
                ints[row, I_SOURCE] = sources[row].data_ptr()
                ints[row, I_NORM] = norms[row].data_ptr()
        return ints

    def clip_and_perturb(self, params, unperturbed, sources, norms, epsilons, scales, *,
                         first: bool, tiny: float) -> None:
        """One launch: see `_clip_and_perturb_kernel`. `norms` are float32 scalars on the device."""
        if not params:
            return
        device, dtype = params[0].device, params[0].dtype
        sources = [s if s.is_contiguous() else s.contiguous() for s in sources]
        norms = [n if n.dtype == torch.float32 else n.float() for n in norms]
        ints = self._pointer_table(params, unperturbed, sources, norms)
        floats = np.zeros((len(params), FLOAT_COLUMNS), dtype=np.float32)
        floats[:, F_EPSILON] = np.asarray(epsilons, dtype=np.float32)
        floats[:, F_SCALE] = np.asarray(scales, dtype=np.float32)
        blocks = self._blocks(device, tuple(p.numel() for p in params))
        if blocks.shape[0] == 0:
            return
        # Tensors the table points to may be freed right after this call: the caching allocator
        # reuses their memory only for work queued later on the same stream.
        with triton_support.device_guard(device):
            _clip_and_perturb_kernel[(blocks.shape[0],)](
                blocks, to_device(ints, device), to_device(np.ascontiguousarray(floats), device), tiny,
                FIRST=first, DTYPE=_TL_DTYPES[dtype], BLOCK=BLOCK,
                INT_COLUMNS=INT_COLUMNS, FLOAT_COLUMNS=FLOAT_COLUMNS, enable_fp_fusion=False)

    def restore(self, params, unperturbed) -> None:
        """One launch: every parameter gets its unperturbed copy back."""
        if not params:
            return
        device, dtype = params[0].device, params[0].dtype
        blocks = self._blocks(device, tuple(p.numel() for p in params))
        if blocks.shape[0] == 0:
            return
        with triton_support.device_guard(device):
            _restore_kernel[(blocks.shape[0],)](
                blocks, to_device(self._pointer_table(params, unperturbed), device),
                DTYPE=_TL_DTYPES[dtype], BLOCK=BLOCK, INT_COLUMNS=INT_COLUMNS)


TRITON_AMP = TritonAMPEngine()
