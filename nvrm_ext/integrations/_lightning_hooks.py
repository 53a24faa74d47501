"""The Lightning callback's hooks, written once for both package names (``lightning.pytorch``
and the older ``pytorch_lightning``); lightning.py and pytorch_lightning.py add the base class.

What a checkpoint holds: Lightning runs ModelCheckpoint after every other callback, so by the
time it saves (on_validation_end, on_train_epoch_end) this callback has put the noise back: a full
checkpoint holds the noisy training weights and the optimizer state that knows that noise, and
``trainer.fit(ckpt_path=...)`` continues the uninterrupted run bit for bit. A weights-only
checkpoint (``save_weights_only=True``) has no optimizer state to tell the noise, so it gets the
clean weights instead (the ones its monitored metric was computed on), marked so by
CLEAN_WEIGHTS_KEY. Clean weights for deployment: after ``trainer.fit`` the model is left clean
(on_fit_end), or take them from either kind of checkpoint with `load_clean_weights`.
"""
from __future__ import annotations

import math
import os
import warnings

import torch

from ._common import NoiseRemoval, nvrm_optimizers

# Top-level entry of a weights-only checkpoint whose "state_dict" holds the clean weights.
CLEAN_WEIGHTS_KEY = "nvrm_ext_clean_weights"


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

    def setup(self, trainer, pl_module=None, stage=None) -> None:
        # pl_module and stage default to None only so that this check, not a missing-argument
        # TypeError, is what a class passed in place of an instance gets
        _refuse_class(self, "setup")
        _save_weights_only_checkpoints_clean(trainer.strategy)

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

    def on_exception(self, trainer, pl_module, exception=None) -> None:
        if not isinstance(self, DenoisedEvaluationHooks):
            return  # the class itself in callbacks=[...]: let setup's error surface
        self._removal.restore()  # an interrupted evaluation must not leave training on clean weights

    def on_train_start(self, trainer, pl_module) -> None:
        # Noise left removed (by a previous fit's on_fit_end) goes back before the first step,
        # unless weights were loaded into the model since: those are kept, as clean weights.
        self._removal.resume_training(nvrm_optimizers(trainer.optimizers))

    def on_fit_end(self, trainer, pl_module) -> None:
        if self.clean_after_fit:
            self._remove(trainer)
            self._removal.forget()  # stays clean


def optimizer_steps_per_epoch(trainer) -> int:
    """The optimizer steps a Trainer runs per epoch in automatic optimization, for num_iters:
    ceil(training batches / accumulate_grad_batches), as Lightning steps on an epoch's last
    batch whatever the accumulation (trainer.estimated_stepping_batches // max_epochs is this
    only when max_steps does not cut the run short). Call it in configure_optimizers; it loads
    the train dataloader there as estimated_stepping_batches does."""
    if trainer.train_dataloader is None:
        trainer.fit_loop.setup_data()
    batches = trainer.num_training_batches
    if batches == float("inf"):
        raise ValueError("optimizer_steps_per_epoch: the train dataloader has no length (an IterableDataset), "
                         "so an epoch has no known number of steps; set num_iters yourself")
    return max(math.ceil(batches / trainer.accumulate_grad_batches), 1)


def _refuse_class(callback, hook: str) -> None:
    """Lightning calls the hooks of whatever is in callbacks=[...]; on the class itself the
    first argument lands in `self` and the message would be about a missing argument."""
    if not isinstance(callback, DenoisedEvaluationHooks):
        raise TypeError(f"DenoisedEvaluation.{hook}() was called on the class, not on an instance: pass "
                        "callbacks=[DenoisedEvaluation()] (with parentheses) to the Trainer")


