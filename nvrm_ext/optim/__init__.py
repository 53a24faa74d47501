from .amp import FusedAMP
from .base import NeuralVariableOptimizer, WeightsChangedError
from .vadam import FusedVAdam
from .vsgd import FusedVSGD

__all__ = ["FusedVSGD", "FusedVAdam", "FusedAMP", "NeuralVariableOptimizer", "WeightsChangedError"]
