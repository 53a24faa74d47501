"""The Triton backend: the whole step for every parameter of a bucket in one launch.

The Triton twin of csrc/nvrm/{philox,noise,update}.h: the same Philox counters, the same float32
values of every operation (docs/noise.md §6-7), compiled without fp contraction, so it is
bit-identical to the compiled kernels. Each program handles one block_table row (BLOCK
consecutive global elements of one tensor) in tiles of TILE elements: every thread owns one quad
of 4 consecutive elements per tile -- one Philox call, one vector access per tensor on a row
flagged FLAG_ALIGNED -- so few values are live at a time (registers, occupancy) and no lane
computes noise it does not use.

Runs on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1 (set before triton is imported).
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from . import tables as T
from .triton_support import TL_DTYPES, device_guard, unavailable_reason

BLOCK = 4096                 # elements per block_table row (one program)
NUM_WARPS = 4
TILE = 4 * 32 * NUM_WARPS    # elements per loop iteration: one quad per thread
_COMMIT_ROWS = 128           # rows of live counters per program of the commit kernel
_SAMPLE_ROWS = 64            # rows per program of the weight-sample kernel
_COMMIT_WARPS = 4
# Compile options of every launch (and of kernel_variants(), so reports compile what runs).
_STEP_OPTIONS = dict(num_warps=NUM_WARPS, num_stages=1, enable_fp_fusion=False)
_COMMIT_OPTIONS = dict(num_warps=_COMMIT_WARPS, num_stages=1, enable_fp_fusion=False)

# The layout names of tables.py, as the kernels read them: jit code may use module globals that
# are tl.constexpr, which compile to the same constants as literals. Row strides (INT_COLUMNS,
# FLOAT_COLUMNS, SAMPLE_SIZE) stay constexpr parameters of the kernels, recorded by kernel_variants().
I_PARAM = tl.constexpr(T.I_PARAM)
I_GRAD = tl.constexpr(T.I_GRAD)
I_STATE0 = tl.constexpr(T.I_STATE0)
I_STATE1 = tl.constexpr(T.I_STATE1)
I_STATE2 = tl.constexpr(T.I_STATE2)
I_NUMEL = tl.constexpr(T.I_NUMEL)
I_KEY = tl.constexpr(T.I_KEY)
I_OLD_STEP = tl.constexpr(T.I_OLD_STEP)
I_NEW_STEP = tl.constexpr(T.I_NEW_STEP)
I_FLAGS = tl.constexpr(T.I_FLAGS)
I_OFFSET = tl.constexpr(T.I_OFFSET)
I_COMP = tl.constexpr(T.I_COMP)
I_LIVE = tl.constexpr(T.I_LIVE)
I_NUM_ITERS = tl.constexpr(T.I_NUM_ITERS)
F_LR = tl.constexpr(T.F_LR)
F_WEIGHT_DECAY = tl.constexpr(T.F_WEIGHT_DECAY)
F_MOMENTUM = tl.constexpr(T.F_MOMENTUM)
F_MOMENTUM_COEF = tl.constexpr(T.F_MOMENTUM_COEF)
F_BETA2 = tl.constexpr(T.F_BETA2)
F_BETA2_COEF = tl.constexpr(T.F_BETA2_COEF)
F_EPS = tl.constexpr(T.F_EPS)
F_STEP_SIZE = tl.constexpr(T.F_STEP_SIZE)
F_SQRT_BC2 = tl.constexpr(T.F_SQRT_BC2)
F_DECAY = tl.constexpr(T.F_DECAY)
F_OLD_SCALE = tl.constexpr(T.F_OLD_SCALE)
F_NEW_SCALE = tl.constexpr(T.F_NEW_SCALE)
L_STEP = tl.constexpr(T.L_STEP)
L_NOISE_STEP = tl.constexpr(T.L_NOISE_STEP)
L_NOISE_TYPE = tl.constexpr(T.L_NOISE_TYPE)
L_NOISE_SCALE = tl.constexpr(T.L_NOISE_SCALE)
L_FRESH = tl.constexpr(T.L_FRESH)
FLAG_OLD_TYPE_SHIFT = tl.constexpr(T.FLAG_OLD_TYPE_SHIFT)
FLAG_NEW_TYPE_SHIFT = tl.constexpr(T.FLAG_NEW_TYPE_SHIFT)
NOISE_TYPE_MASK = tl.constexpr(T.NOISE_TYPE_MASK)
B_ROW = tl.constexpr(T.B_ROW)
B_START = tl.constexpr(T.B_START)
BLOCK_COLUMNS = tl.constexpr(T.BLOCK_COLUMNS)
FLAG_WEIGHT_DECAY = tl.constexpr(T.FLAG_WEIGHT_DECAY)
FLAG_MOMENTUM = tl.constexpr(T.FLAG_MOMENTUM)
FLAG_MOMENTUM_INIT = tl.constexpr(T.FLAG_MOMENTUM_INIT)
FLAG_NESTEROV = tl.constexpr(T.FLAG_NESTEROV)
FLAG_AMSGRAD = tl.constexpr(T.FLAG_AMSGRAD)
FLAG_DECOUPLED = tl.constexpr(T.FLAG_DECOUPLED)
FLAG_KEEP_NOISE = tl.constexpr(T.FLAG_KEEP_NOISE)
FLAG_ALIGNED = tl.constexpr(T.FLAG_ALIGNED)
OP_SGD = tl.constexpr(T.OP_SGD)
OP_ADAM = tl.constexpr(T.OP_ADAM)
OP_NOISE = tl.constexpr(T.OP_NOISE)


@triton.jit
def _log_f32(x):
    """Cephes logf for normal x > 0 (docs/noise.md §6). Every value equals the spec's: the sign
    bit of x is 0, so bits >> 23 is the biased exponent; 2^23 + b - (2^23 + 126 [+ 1]) and
    fma(m, 2 or 1, -1) are exact, as are the spec's int->float conversion and (m + m) - 1."""
    bits = x.to(tl.uint32, bitcast=True)
    small = ((bits & 0x007FFFFF) | 0x3F000000).to(tl.float32, bitcast=True) < 0.70710677
    e = ((bits >> 23) | 0x4B000000).to(tl.float32, bitcast=True) - tl.where(small, 8388735.0, 8388734.0)
    m = ((bits & 0x007FFFFF) | 0x3F000000).to(tl.float32, bitcast=True)
    m = tl.fma(m, tl.where(small, 2.0, 1.0), -1.0)
    z = m * m
    p = tl.fma(m, 0.070376836, -0.11514610052108765)
    p = tl.fma(p, m, 0.11676998436450958)
    p = tl.fma(p, m, -0.12420140951871872)
    p = tl.fma(p, m, 0.14249323308467865)
    p = tl.fma(p, m, -0.16668057441711426)
    p = tl.fma(p, m, 0.2000071406364441)
    p = tl.fma(p, m, -0.24999994039535522)
    p = tl.fma(p, m, 0.3333333134651184)
    y = (p * m) * z
    y = tl.fma(e, -0.00021219444170128554, y)
    y = tl.fma(z, -0.5, y)
    r = m + y
    return tl.fma(e, 0.693359375, r)


