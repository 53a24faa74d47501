"""transformers' Trainer: clean weights for evaluation, predictions and saved models; FusedAMP.

    trainer = Trainer(model, args, optimizers=(FusedVSGD(model.parameters(), ...), None),
                      callbacks=[DenoisedEvaluation()], ...)

How: DefaultFlowCallback (first in the list) decides at on_step_end / on_epoch_end whether this
step evaluates or saves; when it does, this callback removes the noise right after it, so
evaluation, the checkpoint's model file (clean) and the checkpoint's optimizer state (which then
carries exact copies of the noisy weights: resume_from_checkpoint is bit-exact) all see the
removed state. The noise goes back at the next on_step_begin, before the next forward pass.
When training ends the model is left clean, so trainer.save_model() / evaluate() / predict()
afterwards see clean weights. If load_best_model_at_end loaded the best checkpoint's (clean)
weights meanwhile, they are kept: the optimizer is told they are clean (reset_noise()).
"""
from __future__ import annotations

from transformers import Trainer, TrainerCallback

from ..optim.amp import FusedAMP
from ..optim.base import WeightsChangedError
from ._common import NoiseRemoval, nvrm_optimizers, unwrap_to

__all__ = ["DenoisedEvaluation", "AMPTrainer"]


class DenoisedEvaluation(TrainerCallback):
    """Evaluation, predictions and saved models see the clean weights; training the noisy ones
    (see the module docstring). Works through accelerate's AcceleratedOptimizer and FusedAMP."""

    def __init__(self):
        self._removal = NoiseRemoval()

    def _before_evaluate_or_save(self, control, optimizer) -> None:
        if control.should_evaluate or control.should_save:
            self._removal.remove(nvrm_optimizers([optimizer]))

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        self._before_evaluate_or_save(control, optimizer)

    def on_epoch_end(self, args, state, control, optimizer=None, **kwargs):
        self._before_evaluate_or_save(control, optimizer)

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
        # Also after resume_from_checkpoint: a checkpoint saved while the noise was removed
        # loads into the removed state, and its held noisy weights go back here.
        self._removal.resume_training(nvrm_optimizers([optimizer]))

    def on_train_end(self, args, state, control, optimizer=None, **kwargs):
        for nvrm in nvrm_optimizers([optimizer]):
            if nvrm.noise_removed and self._removal.rewritten(nvrm):
                nvrm.reset_noise()  # load_best_model_at_end loaded clean weights: they stay
            elif not nvrm.noise_removed:
                try:
                    self._removal.remove([nvrm])
                except WeightsChangedError:
                    nvrm.reset_noise()  # the weights were loaded (clean) while the noise was on
        self._removal.forget()  # the model stays clean; the next train() puts the noise back


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