def _save_weights_only_checkpoints_clean(strategy) -> None:
    """Make `strategy.save_checkpoint` (through which every Trainer.save_checkpoint, ModelCheckpoint
    included, writes) put the clean weights into weights-only checkpoints. Lightning calls no
    callback hook for those, so the strategy's method is wrapped, once per strategy object."""
    if not isinstance(strategy.save_checkpoint, _CleanWeightsOnlySave):
        strategy.save_checkpoint = _CleanWeightsOnlySave(strategy, strategy.save_checkpoint)


class _CleanWeightsOnlySave:
    """The wrapped Strategy.save_checkpoint (a class, not a closure: a strategy stays picklable)."""

    def __init__(self, strategy, save):
        self.strategy, self.save = strategy, save

    def __call__(self, checkpoint, filepath, storage_options=None):
        if "optimizer_states" not in checkpoint:  # weights-only: no state here knows the noise
            trainer = self.strategy.lightning_module.trainer
            checkpoint = _with_clean_weights(checkpoint, trainer.lightning_module, nvrm_optimizers(trainer.optimizers))
        return self.save(checkpoint, filepath, storage_options=storage_options)


def _with_clean_weights(checkpoint: dict, module, optimizers) -> dict:
    """`checkpoint` with each nvrm_ext optimizer's parameters replaced by their clean copies
    (clean_state_dict: the live weights are not touched) and CLEAN_WEIGHTS_KEY set. Unchanged,
    with a warning, when its state_dict does not name the module's parameters as the module does
    (a strategy that renames them): load_clean_weights then refuses the file."""
    if not optimizers:
        return checkpoint
    weights = dict(checkpoint["state_dict"])
    live = module.state_dict(keep_vars=True)
    for optimizer in optimizers:
        owned = {id(p) for group in optimizer.param_groups for p in group["params"]}
        names = [name for name, t in live.items() if id(t) in owned]
        if any(name not in weights for name in names):
            warnings.warn("nvrm_ext DenoisedEvaluation: this weights-only checkpoint names the parameters "
                          "differently from the LightningModule; it is saved with the noisy weights and "
                          "load_clean_weights will refuse it", stacklevel=3)
            return checkpoint
        clean = optimizer.clean_state_dict(module)
        weights.update((name, clean[name]) for name in names)
    return {**checkpoint, "state_dict": weights, CLEAN_WEIGHTS_KEY: True}


def load_clean_weights(module: torch.nn.Module, checkpoint, optimizers=None) -> torch.nn.Module:
    """Load a Lightning checkpoint (a path or the loaded dict) into `module` with the clean
    weights. A full checkpoint holds the noisy weights and the optimizer states: both are loaded,
    then the optimizers remove their noise. A weights-only checkpoint saved with DenoisedEvaluation
    holds the clean weights already (CLEAN_WEIGHTS_KEY): they are loaded as they are, and
    `optimizers` are not used. `optimizers`: the optimizers ``module.configure_optimizers()``
    builds, in the same order (built here when None). Returns `module`, ready to evaluate or export.

    Everything that can be checked is checked before anything is loaded; should a load still
    fail, the module's weights and the given optimizers' states are put back before the error is
    raised (a copy of the module's weights is held meanwhile)."""
    if isinstance(checkpoint, (str, os.PathLike)):
        checkpoint = torch.load(checkpoint, map_location="cpu", weights_only=False)
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise ValueError("load_clean_weights: this is not a Lightning checkpoint (no 'state_dict' entry)")
    weights = checkpoint["state_dict"]
    _check_weights_fit(module, weights)
    if checkpoint.get(CLEAN_WEIGHTS_KEY) is True:
        with _undone_on_error(module, []):
            module.load_state_dict(weights)
        return module
    if optimizers is None:
        optimizers = _configured_optimizers(module)
    elif isinstance(optimizers, torch.optim.Optimizer):
        optimizers = [optimizers]
    optimizers = list(optimizers)
    states = checkpoint.get("optimizer_states")
    if states is None or len(states) != len(optimizers):
        raise ValueError(f"load_clean_weights: the checkpoint holds "
                         f"{'no' if states is None else len(states)} optimizer states for "
                         f"{len(optimizers)} optimizers; the noise on its weights cannot be removed"
                         + (" (a weights-only checkpoint saved without DenoisedEvaluation holds the noisy "
                            "weights and nothing that knows their noise)" if states is None else ""))
    for index, (optimizer, state) in enumerate(zip(optimizers, states)):
        _check_state_fits(index, optimizer, state)
    with _undone_on_error(module, optimizers):
        for optimizer, state in zip(optimizers, states):
            optimizer.load_state_dict(state)
        module.load_state_dict(weights)
        removal = NoiseRemoval()
        try:
            removal.remove(nvrm_optimizers(optimizers))
        except BaseException:
            removal.restore()
            raise
        removal.forget()  # the module stays clean
    return module


