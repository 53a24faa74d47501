"""FusedVAdam: NVRM-Adam (Adam with bias correction, amsgrad, L2 or decoupled weight decay)."""
from __future__ import annotations

import torch

from ..backends import tables as T
from . import validation as V
from .base import NeuralVariableOptimizer


class FusedVAdam(NeuralVariableOptimizer):
    r"""Neural-variable Adam (VAdam / NVRM-Adam, Xie et al., Neural Computation 2021), fused.

    Drop-in for the original ``variable_optim.VAdam``: Adam with bias correction (``eps`` added
    after the bias-corrected square root), ``amsgrad``, and ``decoupled=True`` for AdamW-style
    weight decay (``p *= 1 - lr*weight_decay``) instead of L2 (``g += weight_decay*p``); both act
    on the perturbed weights, as in the original. Unlike the original, ``p.grad`` is not
    modified by the L2 term. Noise handling, ``num_iters``, ``seed``, ``backend``, ``denoise``,
    ``capturable``, ``variability=0`` groups, ``denoised()`` / ``remove_noise()`` /
    ``restore_noise()`` / ``reset_noise()`` as in :class:`FusedVSGD`.
    """

    _op = T.OP_ADAM

    def __init__(self, params, lr=1e-3, variability=0.01, num_iters=1000, betas=(0.9, 0.999),
                 eps=1e-8, weight_decay=0, noise_type="Gaussian", amsgrad=False, decoupled=False,
                 *, relative=False, seed=None, backend="auto", denoise=True, capturable=False):
        defaults = dict(lr=lr, variability=variability, num_iters=num_iters, betas=betas, eps=eps,
                        weight_decay=weight_decay, noise_type=noise_type, amsgrad=amsgrad,
                        decoupled=decoupled, relative=relative)
        super().__init__(params, defaults, seed=seed, backend=backend, denoise=denoise,
                         capturable=capturable)

    def _validate_group(self, group: dict) -> None:
        super()._validate_group(group)
        betas = group["betas"]
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"Invalid betas: {betas!r} (expected a pair (beta1, beta2))")
        for index, beta in enumerate(betas):
            if isinstance(beta, torch.Tensor):  # torch.optim.Adam takes one-element tensor betas
                if beta.numel() != 1 or beta.is_complex() or beta.device.type == "meta":
                    raise ValueError(f"Invalid beta parameter at index {index}: {beta!r} (expected a number)")
                beta = beta.item()
            V.check_number(f"Invalid beta parameter at index {index}", beta, high=1.0, high_open=True)
        V.check_number("Invalid epsilon value", group["eps"])
        V.check_flag("amsgrad", group["amsgrad"])
        V.check_flag("decoupled", group["decoupled"])

    def _state_signature(self, group: dict):
        return bool(group["amsgrad"])

    def _state_tensors(self, group: dict, p: torch.Tensor, state: dict):
        for name in ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if group["amsgrad"] else ()):
            if name not in state:
                state[name] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return (state["exp_avg"], state["exp_avg_sq"], state.get("max_exp_avg_sq") if group["amsgrad"] else None), False

    def _group_row(self, group: dict):
        flags = (T.FLAG_AMSGRAD if group["amsgrad"] else 0) | (T.FLAG_DECOUPLED if group["decoupled"] else 0)
        beta1, beta2 = group["betas"]
        row = [0.0] * T.FLOAT_COLUMNS  # the step-dependent columns: tables.resolve_rows
        row[T.F_LR], row[T.F_WEIGHT_DECAY], row[T.F_EPS] = self._host_lr(group), group["weight_decay"], group["eps"]
        row[T.F_MOMENTUM], row[T.F_MOMENTUM_COEF] = beta1, 1.0 - beta1
        row[T.F_BETA2], row[T.F_BETA2_COEF] = beta2, 1.0 - beta2
        return flags, row
