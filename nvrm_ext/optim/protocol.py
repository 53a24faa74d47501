"""NoisyOptimizer: what an optimizer that keeps noise on the weights offers to the code around it.

FusedVSGD, FusedVAdam (NeuralVariableOptimizer) and NVRM(optimizer) all satisfy it, and the
integrations (Lightning's and transformers' DenoisedEvaluation, update_averaged, zero.denoised)
use nothing else: no private attribute, no knowledge of which of them they hold. An optimizer of
another package takes part by offering the same members with the same meaning; it need not
inherit from this class (isinstance looks the members up on its class).
"""
from __future__ import annotations

import abc
import contextlib

import torch

# The members that make a class a NoisyOptimizer (param_groups, as on any torch optimizer, is an
# instance attribute and is not looked up on the class).
NOISE_MEMBERS = ("noise_removed", "removal_token", "carries_noise", "seed", "remove_noise", "restore_noise",
                 "reset_noise", "denoised", "clean_state_dict")


class NoisyOptimizer(abc.ABC):
    """An optimizer whose parameters hold noisy weights between steps, and that can give the
    clean ones back exactly (the noise is regenerated from the seed, never stored).

    ``isinstance(x, NoisyOptimizer)`` is True when x's class has every member below. It looks at
    the class only, never evaluating a property (some read device counters) and never asking the
    instance: a wrapper that forwards unknown attributes to the optimizer it wraps
    (``__getattr__``) is a wrapper, to be seen through, not the optimizer.

    Contract (what callers may rely on):

    * ``param_groups``: the torch groups; their parameters are the ones that carry noise.
    * ``remove_noise()``: the parameters hold the clean weights, exact copies of the noisy ones
      are held; a no-op when already removed. It changes nothing if it raises.
    * ``restore_noise()``: the held noisy weights back, bit for bit; a no-op when not removed.
    * ``reset_noise()``: declare the weights as they are now clean (after loading clean weights
      into the model); held copies are dropped, the next step perturbs afresh.
    * ``denoised()``: a context manager around remove_noise() / restore_noise().
    * ``clean_state_dict(module)``: ``module.state_dict()`` with clean copies of the perturbed
      parameters; the live parameters are not touched.
    * ``noise_removed``: True between remove_noise() and restore_noise().
    * ``removal_token``: an integer naming the entry into the removed state that the held noisy
      copies come from (0 before any); it changes at every remove_noise() and at every load of a
      state saved while removed. A caller that removed the noise compares it later to tell
      whether the held copies are still the ones it made.
    * ``carries_noise``: True when some parameter holds noise now (stepped since it was last
      clean, and the noise not removed).
    * ``seed``: the 64-bit seed the noise is drawn from; the same on every rank of a process
      group, so every rank regenerates the same noise without communication.
    """

    __slots__ = ()

    @classmethod
    def __subclasshook__(cls, subclass):
        if cls is NoisyOptimizer and all(any(name in vars(base) for base in subclass.__mro__)
                                         for name in NOISE_MEMBERS):
            return True
        return NotImplemented

    @property
    @abc.abstractmethod
    def noise_removed(self) -> bool: ...

    @property
    @abc.abstractmethod
    def removal_token(self) -> int: ...

    @property
    @abc.abstractmethod
    def carries_noise(self) -> bool: ...

    @property
    @abc.abstractmethod
    def seed(self) -> int: ...

    @abc.abstractmethod
    def remove_noise(self) -> None: ...

    @abc.abstractmethod
    def restore_noise(self) -> None: ...

    @abc.abstractmethod
    def reset_noise(self) -> None: ...

    @abc.abstractmethod
    def denoised(self) -> contextlib.AbstractContextManager: ...

    @abc.abstractmethod
    def clean_state_dict(self, module: torch.nn.Module) -> dict: ...
