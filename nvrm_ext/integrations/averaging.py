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
"""
from __future__ import annotations

from ._common import NoiseRemoval, nvrm_optimizers

__all__ = ["update_averaged"]


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
    optimizers = optimizers if isinstance(optimizers, (list, tuple)) else [optimizers]
    removal = NoiseRemoval()
    try:  # a second optimizer refusing to remove its noise must not leave the first one clean
        removal.remove(nvrm_optimizers(optimizers))
        update(model, **kwargs)
    finally:
        removal.restore()
