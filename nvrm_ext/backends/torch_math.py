"""The 'torch' backend's update arithmetic, stated once per tensor (docs/noise.md §7).

Only single binary ops (no `alpha=` forms that a vectorized kernel might contract into an fma),
so it rounds exactly like the fused kernels. torch_ref runs it row by row (the readable path),
torch_step compiles it together with the noise, and torch_update runs the same operations on
lists of tensors (torch._foreach_*).
"""
from __future__ import annotations

import numpy as np
import torch

from . import tables as T


def _math_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _sqrt_rn(x: torch.Tensor) -> torch.Tensor:
    """Correctly rounded sqrt (as the kernels'): ATen's float32 and float64 CPU sqrt are not always."""
    if x.dtype == torch.float64:
        if x.device.type == "cpu" and not torch.compiler.is_compiling():
            # numpy's is the hardware instruction, correctly rounded (as is compiled code's)
            return torch.from_numpy(np.sqrt(x.numpy()))
        return torch.sqrt(x)
    return torch.sqrt(x.double()).to(x.dtype)  # rounding the float64 root once is exact here


def _sgd(p, g, flags, f, states):
    d = g
    if flags & T.FLAG_WEIGHT_DECAY:
        d = d + f[T.F_WEIGHT_DECAY] * p
    if flags & T.FLAG_MOMENTUM:
        buf = states[0]
        if flags & T.FLAG_MOMENTUM_INIT:
            new_buf = d
        else:
            new_buf = f[T.F_MOMENTUM] * buf.to(p.dtype) + f[T.F_MOMENTUM_COEF] * d
        buf.copy_(new_buf)
        d = d + f[T.F_MOMENTUM] * new_buf if flags & T.FLAG_NESTEROV else new_buf
    return p - f[T.F_LR] * d


def _adam(p, g, flags, f, states):
    if flags & T.FLAG_DECOUPLED:
        p = p * f[T.F_DECAY]
    else:
        g = g + f[T.F_WEIGHT_DECAY] * p
    exp_avg, exp_avg_sq, max_exp_avg_sq = states
    m = f[T.F_MOMENTUM] * exp_avg.to(p.dtype) + f[T.F_MOMENTUM_COEF] * g
    v = f[T.F_BETA2] * exp_avg_sq.to(p.dtype) + (f[T.F_BETA2_COEF] * g) * g
    exp_avg.copy_(m)
    exp_avg_sq.copy_(v)
    if flags & T.FLAG_AMSGRAD:
        # torch.maximum, with update.h's NaN: the NaN operand itself (torch.maximum's vectorized
        # CPU kernel returns an all-ones NaN), so every backend keeps the same bits
        vmax = max_exp_avg_sq.to(p.dtype)
        v = torch.where((vmax > v) | vmax.isnan(), vmax, v)
        max_exp_avg_sq.copy_(v)
    denom = _sqrt_rn(v) / f[T.F_SQRT_BC2] + f[T.F_EPS]
    return p - f[T.F_STEP_SIZE] * (m / denom)


def update_one(op: int, param, grad, states, comp, flags: int, f, delta, scale=None) -> None:
    """One row's update and noise swap, in place: `f` its float table row (a list, or a float32
    tensor in a compiled step program), `delta` n_new - n_old laid out like the parameter (or
    None), `scale` GradScaler's scale (a float or a 0-dim tensor) or None."""
    p = param.to(_math_dtype(param.dtype))
    if comp is not None:  # 16-bit parameters: the weight is param + comp
        p = p + comp.to(p.dtype)
    if op != T.OP_NOISE:
        if scale is not None:  # GradScaler's fused protocol: unscale, round, write back
            grad.copy_(grad.to(p.dtype) / scale)
        g = grad.to(p.dtype)
        p = (_sgd if op == T.OP_SGD else _adam)(p, g, flags, f, states)
    if delta is not None:  # n_new - n_old (torch_noise)
        p = p + delta.to(p.dtype)
    if comp is not None:  # keep what rounding to the storage type drops
        stored = p.to(param.dtype)
        comp.copy_(p - stored.to(p.dtype))
        param.copy_(stored)
    else:
        param.copy_(p)
