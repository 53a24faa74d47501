"""transformers' Trainer: clean weights for evaluation, predictions and saved models; FusedAMP.

    trainer = Trainer(model, args, optimizers=(FusedVSGD(model.parameters(), ...), None),
                      callbacks=[DenoisedEvaluation()], ...)

num_iters: at on_train_begin the callback sets every param group's num_iters to the optimizer
steps Trainer runs per epoch, ceil(batches / gradient_accumulation_steps) (the last accumulation
of an epoch may be short and still steps), so the weights are clean at every epoch end as in the
original. A group whose num_iters the user set to another value is an error, not overridden.

When the noise is removed: DefaultFlowCallback (first in the list) decides at on_step_end /
on_epoch_end whether this step evaluates or saves; when it does, this callback removes the noise
right after it, so evaluation, the checkpoint's model file (clean) and the checkpoint's optimizer
state (which then carries exact copies of the noisy weights: resume_from_checkpoint is bit-exact)
all see the removed state. A callback listed after this one may still ask for an evaluation or a
save, and Trainer has no hook between the callbacks and the evaluation; so during train() two
hooks on the model cover any order: a forward that computes no gradient (evaluation, prediction)
and model.state_dict() (a save) remove the noise first, and a forward that computes gradients
(training) puts it back. The noise also goes back at the next on_step_begin. When training ends
the model is left clean, so trainer.save_model() / evaluate() / predict() afterwards see clean
weights. If load_best_model_at_end loaded the best checkpoint's (clean) weights meanwhile, they
are kept: the optimizer is told they are clean (reset_noise()).
"""
from __future__ import annotations

import inspect
import math
import weakref

import torch
from transformers import Trainer, TrainerCallback

from ..optim.amp import FusedAMP
from ..optim.records import WeightsChangedError
from ._common import NoiseRemoval, nvrm_optimizers, unwrap_to

__all__ = ["DenoisedEvaluation", "AMPTrainer", "optimizer_steps_per_epoch"]

# optimizer -> the num_iters this module set in its groups (a later train() may set it anew)
_NUM_ITERS_SET = weakref.WeakKeyDictionary()


def optimizer_steps_per_epoch(args, train_dataloader) -> int:
    """The optimizer steps Trainer runs per epoch (Trainer.set_initial_training_values):
    ceil(batches / gradient_accumulation_steps), at least 1; batches per process, times the
    sequence-parallel size where one is configured. Set num_iters to this."""
    if train_dataloader is None or not hasattr(train_dataloader, "__len__"):
        raise ValueError("optimizer_steps_per_epoch: the train dataloader has no length (an IterableDataset), "
                         "so an epoch has no known number of steps; set num_iters yourself")
    batches = len(train_dataloader) * getattr(getattr(args, "parallelism_config", None), "sp_size", 1)
    return max(math.ceil(batches / args.gradient_accumulation_steps), 1)


