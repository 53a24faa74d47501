"""The Lightning callback's hooks, written once for both package names (``lightning.pytorch``
and the older ``pytorch_lightning``); lightning.py and pytorch_lightning.py add the base class.

What a checkpoint holds: Lightning runs ModelCheckpoint after every other callback, so by the
time it saves (on_validation_end, on_train_epoch_end) this callback has put the noise back: the
checkpoint holds the noisy training weights and the optimizer state that knows that noise, and
``trainer.fit(ckpt_path=...)`` continues the uninterrupted run bit for bit. Clean weights for
deployment: after ``trainer.fit`` the model is left clean (on_fit_end), or take them from any
checkpoint with `load_clean_weights`.
"""
from __future__ import annotations

import os

import torch

from ._common import NoiseRemoval, nvrm_optimizers


class DenoisedEvaluationHooks:
    """Validation, test and predict see the clean weights; training sees the noisy ones.

    The noise of every nvrm_ext optimizer in ``trainer.optimizers`` (through LightningOptimizer
    and FusedAMP) is removed when an evaluation loop starts and put back, bit for bit, when it
    ends -- also for the sanity check before the first step and for validation inside a
    training epoch. ``clean_after_fit=True`` (default) leaves the model clean when fit ends, so
    ``trainer.test``/``predict`` or ``torch.save(model.state_dict())`` afterwards see clean
    weights; the next ``fit`` puts the noise back before its first step.
    """

    def __init__(self, clean_after_fit: bool = True):
        super().__init__()
        self.clean_after_fit = bool(clean_after_fit)
        self._removal = NoiseRemoval()

    def _remove(self, trainer) -> None:
        self._removal.remove(nvrm_optimizers(trainer.optimizers))

    def on_validation_start(self, trainer, pl_module) -> None:
        self._remove(trainer)

    def on_validation_end(self, trainer, pl_module) -> None:
        self._removal.restore()  # before ModelCheckpoint saves (it runs after every other callback)

    def on_test_start(self, trainer, pl_module) -> None:
        self._remove(trainer)

    def on_test_end(self, trainer, pl_module) -> None:
        self._removal.restore()

    def on_predict_start(self, trainer, pl_module) -> None:
        self._remove(trainer)

    def on_predict_end(self, trainer, pl_module) -> None:
        self._removal.restore()

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._removal.restore()  # an interrupted evaluation must not leave training on clean weights

    def on_train_start(self, trainer, pl_module) -> None:
        # Noise left removed (by a previous fit's on_fit_end) goes back before the first step,
        # unless weights were loaded into the model since: those are kept, as clean weights.
        self._removal.resume_training(nvrm_optimizers(trainer.optimizers))

    def on_fit_end(self, trainer, pl_module) -> None:
        if self.clean_after_fit:
            self._remove(trainer)
            self._removal.forget()  # stays clean


def load_clean_weights(module: torch.nn.Module, checkpoint, optimizers=None) -> torch.nn.Module:
    """Load a Lightning checkpoint (a path or the loaded dict) into `module` with the clean
    weights: the noisy weights and the optimizer states are loaded, then the optimizers remove
    their noise. `optimizers`: the optimizers ``module.configure_optimizers()`` builds, in the
    same order (built here when None). Returns `module`, ready to evaluate or export."""
    if isinstance(checkpoint, (str, os.PathLike)):
        checkpoint = torch.load(checkpoint, map_location="cpu", weights_only=False)
    if optimizers is None:
        optimizers = _configured_optimizers(module)
    elif isinstance(optimizers, torch.optim.Optimizer):
        optimizers = [optimizers]
    states = checkpoint.get("optimizer_states")
    if states is None or len(states) != len(optimizers):
        raise ValueError(f"load_clean_weights: the checkpoint holds "
                         f"{'no' if states is None else len(states)} optimizer states for "
                         f"{len(optimizers)} optimizers; the noise on its weights cannot be removed")
    module.load_state_dict(checkpoint["state_dict"])
    for optimizer, state in zip(optimizers, states):
        optimizer.load_state_dict(state)
    for optimizer in nvrm_optimizers(optimizers):
        optimizer.remove_noise()
    return module


def _configured_optimizers(module) -> list:
    """The optimizers of ``module.configure_optimizers()``, in any of its return formats."""
    from importlib import import_module

    package = type(module).__module__.split(".")[0]  # lightning or pytorch_lightning
    name = "lightning.pytorch" if package == "lightning" else "pytorch_lightning"
    for candidate in dict.fromkeys((name, "lightning.pytorch", "pytorch_lightning")):
        try:
            configure = import_module(candidate + ".core.optimizer")._configure_optimizers
        except ImportError:
            continue
        return list(configure(module.configure_optimizers())[0])
    raise ImportError("load_clean_weights needs lightning (or pytorch_lightning) to read configure_optimizers()")
