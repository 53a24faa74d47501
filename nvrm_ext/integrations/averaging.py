"""EMA / SWA of the clean weights.

Between steps an NVRM model holds perturbed weights, so ``AveragedModel.update_parameters(model)``
(torch.optim.swa_utils: SWA, or EMA with get_ema_multi_avg_fn) and timm's ModelEmaV2/V3
``.update(model)`` average noise into the copy. `update_averaged` runs the same update with the
noise removed and puts the noisy weights back bit for bit, so training continues exactly as
without averaging. Cost: one noise-removal launch, one copy of the weights held, one copy back.

    swa = torch.optim.swa_utils.AveragedModel(model)
    ...
    optimizer.step()
    update_averaged(swa, model, optimizer)      # instead of swa.update_parameters(model)
    # timm: update_averaged(ema, model, optimizer) instead of ema.update(model) (step=... passed on)

The optimizers argument is checked before anything runs: None, a scheduler or any other object
is refused, and so is a list with no nvrm_ext optimizer in it (a plain torch optimizer carries no
noise, so averager.update_parameters(model) is right there; a wrapper this module cannot see
through, such as ZeroRedundancyOptimizer, would otherwise average its noise in silently).
"""
from __future__ import annotations

import torch

from ._common import NoiseRemoval, nvrm_optimizers, unwrap, unwrap_to

__all__ = ["update_averaged"]

_SCHEDULERS = (torch.optim.lr_scheduler.LRScheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)


def update_averaged(averager, model, optimizers, **kwargs) -> None:
    """``averager.update_parameters(model)`` (AveragedModel) or ``averager.update(model, **kwargs)``
    (timm's ModelEmaV2 / V3, any object with that method), taken at the clean weights of every
    nvrm_ext optimizer in `optimizers` (one, or a list; wrappers such as FusedAMP are seen through).
    Weights already clean (inside denoised(), or after remove_noise()) are used as they are."""
    if hasattr(averager, "update_parameters"):
        update = averager.update_parameters
        if kwargs:
            raise TypeError(f"update_averaged: {type(averager).__name__}.update_parameters takes no "
                            f"arguments besides the model, got {sorted(kwargs)}")
    elif hasattr(averager, "update"):
        update = averager.update
    else:
        raise TypeError(f"update_averaged: {type(averager).__name__} has neither update_parameters(model) "
                        "(torch.optim.swa_utils.AveragedModel) nor update(model) (timm's ModelEma*)")
    nvrm = _nvrm_optimizers_among(optimizers)
    removal = NoiseRemoval()
    try:  # a second optimizer refusing to remove its noise must not leave the first one clean
        removal.remove(nvrm)
        update(model, **kwargs)
    finally:
        removal.restore()


def _nvrm_optimizers_among(optimizers) -> list:
    """The nvrm_ext optimizers in `optimizers`, or a TypeError when the argument cannot be what
    the caller meant: every element must be an optimizer (or a wrapper of one) and at least one
    must carry NVRM noise, since averaging without removing any noise is what this function is
    there to prevent."""
    listed = list(optimizers) if isinstance(optimizers, (list, tuple)) else [optimizers]
    expected = ("update_averaged: `optimizers` must be the nvrm_ext optimizer that trains the model "
                "(FusedVSGD, FusedVAdam, NVRM(...), or a wrapper of one such as FusedAMP, Lightning's or "
                "accelerate's), "
                "or a list of optimizers with at least one of them")
    for optimizer in listed:
        if isinstance(optimizer, _SCHEDULERS):  # it has .optimizer, but it is not one
            raise TypeError(f"{expected}; got {type(optimizer).__name__}, a learning-rate scheduler: pass "
                            "its optimizer")
        if unwrap_to(optimizer, torch.optim.Optimizer) is None:
            raise TypeError(f"{expected}; got {type(optimizer).__name__}")
        sharded = _zero_around(optimizer)
        if sharded is not None and unwrap(optimizer) is None:
            raise TypeError(f"update_averaged: {type(sharded).__name__} shards the model; each rank's "
                            f"{type(sharded.optim).__name__} cleans only its own parameters. Run "
                            "averager.update_parameters(model) inside nvrm_ext.integrations.zero.denoised(zero) "
                            "instead")
    found = nvrm_optimizers(listed)
    if not found:
        names = ", ".join(type(optimizer).__name__ for optimizer in listed) or "an empty list"
        raise TypeError(f"{expected}; got {names}, which carries no NVRM noise: for a plain torch "
                        "optimizer call averager.update_parameters(model) (timm: averager.update(model)) "
                        "directly")
    return found


def _zero_around(optimizer):
    """The ZeroRedundancyOptimizer in `optimizer`'s chain of wrappers whose local optimizer is an
    nvrm_ext one, else None."""
    if not torch.distributed.is_available():
        return None
    from torch.distributed.optim import ZeroRedundancyOptimizer

    zero = unwrap_to(optimizer, ZeroRedundancyOptimizer)
    return zero if zero is not None and unwrap(zero.optim) is not None else None
