"""chronomoe-v3: keep Mixture-of-Experts models healthy while they train.

Telemetry (v2 contract) lives in `chronomoe_v3.telemetry`, governance (lens, controller) in
`chronomoe_v3.governance`; everything else is importable from here.
"""

from .banks import (
    ExpertBank,
    LayerBanks,
    ModuleListBank,
    RouterBank,
    StackedBank,
    banks_for,
    register_bank_factory,
)
from .basin import BasinHistory
from .bias import BridgeReport, SlowBias, bridge_report, route_with_bias, slow_bias_update
from .bimodality import BimodalityState
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
from .decisions import DecisionLog, DecisionRecord, load_decisions
from .layers import ChronoMoELayer
from .objective import EditCandidate, FreeEnergy, LayerView, free_energy, propose_edits, select_edits
from .ops import EditRecord, OptimizerSurgery, merge, prune, restore, spawn, split
from .registry import EditError, ExpertRecord, ExpertRegistry
from .routing import Routing, route_topk
from .system import ChronoSystem, StepResult
from .trace import MoETrace
from .version import __version__ as __version__

__all__ = [
    "BasinHistory",
    "BimodalityState",
    "BridgeReport",
    "ChronoConfig",
    "ChronoMoELayer",
    "ChronoSystem",
    "ClockConfig",
    "CoherenceState",
    "DecisionLog",
    "DecisionRecord",
    "EditCandidate",
    "EditError",
    "EditRecord",
    "ExpertBank",
    "ExpertRecord",
    "ExpertRegistry",
    "ExpertStats",
    "FreeEnergy",
    "LayerBanks",
    "LayerView",
    "ModuleListBank",
    "MoETrace",
    "OptimizerSurgery",
    "RouterBank",
    "Routing",
    "SlowBias",
    "StackedBank",
    "StepResult",
    "ThreeClockEMA",
    "attach_coherence",
    "banks_for",
    "bridge_report",
    "compute_coherence",
    "compute_expert_stats",
    "free_energy",
    "layer_coherence",
    "load_decisions",
    "merge",
    "propose_edits",
    "prune",
    "register_bank_factory",
    "restore",
    "route_topk",
    "route_with_bias",
    "select_edits",
    "slow_bias_update",
    "spawn",
    "split",
]