@triton.jit
def _uniform(x):
    """u = ((x >> 8) | 1) * 2^-24 (docs/noise.md §3) without an int->float conversion:
    1 + (x >> 9) * 2^-23 is exact in [1, 2), and subtracting 1 - 2^-24 from it is exact."""
    return ((x >> 9) | 0x3F800000).to(tl.float32, bitcast=True) - 0.99999994039535522


@triton.jit
def _gaussian_pair(x_radius, x_angle):
    """(z0, z1) = rad * (cos, sin)(2π u1) of docs/noise.md §4, rad = sqrt(-2 ln u0).

    sincos_2pi_f32's range reduction is done on the bits of x_angle: with k = (x >> 8) | 1,
    t = 4u = k 2^-22, the quadrant floor(t + 1/2) & 3 is the top two bits of x + 2^29, and
    r = t - floor(t + 1/2) = int32(k << 10) * 2^-32 (two's complement wraps at the half
    quadrant; k is odd, so there is no tie) -- the same exact values. The quadrant's signs are
    applied to the products (IEEE negation commutes with a correctly rounded product)."""
    rad = tl.sqrt_rn(-2.0 * _log_f32(_uniform(x_radius)))
    k10 = ((x_angle << 2) & 0xFFFFFC00) | 0x400
    r = k10.to(tl.int32, bitcast=True).to(tl.float32) * 2.3283064365386963e-10
    r2 = r * r
    s = tl.fma(r2, 0.00016044118092395365, -0.004681753925979137)
    s = tl.fma(s, r2, 0.07969262450933456)
    s = tl.fma(s, r2, -0.6459640860557556)
    s = tl.fma(s, r2, 1.5707963705062866)
    s = r * s
    c = tl.fma(r2, -2.520204179745633e-05, 0.0009192602592520416)
    c = tl.fma(c, r2, -0.020863480865955353)
    c = tl.fma(c, r2, 0.25366950035095215)
    c = tl.fma(c, r2, -1.2337005138397217)
    c = tl.fma(c, r2, 1.0)
    quadrant_bits = x_angle + 0x20000000          # bits 31:30 = quadrant
    swap = (quadrant_bits & 0x40000000) != 0      # odd quadrant: sin <- ±c, cos <- ±s
    sin_sign = quadrant_bits & 0x80000000         # quadrants 2, 3
    cos_sign = (x_angle + 0x60000000) & 0x80000000  # quadrants 1, 2
    z0 = rad * tl.where(swap, s, c)
    z1 = rad * tl.where(swap, c, s)
    z0 = (z0.to(tl.uint32, bitcast=True) ^ cos_sign).to(tl.float32, bitcast=True)
    z1 = (z1.to(tl.uint32, bitcast=True) ^ sin_sign).to(tl.float32, bitcast=True)
    return z0, z1


