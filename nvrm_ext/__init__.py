"""nvrm_ext: artificial neural variability (NVRM) optimizers at the cost of plain ones.

Public names: FusedVSGD, FusedVAdam (drop-in for the original VSGD / VAdam), NVRM (neural
variability around any torch optimizer), FusedAMP
(adversarial model perturbation), WeightsChangedError and the nn modules Disout and NeuronSteadiness.
"""
from . import nn
from .optim import NVRM, FusedAMP, FusedVAdam, FusedVSGD, WeightsChangedError

__version__ = "0.1.0"
__all__ = ["FusedVSGD", "FusedVAdam", "NVRM", "FusedAMP", "WeightsChangedError", "nn", "__version__"]
