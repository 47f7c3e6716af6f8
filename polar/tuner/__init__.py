"""PoLAR as a PEFT method: config, layers, tuner model, and its registration with PEFT."""

from .config import PolarConfig, PolarPeftType
from .layer import PolarLayer, PolarLinear
from .model import PolarModel, delta_weights, iter_polar_layers
from .registration import register

register()

__all__ = [
    "PolarConfig",
    "PolarLayer",
    "PolarLinear",
    "PolarModel",
    "PolarPeftType",
    "delta_weights",
    "iter_polar_layers",
]