class DenoisedEvaluation(TrainerCallback):
    """Evaluation, predictions and saved models see the clean weights; training the noisy ones
    (see the module docstring), whatever the order of the callbacks. Works through accelerate's
    AcceleratedOptimizer and FusedAMP.

    set_num_iters (default True): every param group's num_iters becomes the optimizer steps per
    epoch (optimizer_steps_per_epoch) when training begins. A group already holding another value
    than the optimizer's default (or than what this callback set earlier) raises ValueError:
    pass set_num_iters=False to keep your own schedule."""

    def __init__(self, set_num_iters: bool = True):
        self.set_num_iters = bool(set_num_iters)
        self._removal = NoiseRemoval()
        self._optimizers = []
        self._model_hooks = []

    def _before_evaluate_or_save(self, control, optimizer) -> None:
        if control.should_evaluate or control.should_save:
            self._removal.remove(nvrm_optimizers([optimizer]))

    def on_train_begin(self, args, state, control, model=None, optimizer=None, train_dataloader=None, **kwargs):
        self._optimizers = nvrm_optimizers([optimizer])
        if self.set_num_iters and self._optimizers:
            _set_num_iters(self._optimizers, optimizer_steps_per_epoch(args, train_dataloader))
        self._remove_model_hooks()
        if model is not None:
            self._model_hooks = [model.register_forward_pre_hook(self._before_forward),
                                 model.register_state_dict_pre_hook(self._before_state_dict)]

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        self._before_evaluate_or_save(control, optimizer)

    def on_epoch_end(self, args, state, control, optimizer=None, **kwargs):
        self._before_evaluate_or_save(control, optimizer)

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
        # Also after resume_from_checkpoint: a checkpoint saved while the noise was removed
        # loads into the removed state, and its held noisy weights go back here.
        self._removal.resume_training(nvrm_optimizers([optimizer]))

    def on_train_end(self, args, state, control, optimizer=None, **kwargs):
        self._remove_model_hooks()
        for nvrm in nvrm_optimizers([optimizer]):
            if nvrm.noise_removed and self._removal.rewritten(nvrm):
                nvrm.reset_noise()  # load_best_model_at_end loaded clean weights: they stay
            elif not nvrm.noise_removed:
                try:
                    self._removal.remove([nvrm])
                except WeightsChangedError:
                    nvrm.reset_noise()  # the weights were loaded (clean) while the noise was on
        self._removal.forget()  # the model stays clean; the next train() puts the noise back

    # ---- the model's hooks during train(): any read of the weights sees the clean ones
    def _before_forward(self, module, inputs) -> None:
        if torch.is_grad_enabled():  # a training forward: the noise must be on
            if any(optimizer.noise_removed for optimizer in self._optimizers):
                self._removal.resume_training(self._optimizers)
            return
        if getattr(module, "_is_replica", False):  # nn.DataParallel copied the weights already
            if any(optimizer.carries_noise for optimizer in self._optimizers):
                raise RuntimeError(
                    "DenoisedEvaluation: an evaluation under nn.DataParallel started on the noisy weights (its "
                    "replicas copy the weights before any hook can clean them); a callback listed after "
                    "DenoisedEvaluation asked for it. List DenoisedEvaluation after that callback, or train "
                    "with DistributedDataParallel")
            return
        self._removal.remove(self._optimizers)

    def _before_state_dict(self, module, prefix, keep_vars) -> None:
        self._removal.remove(self._optimizers)

    def _remove_model_hooks(self) -> None:
        for handle in self._model_hooks:
            handle.remove()
        self._model_hooks = []


def _set_num_iters(optimizers, steps: int) -> None:
    """Every group's num_iters = `steps`, after checking every group (nothing is set on an error)."""
    for optimizer in optimizers:
        declared = inspect.signature(type(optimizer)).parameters.get("num_iters")
        default = declared.default if declared is not None else None  # a subclass may not declare it
        ours = _NUM_ITERS_SET.get(optimizer)
        for index, group in enumerate(optimizer.param_groups):
            if group["num_iters"] not in (steps, default, ours):
                raise ValueError(
                    f"DenoisedEvaluation: param group {index} of {type(optimizer).__name__} has num_iters="
                    f"{group['num_iters']}, but Trainer runs {steps} optimizer steps per epoch "
                    "(ceil(batches / gradient_accumulation_steps)), so the weights would not be clean at the "
                    f"epoch ends. Leave num_iters at its default (the callback sets {steps}), or pass "
                    "DenoisedEvaluation(set_num_iters=False) to keep your own")
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            group["num_iters"] = steps
        _NUM_ITERS_SET[optimizer] = steps


class AMPTrainer(Trainer):
    """Trainer for FusedAMP, which needs two forward/backward passes per optimizer step.

    Trainer has no closure: it calls training_step (forward + backward) and then
    optimizer.step(). Here training_step runs FusedAMP.perturbed_backward with the ordinary
    training step as its closure (at theta, then at theta + delta; theta is put back), and
    Trainer's own optimizer.step() applies the base optimizer's update once, with the gradient
    taken at theta + delta. Gradient clipping (max_grad_norm) acts on that gradient. Pass the
    FusedAMP as ``optimizers=(FusedAMP(...), scheduler)``; gradient accumulation is not
    supported (each AMP step evaluates its own batch).
    """

    def training_step(self, model, inputs, num_items_in_batch=None):
        amp = unwrap_to(self.optimizer, FusedAMP)
        if amp is None:
            raise TypeError(f"AMPTrainer needs a FusedAMP optimizer (optimizers=(FusedAMP(...), None)), "
                            f"got {type(self.optimizer).__name__}")
        if self.args.gradient_accumulation_steps != 1:
            raise ValueError("AMPTrainer: gradient_accumulation_steps must be 1 (FusedAMP clears the "
                             "gradients before each of its evaluations)")
        parent = super().training_step
        return amp.perturbed_backward(lambda: parent(model, inputs, num_items_in_batch))
