"""What the integrations share: finding the noisy optimizers (nvrm_ext.optim.NoisyOptimizer)
behind framework wrappers, and removing / restoring their noise as one unit. Only the protocol's
members are used, so FusedVSGD, FusedVAdam and NVRM(optimizer) are handled alike."""
from __future__ import annotations

import weakref

from ..optim.protocol import NoisyOptimizer

# Attributes under which wrappers keep the optimizer they wrap: Lightning's LightningOptimizer
# (_optimizer), accelerate's AcceleratedOptimizer and NVRM (optimizer), FusedAMP (base_optimizer).
_WRAPPED = ("_optimizer", "optimizer", "base_optimizer")


def unwrap(optimizer):
    """The optimizer that carries the noise (a NoisyOptimizer: FusedVSGD, FusedVAdam, NVRM)
    behind `optimizer`, through any chain of wrappers, else None. The innermost one: a wrapper
    that imitates the class of what it wraps (LightningOptimizer) is seen through."""
    found = None
    for link in _chain(optimizer):
        if isinstance(link, NoisyOptimizer):
            found = link
    return found


def unwrap_to(optimizer, kind):
    """The first optimizer of class `kind` in `optimizer`'s chain of wrappers, else None."""
    return next((link for link in _chain(optimizer) if isinstance(link, kind)), None)


def _chain(optimizer):
    """`optimizer`, then what it wraps, then what that wraps, ... (each once)."""
    seen = set()
    while optimizer is not None and id(optimizer) not in seen:
        yield optimizer
        seen.add(id(optimizer))
        optimizer = next((getattr(optimizer, name) for name in _WRAPPED
                          if getattr(optimizer, name, None) is not None), None)


def nvrm_optimizers(optimizers) -> list:
    """Every distinct noisy optimizer among `optimizers` (wrapped or not), in order."""
    found = []
    for optimizer in optimizers or ():
        inner = unwrap(optimizer)
        if inner is not None and all(inner is not other for other in found):
            found.append(inner)
    return found


# optimizer -> (which removal, its parameters' version counters) when an integration last removed
# its noise. Module-wide, not per callback: a new Trainer's callback must still see that weights
# were loaded into the model after an earlier one left it clean.
_REMOVED_AT = weakref.WeakKeyDictionary()


class NoiseRemoval:
    """Removes the noise of several optimizers and restores exactly what it removed.

    Only optimizers whose noise this object removed are restored, so a caller that finds the
    weights already clean (removed by someone else, or by an earlier hook) leaves them so.
    The parameters' version counters at removal are remembered, to tell whether weights were
    loaded into the model meanwhile (then the held noisy copies are stale), and which removal it
    was (the optimizer's removal_token): a load_state_dict of a state saved while the noise was
    removed brings its own noisy copies, which match the weights loaded with them.
    """

    def __init__(self):
        self._removed: list = []  # restored by restore()

    def remove(self, optimizers) -> None:
        for optimizer in optimizers:
            if not optimizer.noise_removed:
                optimizer.remove_noise()
                _REMOVED_AT[optimizer] = (optimizer.removal_token, _versions(optimizer))
                self._removed.append(optimizer)

    @staticmethod
    def rewritten(optimizer) -> bool:
        """Whether a parameter of `optimizer` was written since an integration removed its
        noise (say, a checkpoint loaded into the model) and the optimizer still holds the noisy
        copies of that removal: they are stale then. Copies loaded since (load_state_dict of a
        state saved while removed) are not: they came with the weights."""
        removed = _REMOVED_AT.get(optimizer)
        return (removed is not None and removed[0] == optimizer.removal_token
                and removed[1] != _versions(optimizer))

    def restore(self) -> None:
        removed, self._removed = self._removed, []
        for optimizer in removed:
            if optimizer.noise_removed:
                optimizer.restore_noise()
            _REMOVED_AT.pop(optimizer, None)

    def forget(self) -> None:
        """Keep the weights as they are now (clean): restore() will not put the noise back."""
        self._removed = []

    def resume_training(self, optimizers) -> None:
        """Before a training step: put back the noise of every optimizer that has it removed
        (by an integration or anyone else: say, a checkpoint saved while removed). Where weights
        were loaded into the model since an integration removed the noise, they are kept and
        declared clean (reset_noise()) instead of being overwritten with stale noisy copies."""
        for optimizer in optimizers:
            if optimizer.noise_removed:
                if self.rewritten(optimizer):
                    optimizer.reset_noise()
                else:
                    optimizer.restore_noise()
            _REMOVED_AT.pop(optimizer, None)
        self._removed = []


def _versions(optimizer) -> list:
    """The version counters of the optimizer's parameters (every in-place write advances them)."""
    return [p._version for group in optimizer.param_groups for p in group["params"]]
