"""Launch tables: the one place that turns a list of tensors into what a single kernel launch needs.

Every fused backend (Triton, CUDA, CPU) consumes the same three arrays, so one launch covers
all parameters of all groups on one (device, dtype):

* ``int_table``  int64 [T, INT_COLUMNS], one row per tensor (addresses, sizes, counters, flags);
* ``float_table`` float32 [T, FLOAT_COLUMNS], one row per tensor (hyperparameters, already
  folded the way the update uses them, e.g. ``1 - dampening``, ``lr / bias_correction1``);
* ``block_table`` int64 [B, BLOCK_COLUMNS], one row per block of BLOCK consecutive *global* elements:
  (tensor row, global index of the block's first element). It depends only on sizes, so it
  is cached per parameter layout; blocks start at multiples of 4 so that every Philox call
  (one per quad of 4 elements) lies inside one block.

The element math that reads these rows lives in csrc/nvrm/update.h and its Triton twin
nvrm_ext/backends/triton.py; docs/noise.md specifies both.
"""
from __future__ import annotations

import ctypes
from dataclasses import dataclass

import numpy as np
import torch

# --- int_table columns -------------------------------------------------------------------
I_PARAM = 0        # address of the parameter's first element
I_GRAD = 1         # address of the gradient (same strides as the parameter); 0 for OP_NOISE
I_STATE0 = 2       # SGD momentum_buffer | Adam exp_avg; 0 when absent
I_STATE1 = 3       # Adam exp_avg_sq; 0 when absent
I_STATE2 = 4       # Adam max_exp_avg_sq (amsgrad); 0 when absent
I_NUMEL = 5        # number of elements of this tensor (or shard)
I_KEY = 6          # parameter key: position in the optimizer's flat parameter list
I_OLD_STEP = 7     # step whose noise is on the weights now (0: none) -> regenerated, subtracted
I_NEW_STEP = 8     # step whose noise is put on the weights (0: none)
I_FLAGS = 9        # bit field, below
I_OFFSET = 10      # global index of this tensor's first element (0 unless sharded)
I_COMP = 11        # float16/bfloat16 parameters: address of the compensation buffer, else 0
I_LIVE = 12        # capturable mode: address of this row's live counters (below), else 0
I_NUM_ITERS = 13   # num_iters: with I_LIVE the kernel derives the new step itself
INT_COLUMNS = 14

# --- float_table columns -----------------------------------------------------------------
F_LR = 0
F_WEIGHT_DECAY = 1
F_MOMENTUM = 2       # SGD momentum | Adam beta1
F_MOMENTUM_COEF = 3  # SGD 1 - dampening | Adam 1 - beta1
F_BETA2 = 4          # Adam beta2
F_BETA2_COEF = 5     # Adam 1 - beta2
F_EPS = 6            # Adam eps
F_STEP_SIZE = 7      # Adam lr / (1 - beta1**step)
F_SQRT_BC2 = 8       # Adam sqrt(1 - beta2**step)
F_DECAY = 9          # Adam decoupled: 1 - lr * weight_decay
F_OLD_SCALE = 10     # scale of the noise being removed
F_NEW_SCALE = 11     # scale of the noise being added
FLOAT_COLUMNS = 12

# --- block_table columns --------------------------------------------------------------------
B_ROW = 0          # the int/float table row (tensor) of the block
B_START = 1        # global index of the block's first element (a multiple of 4)
BLOCK_COLUMNS = 2

# --- I_FLAGS bits ------------------------------------------------------------------------
FLAG_OLD_TYPE_SHIFT = 0   # 2 bits: noise type code of the old noise (0 Gaussian, 1 Laplace, 2 Uniform)
FLAG_NEW_TYPE_SHIFT = 2   # 2 bits: noise type code of the new noise
NOISE_TYPE_MASK = 3       # a noise type field's width: (flags >> FLAG_*_TYPE_SHIFT) & NOISE_TYPE_MASK
FLAG_WEIGHT_DECAY = 1 << 4   # SGD: add weight_decay * p to the gradient (Adam L2 always adds)
FLAG_MOMENTUM = 1 << 5       # SGD: momentum buffer in use
FLAG_MOMENTUM_INIT = 1 << 6  # SGD: first use of the buffer: buf = d
FLAG_NESTEROV = 1 << 7       # SGD
FLAG_AMSGRAD = 1 << 8        # Adam
FLAG_DECOUPLED = 1 << 9      # Adam: p *= 1 - lr*wd instead of L2
FLAG_KEEP_NOISE = 1 << 10    # denoise=False (PSGD): the noise added is never removed
FLAG_ALIGNED = 1 << 11       # every address 16-byte aligned, offset and numel multiples of 4: vector access
                             # (read by the Triton kernel; the compiled kernels test the addresses themselves)