@triton.jit
def _laplace(u):
    w = 2.0 * tl.minimum(u, 1.0 - u)
    lw = _log_f32(w)
    return tl.where(u < 0.5, lw, -lw)


@triton.jit
def _philox(c0, c1, key, step, seed_lo, seed_hi):
    """Philox4x32-10 (docs/noise.md §2) of the counters (c0, c1, key, step), c0/c1 per quad.
    key and step are the same for the whole tile: the first round's products of them are
    computed once per program, not per quad."""
    k0 = seed_lo.to(tl.uint32, bitcast=True)
    k1 = seed_hi.to(tl.uint32, bitcast=True)
    c2 = key.to(tl.uint32)
    hi1 = tl.umulhi(c2, 0xCD9E8D57)
    lo1 = c2 * 0xCD9E8D57
    prod0 = c0.to(tl.uint64) * 0xD2511F53
    x0 = hi1 ^ c1 ^ k0
    x1 = tl.zeros_like(c0) + lo1
    x2 = (prod0 >> 32).to(tl.uint32) ^ step.to(tl.uint32) ^ k1
    x3 = prod0.to(tl.uint32)
    for _ in tl.static_range(9):
        k0 = k0 + 0x9E3779B9
        k1 = k1 + 0xBB67AE85
        prod0 = x0.to(tl.uint64) * 0xD2511F53
        prod1 = x2.to(tl.uint64) * 0xCD9E8D57
        x0 = (prod1 >> 32).to(tl.uint32) ^ x1 ^ k0
        x2 = (prod0 >> 32).to(tl.uint32) ^ x3 ^ k1
        x1 = prod1.to(tl.uint32)
        x3 = prod0.to(tl.uint32)
    return x0, x1, x2, x3


@triton.jit
def _noise_tile(c0, c1, key, step, seed_lo, seed_hi, noise_type, scale, MATH: tl.constexpr):
    """[Q, 4] noise of the quads whose counters are (c0, c1) ([Q] uint32 each): lane j of quad q
    is element 4q + j (docs/noise.md §2-5): float32, returned as MATH (widened exactly to float64
    for float64 parameters, §7)."""
    x0, x1, x2, x3 = _philox(c0, c1, key, step, seed_lo, seed_hi)
    if noise_type == 0:
        z0, z1 = _gaussian_pair(x0, x1)
        z2, z3 = _gaussian_pair(x2, x3)
    elif noise_type == 1:
        z0 = _laplace(_uniform(x0))
        z1 = _laplace(_uniform(x1))
        z2 = _laplace(_uniform(x2))
        z3 = _laplace(_uniform(x3))
    else:
        z0 = 2.0 * _uniform(x0) - 1.0
        z1 = 2.0 * _uniform(x1) - 1.0
        z2 = 2.0 * _uniform(x2) - 1.0
        z3 = 2.0 * _uniform(x3) - 1.0
    # [Q, 2, 2] with [q, i, j] = z(2i + j), then flat lanes: no data moves between threads
    z = tl.reshape(tl.join(tl.join(z0, z2), tl.join(z1, z3)), [c0.shape[0], 4])
    return (scale * z).to(MATH)


@triton.jit
def _to_storage(x, DTYPE: tl.constexpr):
    """float32 -> storage dtype, round to nearest even. bfloat16 is rounded explicitly on the
    bits: Triton's interpreter truncates, and the C++ kernels round this same way."""
    if DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        rounded = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
        x = tl.where(x != x, x, rounded.to(tl.float32, bitcast=True))  # keep NaNs NaN
    return x.to(DTYPE)


@triton.jit
def _power(base, exponent):
    """base ** exponent (float64) by binary exponentiation over the low 32 bits of the exponent
    (tables.power: the same products). A loop, not unrolled: unrolled, the float64 chains held
    ~40 more registers than the element update needs, for a header run once per program."""
    result = tl.full([], 1.0, tl.float64)
    x = base
    e = exponent & 0xFFFFFFFF
    while e != 0:
        if (e & 1) != 0:
            result = result * x
        x = x * x
        e = e >> 1
    return result


@triton.jit
def _new_step_after(t, num_iters):
    """The step whose noise step t adds: none (0) at the end of every num_iters (update.h new_step_after)."""
    return tl.where(t % num_iters == 0, 0, t)


