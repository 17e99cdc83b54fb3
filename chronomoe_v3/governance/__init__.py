"""The v2 governance contract: the router-input lens and the mid-clock controller that drives it."""

from .controller import ControlConfig, ControlDecision, Controller, LensLike, plan_layer, topology_debt
from .lens import ChronoLens, IdentityLens, LogitLens, SteeringMode, steering_weights

__all__ = [
    "ChronoLens",
    "ControlConfig",
    "ControlDecision",
    "Controller",
    "IdentityLens",
    "LensLike",
    "LogitLens",
    "SteeringMode",
    "plan_layer",
    "steering_weights",
    "topology_debt",
]
