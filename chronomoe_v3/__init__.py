"""chronomoe-v3: keep Mixture-of-Experts models healthy while they train."""

from .clocks import ClockConfig, ThreeClockEMA
from .coherence import (
    CoherenceState,
    ExpertStats,
    attach_coherence,
    compute_coherence,
    compute_expert_stats,
    layer_coherence,
)
from .config import ChronoConfig
from .layers import ChronoMoELayer
from .routing import Routing, route_topk
from .trace import MoETrace

__version__ = "0.3.0.dev0"

__all__ = [
    "ChronoConfig",
    "ChronoMoELayer",
    "ClockConfig",
    "CoherenceState",
    "ExpertStats",
    "MoETrace",
    "Routing",
    "ThreeClockEMA",
    "attach_coherence",
    "compute_coherence",
    "compute_expert_stats",
    "layer_coherence",
    "route_topk",
]