UPDATE_FLAGS = (FLAG_WEIGHT_DECAY | FLAG_MOMENTUM | FLAG_MOMENTUM_INIT | FLAG_NESTEROV | FLAG_AMSGRAD
                | FLAG_DECOUPLED)  # the bits the update arithmetic reads (the torch backend groups rows by them)

# --- live counters (capturable mode) --------------------------------------------------------
# float64 [T, LIVE_COLUMNS] on the parameters' device, one row per tensor: the per-parameter
# bookkeeping a host-mode step keeps in `optimizer.state`. A row whose I_LIVE is set is
# *resolved* by the kernel itself (resolve_rows below, per block) and *committed* after the
# update unless found_inf is set (commit_rows), so no step needs the host to know a counter.
L_STEP = 0         # steps taken so far
L_NOISE_STEP = 1   # step whose noise is on the weights (0: none)
L_NOISE_TYPE = 2   # its noise type code
L_NOISE_SCALE = 3  # its scale (a float32 value)
L_FRESH = 4        # 1 while an SGD momentum buffer has not been used yet (FLAG_MOMENTUM_INIT)
LIVE_COLUMNS = 5
LIVE_STATE_KEYS = ("step", "noise_step", "noise_type", "noise_scale", "momentum_fresh")

# --- weight samples -----------------------------------------------------------------------
# After a launch a fused backend can copy a few elements of each row's parameter into a
# [rows, SAMPLE_SIZE] tensor of the storage dtype (csrc/nvrm/update.h copy_sample): slot j < count
# = min(numel, SAMPLE_SIZE) holds element j * (numel // count), the other slots are left as they
# were. The optimizer keeps them to tell a rewrite of its weights from a copy of the same values
# (optim/records.py _check_weights) without reading the tensors one by one after every step.
SAMPLE_SIZE = 8

# --- storage dtype codes ----------------------------------------------------------------------
# The parameter dtype a compiled launch runs on, as its C entry points spell it (csrc/nvrm/update.h
# StorageCode). Every state tensor of a row has the parameter's dtype; float64 parameters update
# in float64 arithmetic (docs/noise.md §7).
STORAGE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}

# --- operations (one launch runs one of them on every row) ----------------------------------
OP_SGD = 0
OP_ADAM = 1
OP_NOISE = 2   # no update: p += new_noise - old_noise (denoised() entry / exit)


@dataclass
class TensorPlan:
    """What one launch does to one tensor."""

    param: torch.Tensor
    grad: torch.Tensor | None
    states: tuple  # up to three state tensors (None where absent), see I_STATE0..2
    key: int
    old_step: int
    new_step: int
    flags: int
    floats: tuple  # FLOAT_COLUMNS values
    offset: int = 0
    compensation: torch.Tensor | None = None  # see I_COMP


def by_bucket(items, tensor_of=None) -> dict:
    """(device, dtype) -> the items whose tensor is there, in their order: what one launch
    (or one device-to-host read) covers. `tensor_of(item)`: its tensor (default: the item)."""
    buckets: dict = {}
    for item in items:
        t = item if tensor_of is None else tensor_of(item)
        buckets.setdefault((t.device, t.dtype), []).append(item)
    return buckets


