"""The original NVRM algorithm as published: per-tensor PyTorch ops, two stored noise buffers.

Written from the algorithm of Xie et al. (Neural Computation 2021) and its reference code's
behaviour, for two uses: the baseline every benchmark compares against, and the independent
oracle of the trajectory tests (which feed it the noise the fused optimizers used, through
`noise_fn`). Not optimized on purpose -- this is what users run today.
"""
from __future__ import annotations

import math

import torch
from torch.optim import Optimizer
from torch.optim.optimizer import required


def _draw(noise_type: str, like: torch.Tensor, variability: float) -> torch.Tensor:
    if noise_type == "Gaussian":
        return torch.normal(torch.zeros_like(like), variability)
    if noise_type == "Laplace":
        return torch.distributions.Laplace(torch.zeros_like(like), variability).sample()
    if noise_type == "Uniform":
        return torch.distributions.Uniform(torch.zeros_like(like) - variability,
                                           torch.zeros_like(like) + variability).sample()
    raise ValueError(f"Invalid noise_type {noise_type!r}")


class _OriginalNVRM(Optimizer):
    """Shared noise bookkeeping: noise1 (on the weights) and noise2 (fresh), 8 bytes/element."""

    def __init__(self, params, defaults, noise_fn=None):
        super().__init__(params, defaults)
        # noise_fn(param_index, param, step) -> the noise to add after that step (tests use it to
        # replay another optimizer's noise); None draws it like the original code.
        self._noise_fn = noise_fn
        self._index = {p: i for i, p in enumerate(p for g in self.param_groups for p in g["params"])}

    def _renoise(self, p, group, state):
        noise1, noise2 = state["noise1"], state["noise2"]
        if state["step"] % group["num_iters"] != 0:
            if self._noise_fn is None:
                fresh = _draw(group["noise_type"], p, group["variability"])
            else:
                fresh = self._noise_fn(self._index[p], p, state["step"])
            noise2.copy_(fresh)
            p.add_(noise2 - noise1)
            noise1.copy_(noise2)
        else:
            p.add_(-noise1)
            noise1.zero_()

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if len(state) == 0:
                    state["step"] = 0
                    state["noise1"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["noise2"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                self._update(p, group, state)
                self._renoise(p, group, state)
        return loss

    def _update(self, p, group, state) -> None:
        """The base optimizer's update of p (its gradient taken at the perturbed weights)."""
        raise NotImplementedError


class OriginalVSGD(_OriginalNVRM):
    def __init__(self, params, lr=required, variability=0.01, num_iters=1000, momentum=0, dampening=0,
                 weight_decay=0, noise_type="Gaussian", nesterov=False, noise_fn=None):
        defaults = dict(lr=lr, variability=variability, num_iters=num_iters, momentum=momentum,
                        dampening=dampening, weight_decay=weight_decay, noise_type=noise_type,
                        nesterov=nesterov)
        super().__init__(params, defaults, noise_fn)

    def _update(self, p, group, state) -> None:
        d_p = p.grad
        if group["weight_decay"] != 0:
            d_p = d_p.add(p, alpha=group["weight_decay"])
        if group["momentum"] != 0:
            if "momentum_buffer" not in state:
                buf = state["momentum_buffer"] = torch.clone(d_p).detach()
            else:
                buf = state["momentum_buffer"]
                buf.mul_(group["momentum"]).add_(d_p, alpha=1 - group["dampening"])
            d_p = d_p.add(buf, alpha=group["momentum"]) if group["nesterov"] else buf
        p.add_(d_p, alpha=-group["lr"])


class OriginalVAdam(_OriginalNVRM):
    def __init__(self, params, lr=1e-3, variability=0.01, num_iters=1000, betas=(0.9, 0.999),
                 eps=1e-8, weight_decay=0, noise_type="Gaussian", amsgrad=False, decoupled=False,
                 noise_fn=None):
        defaults = dict(lr=lr, variability=variability, num_iters=num_iters, betas=betas, eps=eps,
                        weight_decay=weight_decay, noise_type=noise_type, amsgrad=amsgrad,
                        decoupled=decoupled)
        super().__init__(params, defaults, noise_fn)

    def _update(self, p, group, state) -> None:
        beta1, beta2 = group["betas"]
        grad = p.grad
        if "exp_avg" not in state:
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if group["amsgrad"]:
                state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        bias_correction1 = 1 - beta1 ** state["step"]
        bias_correction2 = 1 - beta2 ** state["step"]
        if group["decoupled"]:
            p.mul_(1 - group["lr"] * group["weight_decay"])
        else:
            grad = grad.add(p, alpha=group["weight_decay"])  # the original does this in place
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        if group["amsgrad"]:
            torch.max(state["max_exp_avg_sq"], exp_avg_sq, out=state["max_exp_avg_sq"])
            second = state["max_exp_avg_sq"]
        else:
            second = exp_avg_sq
        denom = (second.sqrt() / math.sqrt(bias_correction2)).add_(group["eps"])
        p.addcdiv_(exp_avg, denom, value=-group["lr"] / bias_correction1)
