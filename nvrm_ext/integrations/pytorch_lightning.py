"""The same callback for the older package name (``import pytorch_lightning``); see lightning.py."""
from pytorch_lightning import Callback

from ._lightning_hooks import DenoisedEvaluationHooks, load_clean_weights, optimizer_steps_per_epoch

__all__ = ["DenoisedEvaluation", "load_clean_weights", "optimizer_steps_per_epoch"]


class DenoisedEvaluation(DenoisedEvaluationHooks, Callback):
    __doc__ = DenoisedEvaluationHooks.__doc__