@triton.jit
def _tile_ptr(address, tile_first, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    """Pointer to element `tile_first` of the tensor at `address`. On an aligned row the tile
    starts on a quad, so the pointer is a multiple of 4 elements: vector loads and stores."""
    ptr = (address + tile_first * (DTYPE.primitive_bitwidth // 8)).to(tl.pointer_type(DTYPE))
    if ALIGNED:
        if DTYPE.primitive_bitwidth == 64:  # FLAG_ALIGNED promises 16 bytes: half a float64 quad
            ptr = tl.multiple_of(ptr, 16)
        else:
            ptr = tl.multiple_of(ptr, DTYPE.primitive_bitwidth // 2)
    return ptr


@triton.jit
def _lanes(x):
    """The 4 lanes of a [Q, 4] tile as [Q] vectors (each thread keeps its quad)."""
    x02, x13 = tl.split(tl.reshape(x, [x.shape[0], 2, 2]))
    x0, x2 = tl.split(x02)
    x1, x3 = tl.split(x13)
    return x0, x1, x2, x3


@triton.jit
def _store(ptr, idx, x, mask, ALIGNED: tl.constexpr):
    """Store a [Q, 4] tile. Unaligned, lane by lane: a [Q, 4] store of unknown alignment gets a
    layout of one element per thread, and the tile would move through shared memory to it."""
    if ALIGNED:
        tl.store(ptr + idx, x, mask=mask)
    else:
        i0, i1, i2, i3 = _lanes(idx)
        x0, x1, x2, x3 = _lanes(x)
        m0, m1, m2, m3 = _lanes(mask)
        tl.store(ptr + i0, x0, mask=m0)
        tl.store(ptr + i1, x1, mask=m1)
        tl.store(ptr + i2, x2, mask=m2)
        tl.store(ptr + i3, x3, mask=m3)


@triton.jit
def _maximum_nan(a, b):
    """a if a > b or a is NaN, else b: torch.maximum's NaN propagation, exactly update.h's
    select (tl.maximum lowers to max.f32, which drops a NaN)."""
    return tl.where((a > b) | (a != a), a, b)


@triton.jit
def _div(a, b):
    """a / b correctly rounded: div.rn.f32 (tl.div_rn) in float32, div.rn.f64 (IEEE `/`) in float64."""
    if a.dtype == tl.float64:
        return a / b
    else:
        return tl.div_rn(a, b)


@triton.jit
def _sqrt(x):
    """Correctly rounded sqrt: sqrt.rn.f32 (tl.sqrt_rn) in float32, sqrt.rn.f64 (tl.sqrt) in float64."""
    if x.dtype == tl.float64:
        return tl.sqrt(x)
    else:
        return tl.sqrt_rn(x)


@triton.jit
def _step_tile(tile_first, quad0, rem, lo, seed_lo, seed_hi, frow, row, addresses,
               OP: tl.constexpr, DTYPE: tl.constexpr, TILE: tl.constexpr, ALIGNED: tl.constexpr,
               HAS_GRAD_SCALE: tl.constexpr):
    """One tile: TILE elements starting at local index `tile_first`, of which indices
    [lo, rem) are inside the tensor; quad0 is the global quad index of the tile's first quad.
    `row` holds the row's resolved scalars, `addresses` its tensors (see _nvrm_kernel). The update
    runs in MATH (float64 for float64 parameters, from the float32 table values widened exactly),
    and so does the noise's delta (the noise itself is float32 for every dtype)."""
    key, old_step, old_type, old_scale, new_step, new_type, new_scale, flags, momentum_init, \
        step_size, sqrt_bc2, decay, inv_scale = row
    # the update's arithmetic type (update.h Real): float64 for float64 parameters, else float32
    MATH: tl.constexpr = tl.float64 if DTYPE == tl.float64 else tl.float32
    param_address, comp_address, grad_address, state0, state1, state2 = addresses
    if DTYPE == tl.float64:  # only 16-bit parameters are compensated (as in the CPU launcher)
        comp_address = 0
    Q: tl.constexpr = TILE // 4
    q = tl.arange(0, Q)
    idx = q[:, None] * 4 + tl.arange(0, 4)[None, :]
    if ALIGNED:  # lo == 0 and rem % 4 == 0: a quad is wholly in or out
        mask = tl.broadcast_to((q < rem // 4)[:, None], [Q, 4])
    else:
        mask = (idx >= lo) & (idx < rem)
    param_ptr = _tile_ptr(param_address, tile_first, DTYPE, ALIGNED)
    p = tl.load(param_ptr + idx, mask=mask, other=0.0).to(MATH)
    # 16-bit parameters carry a compensation buffer: the weight is param + comp
    comp_ptr = _tile_ptr(comp_address, tile_first, DTYPE, ALIGNED)
    if comp_address != 0:
        p = p + tl.load(comp_ptr + idx, mask=mask, other=0.0).to(MATH)
    if OP != OP_NOISE:
        grad_ptr = _tile_ptr(grad_address, tile_first, DTYPE, ALIGNED)
        g = tl.load(grad_ptr + idx, mask=mask, other=0.0)
        if HAS_GRAD_SCALE:  # GradScaler's fused protocol: unscale, round, write back
            g = _to_storage(_div(g.to(MATH), inv_scale.to(MATH)), DTYPE)
            _store(grad_ptr, idx, g, mask, ALIGNED)
        g = g.to(MATH)
    if OP == OP_SGD:
        d = g
        if (flags & FLAG_WEIGHT_DECAY) != 0:
            d = g + tl.load(frow + F_WEIGHT_DECAY).to(MATH) * p
        if (flags & FLAG_MOMENTUM) != 0:
            momentum = tl.load(frow + F_MOMENTUM).to(MATH)
            buf_ptr = _tile_ptr(state0, tile_first, DTYPE, ALIGNED)
            if momentum_init:
                buf = d
            else:
                buf = momentum * tl.load(buf_ptr + idx, mask=mask, other=0.0).to(MATH) \
                    + tl.load(frow + F_MOMENTUM_COEF).to(MATH) * d
            _store(buf_ptr, idx, _to_storage(buf, DTYPE), mask, ALIGNED)
            if (flags & FLAG_NESTEROV) != 0:
                d = d + momentum * buf
            else:
                d = buf
        p = p - tl.load(frow + F_LR).to(MATH) * d
    elif OP == OP_ADAM:
        if (flags & FLAG_DECOUPLED) != 0:
            p = p * decay.to(MATH)
        else:
            g = g + tl.load(frow + F_WEIGHT_DECAY).to(MATH) * p
        m_ptr = _tile_ptr(state0, tile_first, DTYPE, ALIGNED)
        v_ptr = _tile_ptr(state1, tile_first, DTYPE, ALIGNED)
        m = tl.load(frow + F_MOMENTUM).to(MATH) * tl.load(m_ptr + idx, mask=mask, other=0.0).to(MATH) \
            + tl.load(frow + F_MOMENTUM_COEF).to(MATH) * g
        v = tl.load(frow + F_BETA2).to(MATH) * tl.load(v_ptr + idx, mask=mask, other=0.0).to(MATH) \
            + (tl.load(frow + F_BETA2_COEF).to(MATH) * g) * g
        _store(m_ptr, idx, _to_storage(m, DTYPE), mask, ALIGNED)
        _store(v_ptr, idx, _to_storage(v, DTYPE), mask, ALIGNED)
        if (flags & FLAG_AMSGRAD) != 0:
            vmax_ptr = _tile_ptr(state2, tile_first, DTYPE, ALIGNED)
            v = _maximum_nan(tl.load(vmax_ptr + idx, mask=mask, other=0.0).to(MATH), v)
            _store(vmax_ptr, idx, _to_storage(v, DTYPE), mask, ALIGNED)
        denom = _div(_sqrt(v), sqrt_bc2.to(MATH)) + tl.load(frow + F_EPS).to(MATH)
        p = p - step_size.to(MATH) * _div(m, denom)

    # Philox counters of the tile's quads: (lo32, hi32) of quad0 + q, with the carry
    quad0_lo = (quad0 & 0xFFFFFFFF).to(tl.uint32)
    c0 = quad0_lo + q.to(tl.uint32)
    c1 = (quad0 >> 32).to(tl.uint32) + (c0 < quad0_lo).to(tl.uint32)
    n_old = tl.zeros([Q, 4], MATH)
    if old_step != 0:
        n_old = _noise_tile(c0, c1, key, old_step, seed_lo, seed_hi, old_type, old_scale, MATH)
    n_new = tl.zeros([Q, 4], MATH)
    if new_step != 0:
        n_new = _noise_tile(c0, c1, key, new_step, seed_lo, seed_hi, new_type, new_scale, MATH)
    p = p + (n_new - n_old)
    if comp_address != 0:  # keep what rounding to the storage type drops (update.h split_store)
        stored = _to_storage(p, DTYPE)
        _store(param_ptr, idx, stored, mask, ALIGNED)
        _store(comp_ptr, idx, _to_storage(p - stored.to(MATH), DTYPE), mask, ALIGNED)
    else:
        _store(param_ptr, idx, _to_storage(p, DTYPE), mask, ALIGNED)


@triton.jit(do_not_specialize=["seed_lo", "seed_hi"])
def _nvrm_kernel(blocks, ints, floats, seed_lo, seed_hi, grad_scale, found_inf,
                 OP: tl.constexpr, DTYPE: tl.constexpr, BLOCK: tl.constexpr, TILE: tl.constexpr,
                 INT_COLUMNS: tl.constexpr, FLOAT_COLUMNS: tl.constexpr,
                 HAS_GRAD_SCALE: tl.constexpr, HAS_FOUND_INF: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    row = tl.load(blocks + BLOCK_COLUMNS * pid + B_ROW)
    start = tl.load(blocks + BLOCK_COLUMNS * pid + B_START)
    irow = ints + row * INT_COLUMNS
    frow = floats + row * FLOAT_COLUMNS
    numel = tl.load(irow + I_NUMEL)
    key = tl.load(irow + I_KEY)
    old_step = tl.load(irow + I_OLD_STEP)
    new_step = tl.load(irow + I_NEW_STEP)
    flags = tl.load(irow + I_FLAGS)
    offset = tl.load(irow + I_OFFSET)
    old_type = (flags >> FLAG_OLD_TYPE_SHIFT) & NOISE_TYPE_MASK
    old_scale = tl.load(frow + F_OLD_SCALE)
    momentum_init = (flags & FLAG_MOMENTUM_INIT) != 0
    step_size = tl.load(frow + F_STEP_SIZE)
    sqrt_bc2 = tl.load(frow + F_SQRT_BC2)
    decay = tl.load(frow + F_DECAY)
    live_address = tl.load(irow + I_LIVE)
    if live_address != 0:  # capturable mode: resolve the row from its live counters (update.h resolve_live)
        live = live_address.to(tl.pointer_type(tl.float64))
        t = tl.load(live + L_STEP).to(tl.int64) + 1
        new_step = _new_step_after(t, tl.load(irow + I_NUM_ITERS))
        old_step = tl.load(live + L_NOISE_STEP).to(tl.int64)
        old_type = tl.load(live + L_NOISE_TYPE).to(tl.int64)
        old_scale = tl.load(live + L_NOISE_SCALE).to(tl.float32)
        momentum_init = tl.load(live + L_FRESH) != 0.0
        if OP == OP_ADAM:  # float64 division and sqrt are IEEE-rounded (div.rn.f64, sqrt.rn.f64)
            lr = tl.load(frow + F_LR).to(tl.float64)
            step_size = (lr / (1.0 - _power(tl.load(frow + F_MOMENTUM).to(tl.float64), t))).to(tl.float32)
            sqrt_bc2 = tl.sqrt(1.0 - _power(tl.load(frow + F_BETA2).to(tl.float64), t)).to(tl.float32)
            decay = (1.0 - lr * tl.load(frow + F_WEIGHT_DECAY).to(tl.float64)).to(tl.float32)
    inv_scale = 1.0
    if HAS_GRAD_SCALE:
        inv_scale = tl.load(grad_scale)
    new_type = (flags >> FLAG_NEW_TYPE_SHIFT) & NOISE_TYPE_MASK
    row_scalars = (key, old_step, old_type, old_scale, new_step, new_type, tl.load(frow + F_NEW_SCALE), flags,
                   momentum_init, step_size, sqrt_bc2, decay, inv_scale)
    addresses = (tl.load(irow + I_PARAM), tl.load(irow + I_COMP), tl.load(irow + I_GRAD), tl.load(irow + I_STATE0),
                 tl.load(irow + I_STATE1), tl.load(irow + I_STATE2))

    first = start - offset                      # local index of the block's first element (>= -3)
    end = tl.minimum(numel - first, BLOCK)      # the block's elements run over [first, first + end)
    if HAS_FOUND_INF:  # a skipped step writes nothing
        end = tl.where(tl.load(found_inf) == 0.0, end, 0)
    aligned = (flags & FLAG_ALIGNED) != 0
    for base in range(0, end, TILE):
        tile_first = first + base
        rem = (end - base).to(tl.int32)
        lo = tl.maximum(-tile_first, 0).to(tl.int32)
        quad0 = start // 4 + base // 4
        if aligned:  # the same tile, compiled twice: with vector accesses, and lane by lane
            _step_tile(tile_first, quad0, rem, lo, seed_lo, seed_hi, frow, row_scalars, addresses,
                       OP, DTYPE, TILE, True, HAS_GRAD_SCALE)
        else:
            _step_tile(tile_first, quad0, rem, lo, seed_lo, seed_hi, frow, row_scalars, addresses,
                       OP, DTYPE, TILE, False, HAS_GRAD_SCALE)


@triton.jit
def _commit_kernel(ints, floats, found_inf, commit_rows, ROWS: tl.constexpr,
                   INT_COLUMNS: tl.constexpr, FLOAT_COLUMNS: tl.constexpr, HAS_FOUND_INF: tl.constexpr):
    """Capturable mode: advance the live counters past the step (update.h commit_live); runs
    after the update kernel, so every block has resolved its row."""
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS).to(tl.int64)
    if HAS_FOUND_INF:  # a skipped step commits nothing
        commit_rows = tl.where(tl.load(found_inf) == 0.0, commit_rows, 0)
    mask = rows < commit_rows
    irow = ints + rows * INT_COLUMNS
    live_address = tl.load(irow + I_LIVE, mask=mask, other=0)
    mask = mask & (live_address != 0)
    live = live_address.to(tl.pointer_type(tl.float64))
    flags = tl.load(irow + I_FLAGS, mask=mask, other=0)
    t = tl.load(live + L_STEP, mask=mask, other=0.0).to(tl.int64) + 1
    new_step = _new_step_after(t, tl.load(irow + I_NUM_ITERS, mask=mask, other=1))
    tl.store(live + L_STEP, t.to(tl.float64), mask=mask)
    tl.store(live + L_NOISE_STEP, tl.where((flags & FLAG_KEEP_NOISE) != 0, 0, new_step).to(tl.float64), mask=mask)
    tl.store(live + L_NOISE_TYPE, ((flags >> FLAG_NEW_TYPE_SHIFT) & NOISE_TYPE_MASK).to(tl.float64), mask=mask)
    tl.store(live + L_NOISE_SCALE,
             tl.load(floats + rows * FLOAT_COLUMNS + F_NEW_SCALE, mask=mask, other=0.0).to(tl.float64), mask=mask)
    tl.store(live + L_FRESH, tl.zeros([ROWS], tl.float64), mask=mask)


@triton.jit
def _sample_kernel(ints, samples, sample_rows, DTYPE: tl.constexpr, ROWS: tl.constexpr,
                   SAMPLE_SIZE: tl.constexpr, INT_COLUMNS: tl.constexpr):
    """Weight records: the samples of rows 0 .. sample_rows-1 after the update (tables.SAMPLE_SIZE,
    update.h copy_sample); slot j < min(numel, SAMPLE_SIZE) holds element j * (numel // count)."""
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS).to(tl.int64)
    irow = ints + rows * INT_COLUMNS
    numel = tl.load(irow + I_NUMEL, mask=rows < sample_rows, other=0)
    count = tl.minimum(numel, SAMPLE_SIZE)
    j = tl.arange(0, SAMPLE_SIZE).to(tl.int64)
    mask = j[None, :] < count[:, None]
    param = tl.load(irow + I_PARAM, mask=count > 0, other=0).to(tl.pointer_type(DTYPE))
    element = j[None, :] * (numel // tl.maximum(count, 1))[:, None]
    values = tl.load(param[:, None] + element, mask=mask)
    tl.store(samples + rows[:, None] * SAMPLE_SIZE + j[None, :], values, mask=mask)


class KernelVariant(NamedTuple):
    """One compiled form of a kernel: what triton.compile(ASTSource(fn, signature, constexprs,
    attrs), target=..., options=options) needs to build exactly what a launch runs."""
    name: str
    fn: object
    signature: dict
    constexprs: dict
    num_warps: int
    options: dict
    attrs: dict = {}  # Triton's launch-time specialization: pointers to torch allocations are 16-byte aligned


def _aligned_pointers(signature: dict) -> dict:
    return {(i,): [["tt.divisibility", 16]] for i, kind in enumerate(signature.values()) if kind.startswith("*")}


_STEP_SIGNATURE = {"blocks": "*i64", "ints": "*i64", "floats": "*fp32", "seed_lo": "i32", "seed_hi": "i32",
                   "grad_scale": "*fp32", "found_inf": "*fp32"}
_COMMIT_SIGNATURE = {"ints": "*i64", "floats": "*fp32", "found_inf": "*fp32", "commit_rows": "i64"}
_SAMPLE_SIGNATURE = {"ints": "*i64", "samples": "*{dtype}", "sample_rows": "i64"}
_OP_NAMES = {T.OP_SGD: "sgd", T.OP_ADAM: "adam", T.OP_NOISE: "noise"}
_DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64"}
NVRM_TL_DTYPES = {**TL_DTYPES, torch.float64: tl.float64}  # the step kernels also run float64 parameters


def _step_constexprs(op: int, dtype: torch.dtype, has_grad_scale: bool, has_found_inf: bool,
                     warp_size: int = 32) -> dict:
    # one quad per thread whatever the warp's width: AMD's CDNA GPUs (MI200, MI300) run 64-thread
    # wavefronts, which a 32-thread TILE would give half a quad each, and 64-bit accesses
    return dict(OP=op, DTYPE=NVRM_TL_DTYPES[dtype], BLOCK=BLOCK, TILE=4 * warp_size * NUM_WARPS,
                INT_COLUMNS=T.INT_COLUMNS, FLOAT_COLUMNS=T.FLOAT_COLUMNS, HAS_GRAD_SCALE=has_grad_scale,
                HAS_FOUND_INF=has_found_inf)


def _commit_constexprs(has_found_inf: bool) -> dict:
    return dict(ROWS=_COMMIT_ROWS, INT_COLUMNS=T.INT_COLUMNS, FLOAT_COLUMNS=T.FLOAT_COLUMNS,
                HAS_FOUND_INF=has_found_inf)


def _sample_constexprs(dtype: torch.dtype) -> dict:
    return dict(DTYPE=NVRM_TL_DTYPES[dtype], ROWS=_SAMPLE_ROWS, SAMPLE_SIZE=T.SAMPLE_SIZE, INT_COLUMNS=T.INT_COLUMNS)


def kernel_variants(warp_size: int = 32) -> list[KernelVariant]:
    """Every kernel variant the optimizers launch (op x dtype x GradScaler arguments, and the
    capturable commit), with the signature, constexprs and options the launches use on GPUs of
    `warp_size` threads per warp -- for compiling them without a GPU (bench/kernels.py,
    tests/test_triton_ptx.py)."""
    variants = []
    for op, op_name in _OP_NAMES.items():
        for dtype, dtype_name in _DTYPE_NAMES.items():
            scaler = [(False, False)] if op == T.OP_NOISE else [(False, False), (True, False), (False, True), (True, True)]
            for has_grad_scale, has_found_inf in scaler:
                name = (f"step-{op_name}-{dtype_name}" + ("-grad_scale" if has_grad_scale else "")
                        + ("-found_inf" if has_found_inf else ""))
                signature = {**_STEP_SIGNATURE, **{k: "constexpr" for k in _step_constexprs(op, dtype, False, False)}}
                variants.append(KernelVariant(
                    name, _nvrm_kernel, signature,
                    _step_constexprs(op, dtype, has_grad_scale, has_found_inf, warp_size), NUM_WARPS,
                    _STEP_OPTIONS, _aligned_pointers(signature)))
    for has_found_inf in (False, True):
        constexprs = _commit_constexprs(has_found_inf)
        signature = {**_COMMIT_SIGNATURE, **{k: "constexpr" for k in constexprs}}
        variants.append(KernelVariant("commit" + ("-found_inf" if has_found_inf else ""), _commit_kernel, signature,
                                      constexprs, _COMMIT_WARPS, _COMMIT_OPTIONS, _aligned_pointers(signature)))
    for dtype, dtype_name in _DTYPE_NAMES.items():
        constexprs = _sample_constexprs(dtype)
        signature = {**{k: v.format(dtype=dtype_name) for k, v in _SAMPLE_SIGNATURE.items()},
                     **{k: "constexpr" for k in constexprs}}
        variants.append(KernelVariant(f"sample-{dtype_name}", _sample_kernel, signature, constexprs, _COMMIT_WARPS,
                                      _COMMIT_OPTIONS, _aligned_pointers(signature)))
    return variants


@functools.lru_cache(maxsize=None)
def _warp_size(device: torch.device) -> int:
    """Threads per warp of the GPU that runs `device`'s launches: 64 on AMD's CDNA GPUs (a ROCm
    torch's 'cuda' devices), 32 on NVIDIA's; 32 for the interpreter (CPU tensors)."""
    if device.type != "cuda":
        return 32
    properties = torch.cuda.get_device_properties(device)
    return getattr(properties, "warp_size", 64 if torch.version.hip else 32)


def _int32(word: int) -> int:
    """A 32-bit word as the int32 with its bits (the kernel reinterprets it as uint32)."""
    return word - (1 << 32) if word >= 1 << 31 else word


class TritonBackend:
    name = "triton"
    block_size = BLOCK
    uses_alignment_flag = True  # FLAG_ALIGNED selects the vector path of a row
    writes_through_addresses = True
    host_tables = False
    capturable = True

    def unavailable_reason(self, device: torch.device, dtype: torch.dtype) -> str | None:
        return unavailable_reason(device, dtype, "the Triton kernel", NVRM_TL_DTYPES)

    def launch(self, op: int, dtype: torch.dtype, ints: torch.Tensor, floats: torch.Tensor,
               blocks: torch.Tensor, seed: int, *, rows=None, live=None, commit_rows: int = 0,
               grad_scale: torch.Tensor | None = None, found_inf: torch.Tensor | None = None,
               samples: torch.Tensor | None = None) -> None:
        """One update launch over `blocks` (`rows`, `live`: for the torch reference only), then (commit_rows > 0, capturable mode) one commit
        launch over the live counters of the first commit_rows rows, then (`samples` given) one
        launch that copies the weight samples of its rows (tables.SAMPLE_SIZE). All run on the
        tables' device and its current stream, whichever CUDA device is current.

        Invalid tables raise ValueError before any kernel runs: their types and shapes always;
        their contents (tables.check_table_contents) where they are host memory (the CPU, under
        TRITON_INTERPRET=1). Tables in GPU memory are not read back, which would cost a sync
        per step: there the caller's host tables are what can be checked."""
        if op not in (T.OP_SGD, T.OP_ADAM, T.OP_NOISE):
            raise ValueError(f"unknown op {op}")
        T.check_table_types(ints.device, ints, floats, blocks, commit_rows, samples, dtype)
        if ints.device.type == "cpu":
            T.check_table_contents(op, dtype, T.host_view(ints), T.host_view(floats), T.host_view(blocks),
                                   "Triton launch")
        placeholder = floats  # any pointer: the kernel does not read an absent scalar
        has_grad_scale, has_found_inf = grad_scale is not None, found_inf is not None
        grad_scale = placeholder if grad_scale is None else grad_scale
        found_inf = placeholder if found_inf is None else found_inf
        with device_guard(ints.device):
            if blocks.shape[0]:
                _nvrm_kernel[(blocks.shape[0],)](
                    blocks, ints, floats, _int32(seed & 0xFFFFFFFF), _int32(seed >> 32 & 0xFFFFFFFF),
                    grad_scale, found_inf,
                    **_step_constexprs(op, dtype, has_grad_scale, has_found_inf, _warp_size(ints.device)),
                    **_STEP_OPTIONS)
            if commit_rows:
                _commit_kernel[(triton.cdiv(commit_rows, _COMMIT_ROWS),)](
                    ints, floats, found_inf, commit_rows, **_commit_constexprs(has_found_inf), **_COMMIT_OPTIONS)
            if samples is not None and samples.shape[0]:
                _sample_kernel[(triton.cdiv(samples.shape[0], _SAMPLE_ROWS),)](
                    ints, samples, samples.shape[0], **_sample_constexprs(dtype), **_COMMIT_OPTIONS)


TRITON = TritonBackend()
