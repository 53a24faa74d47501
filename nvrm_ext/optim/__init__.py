from .amp import FusedAMP
from .engine import NeuralVariableOptimizer, NoiseEngine
from .records import WeightsChangedError
from .protocol import NoisyOptimizer
from .vadam import FusedVAdam
from .vsgd import FusedVSGD
from .wrapper import NVRM

__all__ = ["FusedVSGD", "FusedVAdam", "FusedAMP", "NVRM", "NeuralVariableOptimizer", "NoiseEngine", "NoisyOptimizer",
           "WeightsChangedError"]
