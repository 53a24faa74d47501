"""Shared pieces of the edge and fuzz tests: an independent reference (plain torch.optim on the
clean weights plus the noise of nvrm_ext/noise.py) and a snapshot of everything a refused call
must leave as it was (weights, per-parameter state, param groups)."""
from __future__ import annotations

import math

import torch

from nvrm_ext import noise as spec


def make_params(shapes=((5, 3), (7,), (2, 2, 2)), seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g).to(dtype)) for s in shapes]


def set_grads(params, seed):
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g).to(p.dtype)


def _copy(value):
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_copy(v) for v in value)
    return value


def _bytes(t: torch.Tensor) -> torch.Tensor:
    """Bit patterns, so that NaN equals NaN and -0 differs from +0."""
    return t.detach().reshape(-1).view(torch.uint8)


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype
                and a.shape == b.shape and a.stride() == b.stride()
                and torch.equal(_bytes(a), _bytes(b)))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(_same, a, b))
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return type(a) is type(b) and a == b


def snapshot(opt, params) -> tuple:
    """Everything a refused operation must leave untouched, copied bit for bit."""
    flat = [p for group in opt.param_groups for p in group["params"]]
    return ([p.detach().clone() for p in params],
            {index: _copy(opt.state[p]) for index, p in enumerate(flat) if p in opt.state},
            [{k: (list(map(id, v)) if k == "params" else _copy(v)) for k, v in group.items()}
             for group in opt.param_groups],
            len(opt.state))


def assert_unchanged(opt, params, before) -> None:
    after = snapshot(opt, params)
    weights, state, groups, count = before
    for index, (a, b) in enumerate(zip(weights, after[0])):
        assert _same(a, b), f"parameter {index} changed"
    assert count == after[3], "entries were added to or removed from optimizer.state"
    assert state.keys() == after[1].keys(), "per-parameter state entries changed"
    for index in state:
        assert _same(state[index], after[1][index]), f"state of parameter {index} changed"
    assert _same(groups, after[2]), "param_groups changed"


class ReferenceSGD:
    """NVRM-SGD as the specification says, per parameter: torch.optim.SGD (no weight decay: it
    would act on the perturbed weights) updates the clean weights, and the weights carry
    noise(seed, key, t) after step t unless t % num_iters == 0."""

    def __init__(self, clean, *, lr, momentum, seed, variability, num_iters, noise_type="Gaussian"):
        self.clean = [torch.nn.Parameter(c.detach().clone().float()) for c in clean]
        self.torch_opt = torch.optim.SGD(self.clean, lr=lr, momentum=momentum)
        self.seed, self.variability, self.num_iters, self.noise_type = seed, variability, num_iters, noise_type
        self.steps = [0] * len(self.clean)

    def step(self, grads):
        for p, g in zip(self.clean, grads):
            p.grad = None if g is None else g.detach().float().clone()
        self.torch_opt.step()
        for key, g in enumerate(grads):
            if g is not None:
                self.steps[key] += 1

    def noisy(self, key):
        t = self.steps[key]
        step = 0 if t % self.num_iters == 0 else t
        p = self.clean[key]
        return p.detach() + spec.noise(self.noise_type, self.variability, self.seed, key, step,
                                       p.numel()).view(p.shape)
