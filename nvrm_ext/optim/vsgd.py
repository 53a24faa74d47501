"""FusedVSGD: NVRM-SGD (SGD with momentum, dampening, nesterov, L2 weight decay)."""
from __future__ import annotations

import torch
from torch.optim.optimizer import required

from ..backends import tables as T
from . import validation as V
from .base import NeuralVariableOptimizer


class FusedVSGD(NeuralVariableOptimizer):
    r"""Neural-variable SGD (VSGD / NVRM-SGD, Xie et al., Neural Computation 2021), fused.

    Drop-in for the original ``variable_optim.VSGD`` (same arguments, same math given the same
    noise): the gradient is taken at the perturbed weights ``w + b``, the SGD update
    (``torch.optim.SGD`` semantics; weight decay acts on the perturbed weights, as in the
    original) is applied, the previous noise is removed and fresh noise
    ``b ~ noise_type(variability)`` is added. Every ``num_iters``-th step of a parameter adds no
    new noise, so the weights are clean then (the original's end-of-epoch evaluation point).

    No noise is stored: it is regenerated from ``(seed, parameter, step, element)``
    (docs/noise.md), and the whole step is one kernel launch per (device, dtype).

    Between steps the parameters hold *perturbed* weights; evaluate or save inside
    ``with optimizer.denoised():`` (the noisy weights come back bit for bit), or between
    ``remove_noise()`` and ``restore_noise()``. Weights rewritten outside the optimizer while
    they carry its noise raise :class:`nvrm_ext.WeightsChangedError` at the next noise
    operation; ``reset_noise()`` declares them clean.

    Args:
        params: iterable of parameters or of dicts defining parameter groups.
        lr: learning rate (required, here or in every parameter group).
        variability: noise scale (Gaussian std, Laplace scale b, Uniform half-width); 0 makes
            a group the plain base optimizer (no noise; e.g. biases and norm layers).
        num_iters: steps per epoch; every num_iters-th step leaves the weights clean.
        momentum, dampening, weight_decay, nesterov: as in torch.optim.SGD.
        noise_type: 'Gaussian', 'Laplace' or 'Uniform'.
        relative: False: ``variability`` is the noise scale itself; True: the scale of tensor k is
            ``variability`` times the standard deviation of its weights, measured at the first
            step of each ``num_iters`` period (docs/noise.md §5.1). Per group.
        seed: 64-bit noise seed; None draws it from torch's default generator.
        backend: 'auto', 'torch', 'triton', 'cpu' or 'cuda'.
        denoise: False gives PSGD (noise added each step, never removed), the paper's
            perturbed-gradient baseline.
        capturable: keep the per-parameter counters on the parameters' device (``state["step"]``
            etc. become 0-dim float64 tensors) and the launch tables there, so that ``step()``
            reads nothing back to the host: it can be captured in a CUDA graph, and it accepts
            ``torch.amp.GradScaler``'s fused protocol (``grad_scale`` / ``found_inf``: the
            gradients are unscaled in place and an inf step is skipped on the device). A tensor
            ``lr`` is then read on the device at every step. Same trajectory, bit for bit, as
            ``capturable=False``; checkpoints move freely between the two.
    """

    _op = T.OP_SGD

    def __init__(self, params, lr=required, variability=0.01, num_iters=1000, momentum=0, dampening=0,
                 weight_decay=0, noise_type="Gaussian", nesterov=False, *, relative=False, seed=None,
                 backend="auto", denoise=True, capturable=False):
        defaults = dict(lr=lr, variability=variability, num_iters=num_iters, momentum=momentum,
                        dampening=dampening, weight_decay=weight_decay, noise_type=noise_type,
                        nesterov=nesterov, relative=relative)
        super().__init__(params, defaults, seed=seed, backend=backend, denoise=denoise,
                         capturable=capturable)

    def _validate_group(self, group: dict) -> None:
        super()._validate_group(group)
        V.check_number("Invalid momentum value", group["momentum"])
        V.check_number("Invalid dampening value", group["dampening"], high=1.0)
        V.check_flag("nesterov", group["nesterov"])
        if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
            raise ValueError("Nesterov momentum requires a momentum > 0 and zero dampening")

    def _state_signature(self, group: dict):
        return group["momentum"] != 0

    def _state_tensors(self, group: dict, p: torch.Tensor, state: dict):
        if group["momentum"] == 0:
            return (None, None, None), False
        buf = state.get("momentum_buffer")
        fresh = buf is None
        if fresh:  # torch.optim.SGD semantics: the first direction initialises the buffer
            buf = state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return (buf, None, None), fresh

    def _group_row(self, group: dict):
        flags = T.FLAG_WEIGHT_DECAY if group["weight_decay"] != 0 else 0
        if group["momentum"] != 0:
            flags |= T.FLAG_MOMENTUM | (T.FLAG_NESTEROV if group["nesterov"] else 0)
        row = [0.0] * T.FLOAT_COLUMNS
        row[T.F_LR] = self._host_lr(group)
        row[T.F_WEIGHT_DECAY] = group["weight_decay"]
        row[T.F_MOMENTUM] = group["momentum"]
        row[T.F_MOMENTUM_COEF] = 1.0 - group["dampening"]
        return flags, row
