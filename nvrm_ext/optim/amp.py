"""FusedAMP: adversarial model perturbation (Zheng, Zhang & Mao, CVPR 2021) without host syncs.

The published optimizer (hiyouga/AMP-Regularizer, amp.py) clips each tensor's perturbation with a
Python ``if`` on a device scalar -- one host synchronisation per tensor per inner iteration -- and
runs several kernels per tensor. Here the per-tensor norms come from one multi-tensor reduction,
the clip factor ``min(1, epsilon / (norm + tiny))`` stays on the device, and clip + perturb and
restore are one launch each per (device, dtype) bucket (Triton on CUDA, torch._foreach_* ops
elsewhere). docs/amp.md describes the method and the few deliberate departures.
"""
from __future__ import annotations

import numbers
import operator

import numpy as np
import torch
from torch.optim import Optimizer
from torch.utils._pytree import tree_map

from ..backends import select
from ..backends.select import AMP_BACKENDS
from ..backends.tables import by_bucket, to_device

# The published code's guard against a zero norm in epsilon / (norm + tiny).
NORM_TINY = 1e-12
_ROW_PARAM = operator.itemgetter(1)  # the param of a (group, param, grad) row
_UNPERTURBED = "unperturbed"  # per-parameter state: theta, saved while theta + delta is evaluated


def _check_nonnegative(name: str, value, *, allow_tensor: bool = False) -> None:
    if allow_tensor and isinstance(value, torch.Tensor):
        if value.numel() != 1 or not bool(value.detach().cpu() >= 0):  # construction time only
            raise ValueError(f"Invalid {name}: {value!r} (expected a number >= 0)")
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value >= 0.0:
        raise ValueError(f"Invalid {name}: {value!r} (expected a number >= 0)")


class TorchAMPEngine:
    """Clip + perturb and restore with torch._foreach_* ops: the CPU path and the reference the
    Triton kernels match. Every per-tensor scalar stays a device tensor (no .item())."""

    name = "torch"

    @staticmethod
    def clip_and_perturb(params, unperturbed, sources, norms, epsilons, scales, *,
                         first: bool, tiny: float) -> None:
        """param = base + min(1, eps / (scale * norm + tiny)) * scale * source, per tensor.

        first: base is the parameter itself (theta), saved into `unperturbed`; otherwise base is
        that saved copy, so a later inner iteration replaces the previous perturbation.
        """
        if not params:
            return
        # The per-tensor factors as one vector: a handful of small ops instead of a handful per
        # tensor. Elementwise float32 math, the same operations as the Triton kernel.
        norms = torch.stack(norms)
        scales = to_device(np.asarray(scales, dtype=np.float32), norms.device)  # pinned, async
        epsilons = to_device(np.asarray(epsilons, dtype=np.float32), norms.device)
        factors = (epsilons * torch.reciprocal(norms * scales + tiny)).clamp_max_(1.0).mul_(scales)
        deltas = torch._foreach_mul(sources, factors.unbind(0))
        if first:
            torch._foreach_copy_(unperturbed, params)
            torch._foreach_add_(params, deltas)
        else:
            torch._foreach_add_(deltas, unperturbed)
            torch._foreach_copy_(params, deltas)

    @staticmethod
    def restore(params, unperturbed) -> None:
        """Copy theta back: bit-exact, unlike subtracting delta again."""
        if params:
            torch._foreach_copy_(params, unperturbed)


TORCH_AMP = TorchAMPEngine()


def _load_engine(name: str):
    """The fused perturbation engine called `name` (only 'triton'), imported lazily."""
    from ..ops import amp_triton
    return amp_triton.TRITON_AMP


