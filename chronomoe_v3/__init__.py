"""chronomoe-v3: keep Mixture-of-Experts models healthy while they train.

Telemetry (v2 contract) lives in `chronomoe_v3.telemetry`, governance (lens, controller) in
`chronomoe_v3.governance`; everything else is importable from here.
"""

from .adapters import (
    ExpertBank,
    LayerBanks,
    ModuleListBank,
    RouterBank,
    StackedBank,
    banks_for,
    register_bank_factory,
)
from .bias import SlowBias, slow_bias_update
from .clocks import ClockConfig, ThreeClockEMA
from .config import ChronoConfig
from .layers import ChronoMoELayer
from .lifecycle.decisions import DecisionLog, DecisionRecord, load_decisions
from .lifecycle.objective import EditCandidate, FreeEnergy, free_energy, propose_edits
from .lifecycle.select import select_edits
from .observe.bimodality import BimodalityState
from .observe.coherence import CoherenceState, attach_coherence, compute_coherence, layer_coherence
from .observe.stats import ExpertStats, compute_expert_stats
from .ops import (
    EditError,
    EditRecord,
    ExpertRecord,
    ExpertRegistry,
    OptimizerSurgery,
    merge,
    prune,
    restore,
    spawn,
    split,
)
from .ops.basin import BasinHistory
from .routing import BridgeReport, Routing, bridge_report, route_topk, route_with_bias
from .system import ChronoSystem, StepResult
from .trace import MoETrace
from .version import __version__ as __version__
from .view import LayerView

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
