"""What the integrations share: finding the nvrm_ext optimizers behind framework wrappers, and
removing / restoring their noise as one unit."""
from __future__ import annotations

from ..optim.base import NeuralVariableOptimizer

# Attributes under which wrappers keep the optimizer they wrap: Lightning's LightningOptimizer
# (_optimizer), accelerate's AcceleratedOptimizer (optimizer), FusedAMP (base_optimizer).
_WRAPPED = ("_optimizer", "optimizer", "base_optimizer")


def unwrap(optimizer):
    """The nvrm_ext optimizer behind `optimizer` (through any chain of wrappers), else None."""
    return unwrap_to(optimizer, NeuralVariableOptimizer)


def unwrap_to(optimizer, kind):
    """The first optimizer of class `kind` in `optimizer`'s chain of wrappers, else None."""
    seen = set()
    while optimizer is not None and id(optimizer) not in seen:
        if isinstance(optimizer, kind):
            return optimizer
        seen.add(id(optimizer))
        optimizer = next((getattr(optimizer, name) for name in _WRAPPED
                          if getattr(optimizer, name, None) is not None), None)
    return None


def nvrm_optimizers(optimizers) -> list:
    """Every distinct nvrm_ext optimizer among `optimizers` (wrapped or not), in order."""
    found = []
    for optimizer in optimizers or ():
        inner = unwrap(optimizer)
        if inner is not None and all(inner is not other for other in found):
            found.append(inner)
    return found


class NoiseRemoval:
    """Removes the noise of several optimizers and restores exactly what it removed.

    Only optimizers whose noise this object removed are restored, so a caller that finds the
    weights already clean (removed by someone else, or by an earlier hook) leaves them so.
    """

    def __init__(self):
        self._removed: list = []

    def remove(self, optimizers) -> None:
        for optimizer in optimizers:
            if not optimizer.noise_removed and all(optimizer is not o for o, _ in self._removed):
                optimizer.remove_noise()
                self._removed.append((optimizer, _versions(optimizer)))

    def rewritten(self, optimizer) -> bool:
        """Whether a parameter of `optimizer` was written since this object removed its noise
        (say, a checkpoint loaded into the model): its held noisy copies are stale then."""
        return any(o is optimizer and versions != _versions(o) for o, versions in self._removed)

    def restore(self) -> None:
        removed, self._removed = self._removed, []
        for optimizer, _ in removed:
            if optimizer.noise_removed:
                optimizer.restore_noise()

    def forget(self) -> None:
        """Keep the weights as they are now (clean): nothing is restored later."""
        self._removed = []


def _versions(optimizer) -> list:
    """The version counters of the optimizer's parameters (every in-place write advances them)."""
    return [p._version for group in optimizer.param_groups for p in group["params"]]
