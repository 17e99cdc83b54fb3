"""Layer and system snapshots, and the persistent collapse alerts of the v2 contract."""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .events import RoutingEvent, check_finite_float, check_int, check_optional_float
from .metrics import compute_layer_metrics

PRE_COLLAPSE = "PRE_COLLAPSE"
COLLAPSE_CONFIRMED = "COLLAPSE_CONFIRMED"
ALERT_KINDS = (PRE_COLLAPSE, COLLAPSE_CONFIRMED)
#: consecutive qualifying snapshots after which a persistent alert is emitted
ALERT_PERSISTENCE = {PRE_COLLAPSE: 3, COLLAPSE_CONFIRMED: 5}


@dataclass
class LayerSnapshot:
    """Routing health of one layer over one window, at the layer's active width."""

    layer_id: int
    utilization_shares: list[float]
    entropy: float
    dead_expert_count: int
    n_effective: float
    top2_share: float
    nearly_dead_count: int
    active_experts: list[int]

    def __post_init__(self) -> None:
        self.layer_id = check_int("layer_id", self.layer_id)
        self.utilization_shares = [check_finite_float("utilization_shares entry", s) for s in self.utilization_shares]
        if not self.utilization_shares:
            raise ValueError(f"layer {self.layer_id}: utilization_shares must be non-empty")
        self.active_experts = [check_int("active_experts entry", a) for a in self.active_experts]

    @property
    def n_experts(self) -> int:
        """Active width of the layer."""
        return len(self.utilization_shares)

    def to_dict(self) -> dict[str, Any]:
        return {
            "layer_id": self.layer_id,
            "utilization_shares": list(self.utilization_shares),
            "entropy": self.entropy,
            "dead_expert_count": self.dead_expert_count,
            "n_effective": self.n_effective,
            "top2_share": self.top2_share,
            "nearly_dead_count": self.nearly_dead_count,
            "active_experts": list(self.active_experts),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LayerSnapshot:
        return cls(**dict(data))


def pre_collapse_condition(layer: LayerSnapshot) -> bool:
    """``Neff < 0.6 n`` or ``top2 > 0.75``; the top2 clause needs n > 2 (top2 of 2 experts is always 1)."""
    n = layer.n_experts
    return layer.n_effective < 0.6 * n or (n > 2 and layer.top2_share > 0.75)


def collapse_confirmed_condition(layer: LayerSnapshot) -> bool:
    """At least one strictly dead expert and ``top2 > 0.85``."""
    return layer.dead_expert_count >= 1 and layer.top2_share > 0.85


_CONDITIONS = {PRE_COLLAPSE: pre_collapse_condition, COLLAPSE_CONFIRMED: collapse_confirmed_condition}


@dataclass(frozen=True)
class Alert:
    """One alert on one layer; ``count`` = consecutive qualifying snapshots (1 for an immediate alert)."""

    kind: str
    layer_id: int
    count: int
    message: str

    def __post_init__(self) -> None:
        if self.kind not in ALERT_KINDS:
            raise ValueError(f"Alert kind must be one of {ALERT_KINDS}, got {self.kind!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "layer_id": self.layer_id, "count": self.count, "message": self.message}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Alert:
        return cls(**dict(data))


def _make_alert(kind: str, layer: LayerSnapshot, count: int) -> Alert:
    msg = (
        f"layer {layer.layer_id}: {kind} x{count} (n_experts={layer.n_experts}, "
        f"Neff={layer.n_effective:.3f}, top2={layer.top2_share:.3f}, dead={layer.dead_expert_count})"
    )
    return Alert(kind=kind, layer_id=layer.layer_id, count=count, message=msg)


class AlertHistory:
    """Consecutive qualifying-snapshot counts per (layer, alert kind), carried across snapshots.

    Each ``SystemSnapshot.from_events`` call is one snapshot: a layer that meets a condition increments
    its count, a layer that misses resets it to 0, and a layer without events in the window (or whose
    events routed no token) is left as it was. Keys are ``"<KIND>@<layer_id>"`` and are matched exactly.
    ``counts`` may be a plain dict the caller owns (it is updated in place), which keeps v2 code that passed
    ``{}`` working.
    """

    def __init__(self, counts: MutableMapping[str, int] | None = None) -> None:
        self.counts: MutableMapping[str, int] = {} if counts is None else counts

    @staticmethod
    def key(layer_id: int, kind: str) -> str:
        return f"{kind}@{int(layer_id)}"

    def count(self, layer_id: int, kind: str) -> int:
        return int(self.counts.get(self.key(layer_id, kind), 0))

    def observe(self, layer_id: int, kind: str, qualifies: bool) -> int:
        """Record one snapshot of ``layer_id`` for ``kind``; return the new consecutive count."""
        if kind not in ALERT_KINDS:
            raise ValueError(f"kind must be one of {ALERT_KINDS}, got {kind!r}")
        new = self.count(layer_id, kind) + 1 if qualifies else 0
        self.counts[self.key(layer_id, kind)] = new
        return new

    def reset(self) -> None:
        self.counts.clear()

    def to_dict(self) -> dict[str, int]:
        return dict(self.counts)

    @classmethod
    def from_dict(cls, data: Mapping[str, int]) -> AlertHistory:
        return cls(dict(data))


def check_immediate_alerts(layers: Iterable[LayerSnapshot]) -> list[Alert]:
    """The alert conditions on these layers alone, without persistence (``count`` = 1)."""
    return [_make_alert(kind, layer, 1) for layer in layers for kind in ALERT_KINDS if _CONDITIONS[kind](layer)]


@dataclass
class SystemSnapshot:
    """All layers' routing health at one step, with the persistent alerts in force."""

    step: int
    timestamp: float
    train_loss: float | None
    val_loss: float | None
    layers: list[LayerSnapshot]
    alerts: list[Alert] = field(default_factory=list)
    run_id: str = ""
    model_name: str = ""

    def __post_init__(self) -> None:
        self.step = check_int("step", self.step)
        self.timestamp = check_finite_float("timestamp", self.timestamp)
        self.train_loss = check_optional_float("train_loss", self.train_loss)
        self.val_loss = check_optional_float("val_loss", self.val_loss)
        ids = [layer.layer_id for layer in self.layers]
        if len(set(ids)) != len(ids):
            raise ValueError(f"layers must have distinct layer_id values, got {ids}")

    def layer(self, layer_id: int) -> LayerSnapshot | None:
        """The snapshot of exactly ``layer_id`` (None if that layer had no events)."""
        return next((layer for layer in self.layers if layer.layer_id == layer_id), None)

    def alerts_for(self, layer_id: int) -> list[Alert]:
        """Alerts of exactly ``layer_id`` (layer 1 never sees layer 11's)."""
        return [a for a in self.alerts if a.layer_id == layer_id]

    def to_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "timestamp": self.timestamp,
            "train_loss": self.train_loss,
            "val_loss": self.val_loss,
            "layers": [layer.to_dict() for layer in self.layers],
            "alerts": [a.to_dict() for a in self.alerts],
            "run_id": self.run_id,
            "model_name": self.model_name,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SystemSnapshot:
        d = dict(data)
        d["layers"] = [LayerSnapshot.from_dict(x) for x in d.get("layers", [])]
        d["alerts"] = [Alert.from_dict(x) for x in d.get("alerts", [])]
        return cls(**d)

    @classmethod
    def from_events(
        cls,
        events: Sequence[RoutingEvent],
        step: int,
        train_loss: float | None,
        val_loss: float | None,
        run_id: str,
        model_name: str,
        n_layers: int,
        alert_history: AlertHistory | MutableMapping[str, int] | None,
        *,
        timestamp: float | None = None,
    ) -> SystemSnapshot:
        """Aggregate a window of events per layer and advance ``alert_history`` by one snapshot.

        A layer whose window routed no token (every count 0, e.g. ``step()`` called twice without a forward)
        carries no information: it is left out of ``layers`` and its alert counters are left as they were,
        exactly like a layer without events (no false PRE_COLLAPSE / COLLAPSE_CONFIRMED from empty windows).

        Layer ids outside ``range(n_layers)`` raise ValueError. ``alert_history`` is required: pass the
        same ``AlertHistory`` (or dict) at every call of a run. If a layer's active width changed within
        the window, only its events at the width of its latest event are used (older counts index a
        different set of slots).
        """
        if alert_history is None:
            raise ValueError(
                "alert_history is None: persistent alerts need an AlertHistory (or dict) carried across "
                "snapshots; create one per run and pass it to every from_events call"
            )
        history = alert_history if isinstance(alert_history, AlertHistory) else AlertHistory(alert_history)
        n_layers = check_int("n_layers", n_layers, minimum=1)
        by_layer: dict[int, list[RoutingEvent]] = {}
        for e in events:
            if not 0 <= e.layer_id < n_layers:
                raise ValueError(f"event layer_id={e.layer_id} outside range(n_layers={n_layers})")
            by_layer.setdefault(e.layer_id, []).append(e)
        layers = []
        for layer_id in sorted(by_layer):
            evs = by_layer[layer_id]
            width = max(evs, key=lambda e: (e.step, e.timestamp)).n_experts
            window = [e for e in evs if e.n_experts == width]
            if sum(e.token_count for e in window) == 0:
                continue  # an empty window (no tokens routed) says nothing: skipped like a layer without events
            metrics = compute_layer_metrics(window, width)
            metrics.pop("gini_coefficient")
            layers.append(LayerSnapshot(layer_id=layer_id, **metrics))
        alerts = []
        for layer in layers:
            for kind in ALERT_KINDS:
                count = history.observe(layer.layer_id, kind, _CONDITIONS[kind](layer))
                if count >= ALERT_PERSISTENCE[kind]:
                    alerts.append(_make_alert(kind, layer, count))
        return cls(
            step=step,
            timestamp=time.time() if timestamp is None else timestamp,
            train_loss=train_loss,
            val_loss=val_loss,
            layers=layers,
            alerts=alerts,
            run_id=run_id,
            model_name=model_name,
        )
