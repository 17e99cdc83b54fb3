"""The v2 telemetry contract: routing events, metrics, snapshots with persistent alerts, JSONL files."""

from .counters import TokenCounter
from .events import MODES, RoutingEvent
from .io import TelemetryWriter, load_manifest, load_routing_events, load_snapshots
from .metrics import (
    compute_entropy,
    compute_gini_coefficient,
    compute_layer_metrics,
    compute_n_effective,
    compute_top2_share,
    compute_utilization_shares,
    count_dead_experts,
    count_nearly_dead_experts,
)
from .snapshots import (
    ALERT_KINDS,
    ALERT_PERSISTENCE,
    COLLAPSE_CONFIRMED,
    PRE_COLLAPSE,
    Alert,
    AlertHistory,
    LayerSnapshot,
    SystemSnapshot,
    check_immediate_alerts,
)

__all__ = [
    "ALERT_KINDS",
    "ALERT_PERSISTENCE",
    "COLLAPSE_CONFIRMED",
    "MODES",
    "PRE_COLLAPSE",
    "Alert",
    "AlertHistory",
    "LayerSnapshot",
    "RoutingEvent",
    "SystemSnapshot",
    "TelemetryWriter",
    "TokenCounter",
    "check_immediate_alerts",
    "compute_entropy",
    "compute_gini_coefficient",
    "compute_layer_metrics",
    "compute_n_effective",
    "compute_top2_share",
    "compute_utilization_shares",
    "count_dead_experts",
    "count_nearly_dead_experts",
    "load_manifest",
    "load_routing_events",
    "load_snapshots",
]
