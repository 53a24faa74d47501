"""Regularizer modules: Disout (feature-map distortion) and Neuron Steadiness Regularization.

See docs/regularizers.md.
"""
from .disout import Disout, LinearScheduler, disout
from .nsr import NeuronSteadiness, nsr_loss

__all__ = ["Disout", "LinearScheduler", "NeuronSteadiness", "disout", "nsr_loss"]
