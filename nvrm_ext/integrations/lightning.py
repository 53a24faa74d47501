"""Lightning (``import lightning.pytorch``): clean weights for validation, test and predict.

    trainer = lightning.pytorch.Trainer(callbacks=[DenoisedEvaluation()], ...)

See _lightning_hooks for what checkpoints hold and how to get clean weights for deployment.
"""
from lightning.pytorch import Callback

from ._lightning_hooks import DenoisedEvaluationHooks, load_clean_weights, optimizer_steps_per_epoch

__all__ = ["DenoisedEvaluation", "load_clean_weights", "optimizer_steps_per_epoch"]


class DenoisedEvaluation(DenoisedEvaluationHooks, Callback):
    __doc__ = DenoisedEvaluationHooks.__doc__