class FusedAMP(Optimizer):
    r"""Adversarial model perturbation (AMP; Zheng, Zhang & Mao, CVPR 2021), host-sync free.

    AMP minimises the loss at the worst point of a norm ball around the weights. Each step:

    1. evaluate the closure at theta: its (outputs, loss) are what ``step`` returns (a closure
       may also return a bare loss, as torch.optim's and Lightning's do: ``step`` returns it);
    2. ``inner_iter`` times: ``delta <- delta + inner_lr * grad`` (delta = 0 at the start of the
       step, ``grad`` from the latest evaluation), clip each tensor's ``delta`` to L2 norm
       ``<= epsilon`` (factor ``min(1, epsilon / (||delta|| + 1e-12))``), put the weights at
       ``theta + delta`` and evaluate the closure there;
    3. put theta back and let the base optimizer step with the gradient taken at
       ``theta + delta``.

    Same interface and algorithm as the published ``AMP`` (hiyouga/AMP-Regularizer): ``epsilon``
    and ``inner_lr`` may differ per parameter group, ``inner_iter`` is per optimizer, and
    ``param_groups`` are the base optimizer's, so LR schedulers work. Parameters without a
    gradient at the first evaluation are not perturbed. ``step`` also clears the gradients before
    each evaluation, so a closure without ``zero_grad()`` is correct too.

    Defaults of the published training script (CIFAR, PreActResNet18 / WRN / PyramidNet):
    ``lr=0.1, epsilon=0.5, inner_lr=1, inner_iter=1`` with ``torch.optim.SGD``, ``momentum=0.9,
    weight_decay=1e-4, nesterov=True``, batch 50, gradients clipped to norm 50 in the closure.

    Cost: ``1 + inner_iter`` forward-backward passes per step, so with ``inner_iter=1`` a little
    under 2x an ERM step of the base optimizer when forward-backward dominates (the "~1.8x" usually
    quoted); on a small MLP (85k parameters, batch 64, one CPU thread), where the optimizer step is
    a sizeable share, we measured 2.1-2.3x in CPU time (bench/test_amp_step.py, docs/amp.md).
    Memory: one copy of the parameters (theta, saved while theta + delta is evaluated: the only
    extra state; keeping theta rather than delta makes the restore bit-exact).

    Args:
        params: iterable of parameters or of dicts defining parameter groups.
        lr: learning rate of the base optimizer (outer optimisation).
        epsilon: radius of the per-tensor L2 ball of the perturbation (>= 0; 0: the ERM update).
        inner_lr: step size of the inner ascent on delta (>= 0).
        inner_iter: ascent steps per step (>= 1).
        base_optimizer: any ``torch.optim.Optimizer`` class (or a callable such as
            ``functools.partial(FusedVSGD, seed=0)``), built as
            ``base_optimizer(param_groups, lr=lr, **kwargs)``.
        backend: 'auto' (Triton for CUDA tensors, torch ops otherwise), 'torch' or 'triton'
            (CUDA, or CPU under TRITON_INTERPRET=1 for testing).
        **kwargs: passed to the base optimizer (momentum, weight_decay, ...).

    Example::

        optimizer = FusedAMP(model.parameters(), lr=0.1, epsilon=0.5, momentum=0.9)

        def closure():
            optimizer.zero_grad()
            outputs = model(inputs)
            loss = loss_fn(outputs, targets)
            loss.backward()
            return outputs, loss

        outputs, loss = optimizer.step(closure)   # of the first evaluation, at theta
    """

    def __init__(self, params, lr, epsilon, inner_lr=1.0, inner_iter=1, base_optimizer=torch.optim.SGD,
                 *, backend: str = "auto", **kwargs):
        _check_nonnegative("learning rate", lr, allow_tensor=True)
        _check_nonnegative("epsilon", epsilon)
        _check_nonnegative("inner_lr", inner_lr)
        if isinstance(inner_iter, bool) or not isinstance(inner_iter, numbers.Integral) or inner_iter < 1:
            raise ValueError(f"Invalid inner_iter: {inner_iter!r} (expected an integer >= 1)")
        if backend not in AMP_BACKENDS:
            base = getattr(base_optimizer, "__name__", "the base optimizer")
            raise ValueError(
                f"Invalid backend: {backend!r} (FusedAMP's backend= chooses its own perturbation engine, one "
                f"of {', '.join(AMP_BACKENDS)}; to choose the backend of the base optimizer, pass it there: "
                f"base_optimizer=functools.partial({base}, backend={backend!r}))")
        if not callable(base_optimizer):
            raise TypeError(f"base_optimizer must be an optimizer class or factory, got {base_optimizer!r}")
        self.inner_iter = int(inner_iter)
        self._gradients_ready = False  # perturbed_backward() ran; step() applies its gradients
        self._backend_name = backend
        defaults = dict(lr=lr, epsilon=epsilon, inner_lr=inner_lr, **kwargs)
        super().__init__(params, defaults)
        for group in self.param_groups:
            self._check_backend(group["params"])
        self.base_optimizer = base_optimizer(self.param_groups, lr=lr, **kwargs)
        if not isinstance(self.base_optimizer, Optimizer):
            raise TypeError(f"base_optimizer built a {type(self.base_optimizer).__name__}, "
                            "not a torch.optim.Optimizer")
        self.param_groups = self.base_optimizer.param_groups  # one set of groups: schedulers see both

    # ------------------------------------------------------------------ groups and state
    def add_param_group(self, param_group: dict) -> None:
        """Validate AMP's hyperparameters of the group, then add it to the shared groups."""
        for name in ("epsilon", "inner_lr"):
            if name in param_group:
                _check_nonnegative(name, param_group[name])
        if "lr" in param_group:
            _check_nonnegative("learning rate", param_group["lr"], allow_tensor=True)
        base = self.__dict__.get("base_optimizer")
        if base is None:  # during __init__, before the base optimizer exists
            super().add_param_group(param_group)
            return
        params = param_group["params"]
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        self._check_backend(params)
        group = {**param_group, "params": params}
        for name in ("epsilon", "inner_lr"):
            group.setdefault(name, self.defaults[name])
        base.add_param_group(group)
        self.param_groups = base.param_groups

    def state_dict(self) -> dict:
        """The base optimizer's state_dict (its groups carry epsilon and inner_lr); AMP's
        unperturbed copies are scratch between steps and are not saved."""
        return self.base_optimizer.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self.base_optimizer.load_state_dict(state_dict)
        self.param_groups = self.base_optimizer.param_groups  # load_state_dict replaced the list

    def __getstate__(self):
        state = super().__getstate__()
        state.update(base_optimizer=self.base_optimizer, inner_iter=self.inner_iter,
                     _backend_name=self._backend_name)
        return state

    def __setstate__(self, state):
        state.setdefault("_gradients_ready", False)
        super().__setstate__(state)
        self.param_groups = self.base_optimizer.param_groups

    # ------------------------------------------------------------------ backends
    def _engine(self, device: torch.device, dtype: torch.dtype, params):
        """TORCH_AMP or the Triton engine for one (device, dtype) bucket (backends.select):
        the Triton kernels need contiguous parameters on a GPU; 'auto' takes them where they run."""
        contiguous = all(p.is_contiguous() for p in params)

        def unavailable(engine) -> str | None:
            reason = engine.unavailable_reason(device, dtype)
            if reason is None and not contiguous:
                reason = "the Triton kernels need contiguous parameters"
            return reason

        auto = ("triton",) if device.type == "cuda" and contiguous else ()
        return select.resolve(self._backend_name, device, dtype, reference=TORCH_AMP, load=_load_engine,
                              auto=auto, unavailable=unavailable)

    def _check_backend(self, params) -> None:
        for (device, dtype), bucket in by_bucket(p for p in params if isinstance(p, torch.Tensor)).items():
            self._engine(device, dtype, bucket)

    # ------------------------------------------------------------------ the step
    def _evaluate(self, closure):
        """Clear the gradients (so a closure without zero_grad() is right too) and evaluate."""
        for group in self.param_groups:
            for p in group["params"]:
                p.grad = None
        with torch.enable_grad():
            return closure()

    @staticmethod
    def _split_result(result):
        """(outputs, loss) from the closure's result, detached, plus whether it was a pair.

        Two forms are accepted: the published ``(outputs, loss)`` pair, and a bare loss (a
        tensor, or None), which is what torch.optim closures and Lightning's automatic
        optimization return -- then there are no outputs to hand back."""
        detach = lambda x: x.detach() if isinstance(x, torch.Tensor) else x  # noqa: E731
        if isinstance(result, (tuple, list)) and len(result) == 2:
            return tree_map(detach, tuple(result)), True
        if result is None or isinstance(result, torch.Tensor):
            return (None, detach(result)), False
        raise TypeError(
            f"FusedAMP.step(closure): the closure must return (outputs, loss), as in the published "
            f"AMP interface, or a bare loss tensor, but it returned a {type(result).__name__}"
            + (f" of length {len(result)}" if isinstance(result, (tuple, list)) else ""))

    def _participants(self):
        """(group, param, grad) of every parameter with a dense gradient of its own shape."""
        out = []
        for group in self.param_groups:
            for p in group["params"]:
                g = p.grad
                if g is None:
                    continue
                if g.is_sparse:
                    raise RuntimeError(f"FusedAMP does not support sparse gradients (parameter of shape "
                                       f"{tuple(p.shape)})")
                out.append((group, p, g))
        return out

    def _unperturbed(self, p: torch.Tensor) -> torch.Tensor:
        buffer = self.state[p].get(_UNPERTURBED)
        if buffer is None or buffer.shape != p.shape or buffer.dtype != p.dtype or buffer.device != p.device:
            buffer = self.state[p][_UNPERTURBED] = torch.empty_like(p, memory_format=torch.preserve_format)
        return buffer

    @torch.no_grad()
    def step(self, closure=None):
        """One AMP step (see the class docstring). Returns what the closure returned at theta,
        detached: (outputs, loss), or the bare loss for a closure that returns only the loss
        (torch.optim's convention, Lightning's automatic optimization).

        Without a closure, only after `perturbed_backward`: the base optimizer's step with the
        gradients it left (frameworks that step the optimizer themselves, transformers' Trainer)."""
        if closure is None:
            if not self._gradients_ready:
                raise ValueError("FusedAMP.step() requires a closure that runs the forward and backward "
                                 "pass and returns (outputs, loss) -- the gradient must be re-evaluated at "
                                 "the perturbed weights -- or a preceding perturbed_backward(closure)")
            self._gradients_ready = False
            return self.base_optimizer.step()
        result = self.perturbed_backward(closure)
        self._gradients_ready = False
        self.base_optimizer.step()
        return result

    @torch.no_grad()
    def perturbed_backward(self, closure):
        """Steps 1 and 2 of a step without the base optimizer's update: evaluate the closure at
        theta and at theta + delta, put theta back, and leave the gradient taken at theta + delta
        in ``.grad``; the next ``step()`` (no closure needed) applies it. Returns what the closure
        returned at theta, detached."""
        if not callable(closure):
            raise TypeError(f"FusedAMP: the closure must be callable, got {type(closure).__name__}")
        self._gradients_ready = False
        (outputs, loss), pair = self._split_result(self._evaluate(closure))

        participants = self._participants()
        buckets = {key: (self._engine(*key, [p for _, p, _ in rows]), rows)
                   for key, rows in by_bucket(participants, _ROW_PARAM).items()}
        unperturbed = {p: self._unperturbed(p) for _, p, _ in participants}
        perturbed = []  # buckets whose theta has been saved, hence must be restored
        try:
            for iteration in range(self.inner_iter):
                first = iteration == 0
                for (device, dtype), (engine, rows) in buckets.items():
                    # Parameters whose gradient vanished in a later evaluation keep their delta.
                    rows = [(group, p, p.grad) for group, p, _ in rows] if not first else rows
                    rows = [row for row in rows if row[2] is not None]
                    if not rows:
                        continue
                    params = [p for _, p, _ in rows]
                    grads = [g for _, _, g in rows]
                    saved = [unperturbed[p] for p in params]
                    inner_lrs = [float(group["inner_lr"]) for group, _, _ in rows]
                    if first:  # delta = inner_lr * grad, clipped
                        sources, scales = grads, inner_lrs
                    else:  # delta = (previous delta) + inner_lr * grad, clipped
                        sources = torch._foreach_sub(params, saved)
                        torch._foreach_add_(sources, torch._foreach_mul(grads, inner_lrs))
                        scales = [1.0] * len(rows)
                    norms = torch._foreach_norm(sources, 2, dtype=torch.float32)
                    engine.clip_and_perturb(params, saved, sources, norms,
                                            [float(group["epsilon"]) for group, _, _ in rows], scales,
                                            first=first, tiny=NORM_TINY)
                    if first:
                        perturbed.append((device, dtype))
                self._evaluate(closure)
        finally:  # theta comes back even if a closure raised
            for key in perturbed:
                engine, rows = buckets[key]
                params = [p for _, p, _ in rows]
                engine.restore(params, [unperturbed[p] for p in params])
        self._gradients_ready = True
        return (outputs, loss) if pair else loss
