"""FusedVAdam: NVRM-Adam (Adam with bias correction, amsgrad, L2 or decoupled weight decay)."""
from __future__ import annotations

import math

import torch

from ..backends import tables as T
from .base import NeuralVariableOptimizer


class FusedVAdam(NeuralVariableOptimizer):
    r"""Neural-variable Adam (VAdam / NVRM-Adam, Xie et al., Neural Computation 2021), fused.

    Drop-in for the original ``variable_optim.VAdam``: Adam with bias correction (``eps`` added
    after the bias-corrected square root), ``amsgrad``, and ``decoupled=True`` for AdamW-style
    weight decay (``p *= 1 - lr*weight_decay``) instead of L2 (``g += weight_decay*p``); both act
    on the perturbed weights, as in the original. Unlike the original, ``p.grad`` is not
    modified by the L2 term. Noise handling, ``num_iters``, ``seed``, ``backend``, ``denoise``
    and ``denoised()`` as in :class:`FusedVSGD`.
    """

    _op = T.OP_ADAM

    def __init__(self, params, lr=1e-3, variability=0.01, num_iters=1000, betas=(0.9, 0.999),
                 eps=1e-8, weight_decay=0, noise_type="Gaussian", amsgrad=False, decoupled=False,
                 *, seed=None, backend="auto", denoise=True):
        defaults = dict(lr=lr, variability=variability, num_iters=num_iters, betas=betas, eps=eps,
                        weight_decay=weight_decay, noise_type=noise_type, amsgrad=amsgrad,
                        decoupled=decoupled)
        super().__init__(params, defaults, seed=seed, backend=backend, denoise=denoise)

    def _validate_group(self, group: dict) -> None:
        super()._validate_group(group)
        betas = group["betas"]
        if len(betas) != 2:
            raise ValueError(f"Invalid betas: {betas!r} (expected a pair (beta1, beta2))")
        for index, beta in enumerate(betas):
            if not 0.0 <= beta < 1.0:
                raise ValueError(f"Invalid beta parameter at index {index}: {beta!r} (expected 0 <= beta < 1)")
        if not group["eps"] >= 0.0:
            raise ValueError(f"Invalid epsilon value: {group['eps']!r} (expected a number >= 0)")

    def _row(self, group: dict, p: torch.Tensor, state: dict, step: int):
        if "exp_avg" not in state:
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        flags = 0
        max_exp_avg_sq = None
        if group["amsgrad"]:
            flags |= T.FLAG_AMSGRAD
            max_exp_avg_sq = state.get("max_exp_avg_sq")
            if max_exp_avg_sq is None:
                max_exp_avg_sq = state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        if group["decoupled"]:
            flags |= T.FLAG_DECOUPLED
        lr = float(group["lr"])
        beta1, beta2 = group["betas"]
        wd = group["weight_decay"]
        hyper = [lr, wd, beta1, 1.0 - beta1, beta2, 1.0 - beta2, group["eps"],
                 lr / (1.0 - beta1 ** step), math.sqrt(1.0 - beta2 ** step), 1.0 - lr * wd]
        return (state["exp_avg"], state["exp_avg_sq"], max_exp_avg_sq), flags, hyper