def address(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def build_rows(plans: list[TensorPlan]) -> tuple[np.ndarray, np.ndarray]:
    """int_table and float_table (numpy, host) for one launch."""
    n = len(plans)
    ints = np.zeros((n, INT_COLUMNS), dtype=np.int64)
    floats = np.zeros((n, FLOAT_COLUMNS), dtype=np.float32)
    for row, plan in enumerate(plans):
        s0, s1, s2 = (tuple(plan.states) + (None, None, None))[:3]
        ints[row] = (
            address(plan.param), address(plan.grad), address(s0), address(s1), address(s2),
            plan.param.numel(), plan.key, plan.old_step, plan.new_step, plan.flags, plan.offset,
            address(plan.compensation), 0, 0,  # I_LIVE, I_NUM_ITERS: filled per step
        )
        floats[row] = plan.floats
    ints[:, I_FLAGS] |= alignment_flags(ints)
    return ints, floats


_ADDRESS_COLUMNS = [I_PARAM, I_GRAD, I_STATE0, I_STATE1, I_STATE2, I_COMP]


def alignment_flags(ints: np.ndarray) -> np.ndarray:
    """FLAG_ALIGNED for the rows whose every element quad (one Philox call) is one aligned
    vector in every tensor of the row -- all addresses 16-byte aligned, offset and numel
    multiples of 4 -- else 0. Absent tensors (address 0) do not count against a row."""
    aligned = ((ints[:, _ADDRESS_COLUMNS] % 16 == 0).all(axis=1)
               & (ints[:, I_OFFSET] % 4 == 0) & (ints[:, I_NUMEL] % 4 == 0))
    return np.where(aligned, FLAG_ALIGNED, 0)


def power(base: np.ndarray, exponent: np.ndarray) -> np.ndarray:
    """base ** exponent in float64 by binary exponentiation over 32 bits: only multiplications,
    each rounded once, so every implementation (numpy here, C++, CUDA, Triton) gets the same
    bits -- unlike pow(), whose last bit differs between libraries."""
    result = np.ones(np.broadcast(base, exponent).shape, dtype=np.float64)
    x = np.array(base, dtype=np.float64)
    e = np.asarray(exponent, dtype=np.int64) & 0xFFFFFFFF
    if result.size > 1 and (x == x.flat[0]).all() and (e == e.flat[0]).all():
        # one base and one exponent (one step and one beta for every row, the usual case): the
        # same multiplications once, on Python floats (IEEE doubles, as numpy's), not per row
        scalar, square, bits = 1.0, float(x.flat[0]), int(e.flat[0])
        for bit in range(bits.bit_length()):
            if (bits >> bit) & 1:
                scalar = scalar * square
            square = square * square
        return np.full(result.shape, scalar)
    for bit in range(int(e.max(initial=0)).bit_length()):  # higher bits are 0: nothing changes
        result = np.where((e >> bit) & 1, result * x, result)
        x = x * x
    return result


def resolve_rows(op: int, ints: np.ndarray, floats: np.ndarray, live: np.ndarray) -> None:
    """Fill the step-dependent columns of host tables from live counters, in place.

    The host form of what a kernel does per block for a row with I_LIVE (docs/noise.md §7):
    the new step, the noise on the weights (step, type, scale), the first use of a momentum
    buffer, and Adam's folded constants from the float32 hyperparameters in float64:
    ``lr / (1 - beta1^t)``, ``sqrt(1 - beta2^t)``, ``1 - lr * weight_decay``.
    """
    num_iters = ints[:, I_NUM_ITERS]
    if len(num_iters) and num_iters.min() < 1:  # numpy's t % 0 is 0 with a warning: no noise, silently
        raise ValueError(f"num_iters must be at least 1, got {int(num_iters.min())}")
    t = live[:, L_STEP].astype(np.int64) + 1
    ints[:, I_NEW_STEP] = np.where(t % num_iters == 0, 0, t)
    ints[:, I_OLD_STEP] = live[:, L_NOISE_STEP].astype(np.int64)
    old_type = live[:, L_NOISE_TYPE].astype(np.int64)
    fresh = np.where(live[:, L_FRESH] != 0, FLAG_MOMENTUM_INIT, 0)
    ints[:, I_FLAGS] = (ints[:, I_FLAGS] & ~np.int64(NOISE_TYPE_MASK << FLAG_OLD_TYPE_SHIFT | FLAG_MOMENTUM_INIT)
                        | (old_type << FLAG_OLD_TYPE_SHIFT) | fresh)
    floats[:, F_OLD_SCALE] = live[:, L_NOISE_SCALE]
    if op == OP_ADAM:
        f = floats.astype(np.float64)
        floats[:, F_STEP_SIZE] = f[:, F_LR] / (1.0 - power(f[:, F_MOMENTUM], t))
        floats[:, F_SQRT_BC2] = np.sqrt(1.0 - power(f[:, F_BETA2], t))
        floats[:, F_DECAY] = 1.0 - f[:, F_LR] * f[:, F_WEIGHT_DECAY]


def commit_rows(ints: np.ndarray, floats: np.ndarray, live: np.ndarray) -> None:
    """Advance live counters past the step just launched, in place (host form of the kernels'
    commit; a step skipped for found_inf commits nothing)."""
    flags = ints[:, I_FLAGS]
    live[:, L_STEP] += 1
    live[:, L_NOISE_STEP] = np.where(flags & FLAG_KEEP_NOISE, 0, ints[:, I_NEW_STEP])
    live[:, L_NOISE_TYPE] = (flags >> FLAG_NEW_TYPE_SHIFT) & NOISE_TYPE_MASK
    live[:, L_NOISE_SCALE] = floats[:, F_NEW_SCALE]
    live[:, L_FRESH] = 0


def sample_view(t: torch.Tensor) -> torch.Tensor:
    """The elements of a dense tensor that a launch samples (see SAMPLE_SIZE), as a view."""
    n = t.numel()
    count = min(SAMPLE_SIZE, n)
    return t.as_strided((count,), (n // count if count else 1,), t.storage_offset())


def check_samples(samples: torch.Tensor | None, ints: torch.Tensor, dtype: torch.dtype) -> None:
    """What a launch's `samples` argument must be (None: no samples)."""
    if samples is None:
        return
    if not (samples.dtype == dtype and samples.dim() == 2 and samples.shape[1] == SAMPLE_SIZE):
        raise ValueError(f"samples must be a [R, {SAMPLE_SIZE}] {dtype} tensor, got {samples.dtype} "
                         f"{list(samples.shape)}")
    if not (samples.is_contiguous() and samples.device == ints.device):
        raise ValueError("samples must be contiguous, beside the tables")
    if samples.shape[0] > ints.shape[0]:
        raise ValueError(f"samples has {samples.shape[0]} rows, the tables {ints.shape[0]}")


def check_table_types(device: torch.device, ints: torch.Tensor, floats: torch.Tensor, blocks: torch.Tensor,
                      commit_rows: int, samples: torch.Tensor | None, dtype: torch.dtype) -> None:
    """The launch tables' dtypes, shapes, layout and device, which a kernel trusts to index them
    (real checks, not asserts: they must hold under python -O too)."""
    for name, table, table_dtype, columns in (("ints", ints, torch.int64, INT_COLUMNS),
                                              ("floats", floats, torch.float32, FLOAT_COLUMNS),
                                              ("blocks", blocks, torch.int64, BLOCK_COLUMNS)):
        if table.dtype != table_dtype:
            raise ValueError(f"{name} table must be {table_dtype}, got {table.dtype}")
        if table.dim() != 2 or table.shape[1] != columns:
            raise ValueError(f"{name} table must have shape [N, {columns}], got {list(table.shape)}")
        if not table.is_contiguous():
            raise ValueError(f"{name} table must be contiguous")
        if table.device.type != device.type:
            raise ValueError(f"{name} table must be on a {device.type} device, got {table.device}")
    if ints.shape[0] != floats.shape[0]:
        raise ValueError(f"ints and floats tables disagree on the number of tensors: "
                         f"{ints.shape[0]} vs {floats.shape[0]}")
    if not ints.device == floats.device == blocks.device:
        raise ValueError("the three tables must share one device")
    if not 0 <= commit_rows <= ints.shape[0]:
        raise ValueError(f"commit_rows {commit_rows} outside [0, {ints.shape[0]}]")
    check_samples(samples, ints, dtype)


def host_view(table: torch.Tensor) -> np.ndarray:
    """A numpy view of a contiguous host tensor's memory, read as the kernels read it: through its
    address, without a copy or a torch call. (The tests of capturable steps make every torch
    accessor of a value raise, as it would be a sync on a GPU; host tables cost nothing to read.)"""
    dtype = np.dtype({torch.int64: np.int64, torch.float32: np.float32}[table.dtype])
    if table.numel() == 0:
        return np.zeros(tuple(table.shape), dtype=dtype)
    buffer = (ctypes.c_char * (table.numel() * dtype.itemsize)).from_address(table.data_ptr())
    return np.frombuffer(buffer, dtype=dtype).reshape(tuple(table.shape))


_MAX_EXTENT = 1 << 58  # csrc/api.cpp kMaxExtent: no index, byte offset or block end overflows


def check_table_contents(op: int, dtype: torch.dtype, ints: np.ndarray, floats: np.ndarray,
                         blocks: np.ndarray, what: str = "launch") -> None:
    """What a kernel dereferences, divides by or converts in host tables, checked before a
    launch (ValueError): the host twin of the CPU library's own check (csrc/api.cpp
    invalid_tables), for the kernels that cannot check their tables themselves. O(rows +
    blocks). The live counters a row points to (I_LIVE) are not read: on a GPU they are device
    memory that only a sync could read (the CPU library reads and checks them itself)."""
    def refuse(rows, reason):
        raise ValueError(f"nvrm_ext {what} refused, nothing was changed: table row {int(np.flatnonzero(rows)[0])}: "
                         f"{reason}")

    numel, offset, flags = ints[:, I_NUMEL], ints[:, I_OFFSET], ints[:, I_FLAGS]
    if ((numel < 0) | (numel > _MAX_EXTENT)).any():
        refuse((numel < 0) | (numel > _MAX_EXTENT), "numel out of range")
    if ((offset < 0) | (offset > _MAX_EXTENT)).any():
        refuse((offset < 0) | (offset > _MAX_EXTENT), "offset out of range")
    live = ints[:, I_LIVE] != 0
    if (live & (ints[:, I_NUM_ITERS] < 1)).any():
        refuse(live & (ints[:, I_NUM_ITERS] < 1), "num_iters must be at least 1")
    types = np.stack([(flags >> FLAG_OLD_TYPE_SHIFT) & NOISE_TYPE_MASK,
                      (flags >> FLAG_NEW_TYPE_SHIFT) & NOISE_TYPE_MASK])
    if (types > 2).any():
        refuse((types > 2).any(axis=0), "noise type codes must be 0, 1 or 2")
    # A non-finite scale would put non-finite values on every weight of the row, for good (the
    # new scale is the group's variability even at a step that adds no noise).
    bad = ~live & (ints[:, I_OLD_STEP] & 0xFFFFFFFF != 0) & ~np.isfinite(floats[:, F_OLD_SCALE])
    if bad.any():
        refuse(bad, "the old noise scale is not finite")
    if not np.isfinite(floats[:, F_NEW_SCALE]).all():
        refuse(~np.isfinite(floats[:, F_NEW_SCALE]), "the new noise scale is not finite")
    momentum = (flags & FLAG_MOMENTUM) != 0
    amsgrad = (flags & FLAG_AMSGRAD) != 0
    sgd, adam = np.full(len(ints), op == OP_SGD), np.full(len(ints), op == OP_ADAM)
    element_bytes = dtype.itemsize
    present = numel > 0
    for column, needed, name in ((I_PARAM, True, "parameter"), (I_GRAD, op != OP_NOISE, "gradient"),
                                 (I_STATE0, (sgd & momentum) | adam, "first state"), (I_STATE1, adam, "second state"),
                                 (I_STATE2, adam & amsgrad, "third state"), (I_COMP, False, "compensation")):
        address = ints[:, column]
        if (present & needed & (address == 0)).any():
            refuse(present & needed & (address == 0), f"null {name} address")
        if (present & (address % element_bytes != 0)).any():
            refuse(present & (address % element_bytes != 0), f"misaligned {name} address")
    if len(blocks):
        row, start = blocks[:, B_ROW], blocks[:, B_START]
        outside = (row < 0) | (row >= len(ints))
        if outside.any():
            b = int(np.flatnonzero(outside)[0])
            raise ValueError(f"nvrm_ext {what} refused, nothing was changed: block {b}: table row {int(row[b])} "
                             f"outside [0, {len(ints)})")
        block_offset, block_numel = offset[row], numel[row]
        bad = (start % 4 != 0) | (start < block_offset - block_offset % 4) | (start >= block_offset + block_numel)
        if bad.any():
            b = int(np.flatnonzero(bad)[0])
            raise ValueError(f"nvrm_ext {what} refused, nothing was changed: block {b}: start {int(start[b])} is not a "
                             f"quad inside [{int(block_offset[b])}, {int(block_offset[b] + block_numel[b])}) "
                             f"of table row {int(row[b])}")


def build_block_table(numels: list[int], offsets: list[int], block: int) -> np.ndarray:
    """[B, BLOCK_COLUMNS] int64 rows (B_ROW, B_START) covering every element once.

    Blocks of tensor t cover the global range [offset_t, offset_t + numel_t) starting at the
    quad boundary at or below offset_t; block must be a multiple of 4.
    """
    if block % 4:
        raise ValueError(f"block size must be a multiple of 4, got {block}")
    rows, starts = [], []
    for row, (numel, offset) in enumerate(zip(numels, offsets)):
        if numel == 0:
            continue
        first = (offset // 4) * 4
        s = np.arange(first, offset + numel, block, dtype=np.int64)
        rows.append(np.full(len(s), row, dtype=np.int64))
        starts.append(s)
    if not rows:
        return np.zeros((0, BLOCK_COLUMNS), dtype=np.int64)
    table = np.empty((sum(map(len, rows)), BLOCK_COLUMNS), dtype=np.int64)
    table[:, B_ROW] = np.concatenate(rows)
    table[:, B_START] = np.concatenate(starts)
    return table


def to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """Host array -> tensor on `device` (pinned, asynchronous copy for CUDA)."""
    host = torch.from_numpy(array)
    if device.type == "cpu":
        return host
    return host.pin_memory().to(device, non_blocking=True)
