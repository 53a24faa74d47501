from .amp import FusedAMP
from .base import NeuralVariableOptimizer, WeightsChangedError
from .protocol import NoisyOptimizer
from .vadam import FusedVAdam
from .vsgd import FusedVSGD
from .wrapper import NVRM

__all__ = ["FusedVSGD", "FusedVAdam", "FusedAMP", "NVRM", "NeuralVariableOptimizer", "NoisyOptimizer",
           "WeightsChangedError"]
