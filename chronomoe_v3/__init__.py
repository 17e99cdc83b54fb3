"""chronomoe-v3: keep Mixture-of-Experts models healthy while they train.

Telemetry (v2 contract) lives in `chronomoe_v3.telemetry`, governance (lens, controller) in
`chronomoe_v3.governance`, the balancers users already run in `chronomoe_v3.balance`, the run report in
`chronomoe_v3.report`, toy models and corpora in `chronomoe_v3.toy`; everything else is importable from here.
"""

from .adapters import (
    ChronoLayerAdapter,
    ExpertBank,
    LayerBanks,
    ModuleListBank,
    MoELayerAdapter,
    RouterBank,
    StackedBank,
    adapter_for,
    banks_for,
    register_adapter,
)
from .bias import SlowBias, slow_bias_update
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .clocks import ClockConfig, DebiasedEMA, ThreeClockEMA
from .config import (
    BasinConfig,
    BiasConfig,
    BimodalityConfig,
    BridgeConfig,
    ChronoConfig,
    CoherenceConfig,
    DegradeConfig,
    LifecycleConfig,
    ObjectiveConfig,
    ShadowConfig,
    SurgeryConfig,
)
from .jsonl import CorruptFileError, FileWriteError
from .layers import ChronoMoELayer
from .lifecycle.decisions import DecisionLog, DecisionRecord, load_decisions
from .lifecycle.objective import EditCandidate, FreeEnergy, free_energy, propose_edits
from .lifecycle.select import select_edits
from .observe.bimodality import BimodalityState
from .observe.coherence import CoherenceState, attach_coherence, compute_coherence, layer_coherence
from .observe.observer import LayerObserver
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
from .trace import Dispatch, MoETrace
from .version import __version__ as __version__
from .view import LayerView

__all__ = [
    "BasinConfig",
    "BasinHistory",
    "BiasConfig",
    "BimodalityConfig",
    "BimodalityState",
    "BridgeConfig",
    "BridgeReport",
    "CheckpointError",
    "ChronoConfig",
    "ChronoLayerAdapter",
    "ChronoMoELayer",
    "ChronoSystem",
    "ClockConfig",
    "CoherenceConfig",
    "CoherenceState",
    "CorruptFileError",
    "DebiasedEMA",
    "DecisionLog",
    "DecisionRecord",
    "DegradeConfig",
    "Dispatch",
    "ShadowConfig",
    "EditCandidate",
    "EditError",
    "EditRecord",
    "ExpertBank",
    "ExpertRecord",
    "ExpertRegistry",
    "ExpertStats",
    "FileWriteError",
    "FreeEnergy",
    "LayerBanks",
    "LayerObserver",
    "LayerView",
    "LifecycleConfig",
    "ModuleListBank",
    "MoELayerAdapter",
    "MoETrace",
    "ObjectiveConfig",
    "OptimizerSurgery",
    "RouterBank",
    "Routing",
    "SlowBias",
    "StackedBank",
    "StepResult",
    "SurgeryConfig",
    "ThreeClockEMA",
    "adapter_for",
    "attach_coherence",
    "banks_for",
    "bridge_report",
    "compute_coherence",
    "compute_expert_stats",
    "free_energy",
    "layer_coherence",
    "load_checkpoint",
    "load_decisions",
    "merge",
    "propose_edits",
    "prune",
    "register_adapter",
    "restore",
    "save_checkpoint",
    "route_topk",
    "route_with_bias",
    "select_edits",
    "slow_bias_update",
    "spawn",
    "split",
]