def _check_weights_fit(module, weights: dict) -> None:
    """What module.load_state_dict (strict) would refuse, refused before it copies anything
    (it copies what fits before raising); torch's wording."""
    expected = module.state_dict()
    errors = []
    missing = [name for name in expected if name not in weights]
    unexpected = [name for name in weights if name not in expected]
    if missing:
        errors.append("Missing key(s) in state_dict: " + ", ".join(f'"{name}"' for name in missing) + ". ")
    if unexpected:
        errors.append("Unexpected key(s) in state_dict: " + ", ".join(f'"{name}"' for name in unexpected) + ". ")
    for name, t in expected.items():
        value = weights.get(name)
        if name in weights and not isinstance(value, torch.Tensor):
            errors.append(f"While copying the parameter named \"{name}\", expected torch.Tensor, got "
                          f"{type(value).__name__}.")
        elif name in weights and value.shape != t.shape:
            errors.append(f"size mismatch for {name}: copying a param with shape {value.shape} from checkpoint, "
                          f"the shape in current model is {t.shape}.")
    if errors:
        raise RuntimeError(f"load_clean_weights: Error(s) in loading state_dict for {type(module).__name__}:\n\t"
                           + "\n\t".join(errors) + "\nNothing was loaded.")


def _check_state_fits(index: int, optimizer, state) -> None:
    """What torch.optim.Optimizer.load_state_dict checks, for every optimizer before any loads."""
    where = f"load_clean_weights: optimizer state {index} ({type(optimizer).__name__})"
    if not isinstance(state, dict) or not isinstance(state.get("param_groups"), list) or "state" not in state:
        raise ValueError(f"{where}: not an optimizer state_dict (it needs 'state' and 'param_groups'); "
                         "nothing was loaded")
    groups, saved = optimizer.param_groups, state["param_groups"]
    if len(groups) != len(saved):
        raise ValueError(f"{where}: loaded state dict has a different number of parameter groups "
                         f"({len(saved)} for {len(groups)}); nothing was loaded")
    if any(not isinstance(s, dict) or len(g["params"]) != len(s.get("params", ())) for g, s in zip(groups, saved)):
        raise ValueError(f"{where}: loaded state dict contains a parameter group that doesn't match the size "
                         "of optimizer's group; nothing was loaded")


class _undone_on_error:
    """Within the block, an exception puts back the module's weights (from a copy taken on
    entry) and the optimizers' states (their state_dicts: loading replaces the state tensors, it
    does not write into them), then propagates."""

    def __init__(self, module, optimizers):
        self.module, self.optimizers = module, optimizers

    def __enter__(self):
        self.weights = {name: t.detach().clone() for name, t in self.module.state_dict().items()}
        self.states = [optimizer.state_dict() for optimizer in self.optimizers]

    def __exit__(self, kind, error, traceback):
        if kind is not None:
            with torch.no_grad():
                for name, t in self.module.state_dict().items():
                    t.copy_(self.weights[name])
            for optimizer, state in zip(self.optimizers, self.states):
                optimizer.load_state_dict(state)
        return False


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
