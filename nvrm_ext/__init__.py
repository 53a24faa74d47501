"""nvrm_ext: artificial neural variability (NVRM) optimizers at the cost of plain ones.

Public names: FusedVSGD, FusedVAdam (drop-in for the original VSGD / VAdam).
"""
from .optim import FusedVAdam, FusedVSGD

__version__ = "0.1.0"
__all__ = ["FusedVSGD", "FusedVAdam", "__version__"]
