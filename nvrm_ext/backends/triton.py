"""The Triton backend: the whole step for every parameter of a bucket in one launch.

The Triton twin of csrc/nvrm/{philox,noise,update}.h: the same Philox counters, the same float32
polynomials and the same operation order (docs/noise.md §6-7), compiled without fp contraction,
so it is bit-identical to the compiled kernels. Each program handles one block_table row: BLOCK
consecutive global elements of one tensor, laid out as a [BLOCK/4, 4] tile so that each row of
the tile is one Philox call (4 random words -> 4 elements).

Runs on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1 (set before triton is imported).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import tables as T
from .triton_support import TL_DTYPES, unavailable_reason

BLOCK = 4096
_COMMIT_ROWS = 128  # rows of live counters per program of the commit kernel

# float32 constants of docs/noise.md §6 (exact float32 values)
_LOG_P = [float.fromhex(h) for h in (
    "0x1.204376p-4", "-0x1.d7a370p-4", "0x1.de4a34p-4", "-0x1.fcba9ep-4", "0x1.23d37ep-3",
    "-0x1.555ca0p-3", "0x1.999d58p-3", "-0x1.fffff8p-3", "0x1.555554p-2")]


@triton.jit
def _log_f32(x):
    """Cephes logf for normal x > 0 (docs/noise.md §6)."""
    bits = x.to(tl.uint32, bitcast=True)
    e = (((bits >> 23) & 0xFF).to(tl.int32) - 126).to(tl.float32)
    m = ((bits & 0x807FFFFF) | 0x3F000000).to(tl.float32, bitcast=True)
    small = m < 0.70710677
    e = tl.where(small, e - 1.0, e)
    m = tl.where(small, m + m, m) - 1.0
    z = m * m
    p = tl.full(m.shape, 0.070376836, tl.float32)
    p = tl.fma(p, m, -0.11514610052108765)
    p = tl.fma(p, m, 0.11676998436450958)
    p = tl.fma(p, m, -0.12420140951871872)
    p = tl.fma(p, m, 0.14249323308467865)
    p = tl.fma(p, m, -0.16668057441711426)
    p = tl.fma(p, m, 0.2000071406364441)
    p = tl.fma(p, m, -0.24999994039535522)
    p = tl.fma(p, m, 0.3333333134651184)
    y = (p * m) * z
    y = tl.fma(e, -0.00021219444170128554, y)
    y = tl.fma(tl.full(m.shape, -0.5, tl.float32), z, y)
    r = m + y
    return tl.fma(e, 0.693359375, r)


@triton.jit
def _sincos_2pi_f32(u):
    """(sin 2πu, cos 2πu) for u in (0, 1), exact range reduction in u (docs/noise.md §6)."""
    t = u * 4.0
    q = tl.floor(t + 0.5)
    r = t - q
    r2 = r * r
    s = tl.fma(tl.full(r.shape, 0.00016044118092395365, tl.float32), r2, -0.004681753925979137)
    s = tl.fma(s, r2, 0.07969262450933456)
    s = tl.fma(s, r2, -0.6459640860557556)
    s = tl.fma(s, r2, 1.5707963705062866)
    s = r * s
    c = tl.fma(tl.full(r.shape, -2.520204179745633e-05, tl.float32), r2, 0.0009192602592520416)
    c = tl.fma(c, r2, -0.020863480865955353)
    c = tl.fma(c, r2, 0.25366950035095215)
    c = tl.fma(c, r2, -1.2337005138397217)
    c = tl.fma(c, r2, 1.0)
    quadrant = q.to(tl.int32) & 3
    sin = tl.where(quadrant == 0, s, tl.where(quadrant == 1, c, tl.where(quadrant == 2, -s, -c)))
    cos = tl.where(quadrant == 0, c, tl.where(quadrant == 1, -s, tl.where(quadrant == 2, -c, s)))
    return sin, cos


@triton.jit
def _uniform(x):
    """u = ((x >> 8) | 1) * 2^-24, exact in float32, in (0, 1)."""
    return ((x >> 8) | 1).to(tl.float32) * 5.960464477539063e-08


@triton.jit
def _laplace(u):
    w = 2.0 * tl.minimum(u, 1.0 - u)
    lw = _log_f32(w)
    return tl.where(u < 0.5, lw, -lw)


@triton.jit
def _noise_tile(seed_lo, seed_hi, key, step, quads, noise_type, scale):
    """[Q, 4] float32 noise for the quads `quads` (int64 [Q]) of parameter `key` at `step`."""
    c0 = (quads & 0xFFFFFFFF).to(tl.uint32)
    c1 = (quads >> 32).to(tl.uint32)
    c2 = tl.zeros_like(c0) + key.to(tl.uint32)
    c3 = tl.zeros_like(c0) + step.to(tl.uint32)
    k0 = tl.to_tensor(seed_lo).to(tl.uint32)
    k1 = tl.to_tensor(seed_hi).to(tl.uint32)
    x0, x1, x2, x3 = tl.philox_impl(c0, c1, c2, c3, k0, k1)
    u0 = _uniform(x0)
    u1 = _uniform(x1)
    u2 = _uniform(x2)
    u3 = _uniform(x3)
    if noise_type == 0:
        rad01 = tl.sqrt_rn(-2.0 * _log_f32(u0))
        sin1, cos1 = _sincos_2pi_f32(u1)
        rad23 = tl.sqrt_rn(-2.0 * _log_f32(u2))
        sin3, cos3 = _sincos_2pi_f32(u3)
        z0 = rad01 * cos1
        z1 = rad01 * sin1
        z2 = rad23 * cos3
        z3 = rad23 * sin3
    elif noise_type == 1:
        z0 = _laplace(u0)
        z1 = _laplace(u1)
        z2 = _laplace(u2)
        z3 = _laplace(u3)
    else:
        z0 = 2.0 * u0 - 1.0
        z1 = 2.0 * u1 - 1.0
        z2 = 2.0 * u2 - 1.0
        z3 = 2.0 * u3 - 1.0
    lane = tl.arange(0, 4)[None, :]
    z = tl.where(lane == 0, z0[:, None],
                 tl.where(lane == 1, z1[:, None], tl.where(lane == 2, z2[:, None], z3[:, None])))
    return scale * z


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
    """base ** exponent (float64) by binary exponentiation over 32 bits (tables.power)."""
    result = tl.full([], 1.0, tl.float64)
    x = base
    for bit in tl.static_range(32):
        result = tl.where(((exponent >> bit) & 1) != 0, result * x, result)
        x = x * x
    return result


@triton.jit
def _new_step_after(t, num_iters):
    """The step whose noise step t adds: none (0) at the end of every num_iters (update.h new_step_after)."""
    return tl.where(t % num_iters == 0, 0, t)


@triton.jit
def _nvrm_kernel(blocks, ints, floats, seed_lo, seed_hi, grad_scale, found_inf,
                 OP: tl.constexpr, DTYPE: tl.constexpr, BLOCK: tl.constexpr,
                 INT_COLUMNS: tl.constexpr, FLOAT_COLUMNS: tl.constexpr,
                 HAS_GRAD_SCALE: tl.constexpr, HAS_FOUND_INF: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    row = tl.load(blocks + 2 * pid)
    start = tl.load(blocks + 2 * pid + 1)
    irow = ints + row * INT_COLUMNS
    frow = floats + row * FLOAT_COLUMNS
    numel = tl.load(irow + 5)
    key = tl.load(irow + 6)
    old_step = tl.load(irow + 7)
    new_step = tl.load(irow + 8)
    flags = tl.load(irow + 9)
    offset = tl.load(irow + 10)
    old_type = flags & 3
    old_scale = tl.load(frow + 10)
    momentum_init = (flags & 64) != 0
    step_size = tl.load(frow + 7)
    sqrt_bc2 = tl.load(frow + 8)
    decay = tl.load(frow + 9)
    live_address = tl.load(irow + 12)
    if live_address != 0:  # capturable mode: resolve the row from its live counters (update.h resolve_live)
        live = live_address.to(tl.pointer_type(tl.float64))
        t = tl.load(live + 0).to(tl.int64) + 1
        new_step = _new_step_after(t, tl.load(irow + 13))
        old_step = tl.load(live + 1).to(tl.int64)
        old_type = tl.load(live + 2).to(tl.int64)
        old_scale = tl.load(live + 3).to(tl.float32)
        momentum_init = tl.load(live + 4) != 0.0
        if OP == 1:  # float64 division and sqrt are IEEE-rounded (div.rn.f64, sqrt.rn.f64)
            lr = tl.load(frow + 0).to(tl.float64)
            step_size = (lr / (1.0 - _power(tl.load(frow + 2).to(tl.float64), t))).to(tl.float32)
            sqrt_bc2 = tl.sqrt(1.0 - _power(tl.load(frow + 4).to(tl.float64), t)).to(tl.float32)
            decay = (1.0 - lr * tl.load(frow + 1).to(tl.float64)).to(tl.float32)

    quads = start // 4 + tl.arange(0, BLOCK // 4).to(tl.int64)
    local = quads[:, None] * 4 + tl.arange(0, 4)[None, :] - offset
    mask = (local >= 0) & (local < numel)
    if HAS_FOUND_INF:  # a skipped step writes nothing
        mask = mask & (tl.load(found_inf + tl.zeros([BLOCK // 4, 4], tl.int32)) == 0.0)
    param_ptr = tl.load(irow + 0).to(tl.pointer_type(DTYPE))
    p = tl.load(param_ptr + local, mask=mask, other=0.0).to(tl.float32)
    # 16-bit parameters carry a compensation buffer: the weight is param + comp
    comp_address = tl.load(irow + 11)
    comp_ptr = comp_address.to(tl.pointer_type(DTYPE))
    if comp_address != 0:
        p = p + tl.load(comp_ptr + local, mask=mask, other=0.0).to(tl.float32)

    if OP != 2:
        grad_ptr = tl.load(irow + 1).to(tl.pointer_type(DTYPE))
        g = tl.load(grad_ptr + local, mask=mask, other=0.0)
        if HAS_GRAD_SCALE:  # GradScaler's fused protocol: unscale, round, write back
            g = _to_storage(tl.div_rn(g.to(tl.float32), tl.load(grad_scale)), DTYPE)
            tl.store(grad_ptr + local, g, mask=mask)
        g = g.to(tl.float32)
    if OP == 0:  # SGD
        d = g
        if (flags & 16) != 0:
            d = g + tl.load(frow + 1) * p
        if (flags & 32) != 0:
            momentum = tl.load(frow + 2)
            buf_ptr = tl.load(irow + 2).to(tl.pointer_type(DTYPE))
            if momentum_init:
                buf = d
            else:
                buf = momentum * tl.load(buf_ptr + local, mask=mask, other=0.0).to(tl.float32) \
                    + tl.load(frow + 3) * d
            tl.store(buf_ptr + local, _to_storage(buf, DTYPE), mask=mask)
            if (flags & 128) != 0:
                d = d + momentum * buf
            else:
                d = buf
        p = p - tl.load(frow + 0) * d
    elif OP == 1:  # Adam
        if (flags & 512) != 0:
            p = p * decay
        else:
            g = g + tl.load(frow + 1) * p
        m_ptr = tl.load(irow + 2).to(tl.pointer_type(DTYPE))
        v_ptr = tl.load(irow + 3).to(tl.pointer_type(DTYPE))
        m = tl.load(frow + 2) * tl.load(m_ptr + local, mask=mask, other=0.0).to(tl.float32) + tl.load(frow + 3) * g
        v = tl.load(frow + 4) * tl.load(v_ptr + local, mask=mask, other=0.0).to(tl.float32) \
            + (tl.load(frow + 5) * g) * g
        tl.store(m_ptr + local, _to_storage(m, DTYPE), mask=mask)
        tl.store(v_ptr + local, _to_storage(v, DTYPE), mask=mask)
        if (flags & 256) != 0:
            vmax_ptr = tl.load(irow + 4).to(tl.pointer_type(DTYPE))
            v = tl.maximum(tl.load(vmax_ptr + local, mask=mask, other=0.0).to(tl.float32), v)
            tl.store(vmax_ptr + local, _to_storage(v, DTYPE), mask=mask)
        denom = tl.div_rn(tl.sqrt_rn(v), sqrt_bc2) + tl.load(frow + 6)
        p = p - step_size * tl.div_rn(m, denom)

    n_old = tl.zeros([BLOCK // 4, 4], tl.float32)
    if old_step != 0:
        n_old = _noise_tile(seed_lo, seed_hi, key, old_step, quads, old_type, old_scale)
    n_new = tl.zeros([BLOCK // 4, 4], tl.float32)
    if new_step != 0:
        n_new = _noise_tile(seed_lo, seed_hi, key, new_step, quads, (flags >> 2) & 3, tl.load(frow + 11))
    p = p + (n_new - n_old)
    if comp_address != 0:  # keep what rounding to the storage type drops (update.h split_store)
        stored = _to_storage(p, DTYPE)
        tl.store(param_ptr + local, stored, mask=mask)
        tl.store(comp_ptr + local, _to_storage(p - stored.to(tl.float32), DTYPE), mask=mask)
    else:
        tl.store(param_ptr + local, _to_storage(p, DTYPE), mask=mask)


@triton.jit
def _commit_kernel(ints, floats, found_inf, commit_rows, ROWS: tl.constexpr,
                   INT_COLUMNS: tl.constexpr, FLOAT_COLUMNS: tl.constexpr, HAS_FOUND_INF: tl.constexpr):
    """Capturable mode: advance the live counters past the step (update.h commit_live); runs
    after the update kernel, so every block has resolved its row."""
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS).to(tl.int64)
    mask = rows < commit_rows
    if HAS_FOUND_INF:
        mask = mask & (tl.load(found_inf + tl.zeros([ROWS], tl.int32)) == 0.0)
    irow = ints + rows * INT_COLUMNS
    live_address = tl.load(irow + 12, mask=mask, other=0)
    mask = mask & (live_address != 0)
    live = live_address.to(tl.pointer_type(tl.float64))
    flags = tl.load(irow + 9, mask=mask, other=0)
    t = tl.load(live + 0, mask=mask, other=0.0).to(tl.int64) + 1
    new_step = _new_step_after(t, tl.load(irow + 13, mask=mask, other=1))
    tl.store(live + 0, t.to(tl.float64), mask=mask)
    tl.store(live + 1, tl.where((flags & 1024) != 0, 0, new_step).to(tl.float64), mask=mask)
    tl.store(live + 2, ((flags >> 2) & 3).to(tl.float64), mask=mask)
    tl.store(live + 3, tl.load(floats + rows * FLOAT_COLUMNS + 11, mask=mask, other=0.0).to(tl.float64), mask=mask)
    tl.store(live + 4, tl.zeros([ROWS], tl.float64), mask=mask)


class TritonBackend:
    name = "triton"
    block_size = BLOCK

    def unavailable_reason(self, device: torch.device, dtype: torch.dtype) -> str | None:
        return unavailable_reason(device, dtype, "the Triton kernel")

    def launch(self, op: int, dtype: torch.dtype, ints: torch.Tensor, floats: torch.Tensor,
               blocks: torch.Tensor, seed: int, *, commit_rows: int = 0,
               grad_scale: torch.Tensor | None = None, found_inf: torch.Tensor | None = None) -> None:
        """One update launch over `blocks`, then (commit_rows > 0, capturable mode) one commit
        launch over the live counters of the first commit_rows rows."""
        assert ints.shape[1] == T.INT_COLUMNS and floats.shape[1] == T.FLOAT_COLUMNS
        assert op != T.OP_NOISE or commit_rows == 0, "OP_NOISE launches commit no counters"
        placeholder = floats  # any pointer: the kernel does not read an absent scalar
        flags = dict(HAS_GRAD_SCALE=grad_scale is not None, HAS_FOUND_INF=found_inf is not None)
        grad_scale = placeholder if grad_scale is None else grad_scale
        found_inf = placeholder if found_inf is None else found_inf
        if blocks.shape[0]:
            # Triton types a Python int by its value (int32 below 2**31, else int64); the kernel
            # converts each key word to uint32.
            _nvrm_kernel[(blocks.shape[0],)](
                blocks, ints, floats, seed & 0xFFFFFFFF, seed >> 32, grad_scale, found_inf,
                OP=op, DTYPE=TL_DTYPES[dtype], BLOCK=BLOCK,
                INT_COLUMNS=T.INT_COLUMNS, FLOAT_COLUMNS=T.FLOAT_COLUMNS,
                num_warps=8, enable_fp_fusion=False, **flags)
        if commit_rows:
            _commit_kernel[(triton.cdiv(commit_rows, _COMMIT_ROWS),)](
                ints, floats, found_inf, commit_rows, ROWS=_COMMIT_ROWS,
                INT_COLUMNS=T.INT_COLUMNS, FLOAT_COLUMNS=T.FLOAT_COLUMNS,
                HAS_FOUND_INF=flags["HAS_FOUND_INF"], enable_fp_fusion=False)


TRITON = TritonBackend()
