"""The mid-clock lens controller of the v2 contract: topology debt -> pressure -> lens scale, with a harm guard."""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from ..jsonl import append_jsonl
from .lens import SteeringMode, parse_steering_mode

COLLAPSE_CONFIRMED = "COLLAPSE_CONFIRMED"
DECISIONS_FILE = "control_decisions.jsonl"


class LensLike(Protocol):
    """What the controller drives; ChronoLens and IdentityLens both qualify."""

    def set_scale(self, s: float) -> None: ...
    def set_steering_mode(self, mode: str) -> None: ...
    def update_steering(self, utilization_shares: Any, active_mask: Any = None) -> None: ...


def _clip01(x: float) -> float:
    return min(1.0, max(0.0, x))


def topology_debt(
    n_experts: int, n_effective: float, top2_share: float, dead_expert_count: int, neff_fraction: float = 0.6
) -> float:
    """``0.4*clip((f n - Neff)/(f n)) + 0.4*clip((top2 - 0.75)/0.25) + 0.2*clip(dead/max(1, n-1))`` with
    ``f = neff_fraction`` (v2: 0.6).

    The top2 term is used only when ``n > 2``: with two (or one) experts top2 is 1 whatever the balance,
    so v2 charged balanced small layers a permanent debt.
    """
    n = max(int(n_experts), 1)
    target = neff_fraction * n
    neff_term = _clip01((target - n_effective) / target)
    top2_term = _clip01((top2_share - 0.75) / 0.25) if n > 2 else 0.0
    dead_term = _clip01(dead_expert_count / max(1, n - 1))
    return 0.4 * neff_term + 0.4 * top2_term + 0.2 * dead_term


@dataclass(frozen=True)
class ControlConfig:
    """Controller settings (v2 defaults; backoff thresholds ordered so switching and abstention happen).

    With the defaults, consecutive harmful interventions take the backoff 1 -> 0.5 -> 0.25 (below
    ``mode_switch_backoff``: switch to the next steering mode) -> 0.125 (below ``abstain_backoff``:
    abstain until it recovers by ``backoff_recovery`` per harmless update).
    """

    warmup_steps: int = 100
    warmup_max_scale: float = 0.02
    pressure_retention: float = 0.8
    max_scale: float = 0.5
    min_pressure: float = 0.01
    harm_top2_rise: float = 0.02
    backoff_factor: float = 0.5
    backoff_recovery: float = 1.2
    backoff_floor: float = 0.05
    abstain_backoff: float = 0.15
    mode_switch_backoff: float = 0.3
    initial_mode: str = SteeringMode.ANTI_DOMINANCE.value
    mode_cycle: tuple[str, ...] = tuple(m.value for m in SteeringMode)
    neff_fraction: float = 0.6

    def __post_init__(self) -> None:
        for name in ("warmup_max_scale", "max_scale", "min_pressure", "harm_top2_rise"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
        if not (isinstance(self.neff_fraction, (int, float)) and 0 < self.neff_fraction <= 1):
            raise ValueError(f"neff_fraction must be in (0, 1], got {self.neff_fraction!r}")
        if not (isinstance(self.warmup_steps, int) and self.warmup_steps >= 0):
            raise ValueError(f"warmup_steps must be an int >= 0, got {self.warmup_steps!r}")
        if not 0 <= self.pressure_retention < 1:
            raise ValueError(f"pressure_retention must be in [0, 1), got {self.pressure_retention!r}")
        if not 0 < self.backoff_factor < 1:
            raise ValueError(f"backoff_factor must be in (0, 1), got {self.backoff_factor!r}")
        if not self.backoff_recovery >= 1:
            raise ValueError(f"backoff_recovery must be >= 1, got {self.backoff_recovery!r}")
        if not 0 < self.backoff_floor < self.abstain_backoff < self.mode_switch_backoff <= 1:
            raise ValueError(
                "need 0 < backoff_floor < abstain_backoff < mode_switch_backoff <= 1 so that mode switching "
                f"and abstention are reachable, got {self.backoff_floor}, {self.abstain_backoff}, "
                f"{self.mode_switch_backoff}"
            )
        parse_steering_mode(self.initial_mode)
        if not self.mode_cycle:
            raise ValueError("mode_cycle must name at least one steering mode")
        for m in self.mode_cycle:
            parse_steering_mode(m)


@dataclass
class ControlDecision:
    """One layer's control decision at one step. Holds its own deep copies of every dict."""

    run_id: str
    step: int
    layer_id: int
    observed: dict[str, Any]
    computed: dict[str, Any]
    actuator: dict[str, Any]
    emergency: bool = False
    notes: str = ""

    def __post_init__(self) -> None:
        self.observed = copy.deepcopy(dict(self.observed))
        self.computed = copy.deepcopy(dict(self.computed))
        self.actuator = copy.deepcopy(dict(self.actuator))

    def to_dict(self) -> dict[str, Any]:
        return copy.deepcopy(asdict(self))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ControlDecision:
        return cls(**dict(data))


@dataclass
class _LayerState:
    pressure: float = 0.0
    backoff: float = 1.0
    last_top2: float | None = None
    last_scale: float = 0.0
    mode: str = SteeringMode.ANTI_DOMINANCE.value
    switch_armed: bool = True


@dataclass
class _Plan:
    """Pure result of one layer's control step."""

    state: _LayerState
    debt: float
    harm: bool
    top2_rise: float
    warmup: bool
    abstain: bool
    scale: float
    switched_from: str | None = None
    notes: list[str] = field(default_factory=list)


def plan_layer(
    state: _LayerState, cfg: ControlConfig, n: int, neff: float, top2: float, dead: int, in_warmup: bool
) -> _Plan:
    """One control step for one layer: new state and actuator values (no side effects)."""
    new = copy.copy(state)
    debt = topology_debt(n, neff, top2, dead, cfg.neff_fraction)
    new.pressure = cfg.pressure_retention * state.pressure + (1 - cfg.pressure_retention) * debt
    top2_rise = 0.0 if state.last_top2 is None else top2 - state.last_top2
    harm = state.last_scale > 0 and top2_rise > cfg.harm_top2_rise
    notes: list[str] = []
    if harm:
        new.backoff = max(cfg.backoff_floor, state.backoff * cfg.backoff_factor)
        notes.append(f"harm: top2 rose {top2_rise:+.4f} after scale {state.last_scale:.4f}; backoff halved")
    else:
        new.backoff = min(1.0, state.backoff * cfg.backoff_recovery)
    switched_from = None
    if new.backoff < cfg.mode_switch_backoff and new.switch_armed and len(set(cfg.mode_cycle) - {new.mode}) > 0:
        cycle = list(cfg.mode_cycle)
        i = cycle.index(new.mode) if new.mode in cycle else -1
        switched_from, new.mode = new.mode, cycle[(i + 1) % len(cycle)]
        new.switch_armed = False
        notes.append(f"mode switch {switched_from} -> {new.mode} (backoff {new.backoff:.3f})")
    elif new.backoff >= cfg.mode_switch_backoff:
        new.switch_armed = True
    abstain = new.backoff < cfg.abstain_backoff or new.pressure < cfg.min_pressure
    scale = min(new.pressure, cfg.max_scale) * new.backoff
    if in_warmup:
        scale = min(scale, cfg.warmup_max_scale)
    if abstain:
        scale = 0.0
        notes.append(f"abstain (backoff {new.backoff:.3f}, pressure {new.pressure:.4f})")
    new.last_scale = scale
    new.last_top2 = top2
    return _Plan(new, debt, harm, top2_rise, in_warmup, abstain, scale, switched_from, notes)


def _alert_fields(alert: Any) -> tuple[Any, Any]:
    if isinstance(alert, Mapping):
        return alert.get("kind"), alert.get("layer_id")
    return getattr(alert, "kind", None), getattr(alert, "layer_id", None)


class Controller:
    """Per-layer lens controller: ``update(snapshot, lenses)`` sets each lens's scale and steering."""

    def __init__(
        self,
        n_layers: int,
        n_experts_per_layer: int | Sequence[int],
        config: ControlConfig | None = None,
        output_dir: str | Path | None = None,
    ) -> None:
        if not isinstance(n_layers, int) or n_layers < 1:
            raise ValueError(f"n_layers must be an int >= 1, got {n_layers!r}")
        widths = [n_experts_per_layer] * n_layers if isinstance(n_experts_per_layer, int) else list(n_experts_per_layer)
        if len(widths) != n_layers or any(not isinstance(w, int) or w < 1 for w in widths):
            raise ValueError(f"n_experts_per_layer must be an int >= 1 or {n_layers} such ints, got {widths!r}")
        self.n_layers = n_layers
        self.n_experts_per_layer = widths
        self.config = config if config is not None else ControlConfig()
        self.output_dir = None if output_dir is None else Path(output_dir)
        self.initialize("")

    def initialize(self, run_id: str) -> None:
        """Start a run: reset every layer's pressure, backoff and mode."""
        self.run_id = run_id
        self.first_step: int | None = None
        self.layers = [_LayerState(mode=self.config.initial_mode) for _ in range(self.n_layers)]

    @property
    def decisions_path(self) -> Path | None:
        if self.output_dir is None:
            return None
        return self.output_dir / (self.run_id or "run") / DECISIONS_FILE

    def update(self, snapshot: Any, lenses: Mapping[int, Any] | Sequence[Any] | None) -> list[ControlDecision]:
        """One mid-clock step: a decision per layer in ``snapshot``; lenses are matched by exact layer id.

        ``lenses`` maps layer id -> lens (or is a list indexed by layer id); a layer without a lens
        still gets a decision, with ``actuator["lens_applied"] = False``.
        """
        step = int(snapshot.step)
        if self.first_step is None:
            self.first_step = step
        in_warmup = step - self.first_step < self.config.warmup_steps
        emergencies = {
            lid for kind, lid in map(_alert_fields, getattr(snapshot, "alerts", []) or []) if kind == COLLAPSE_CONFIRMED
        }
        decisions = []
        for layer in snapshot.layers:
            lid = int(layer.layer_id)
            if not 0 <= lid < self.n_layers:
                raise ValueError(f"snapshot layer_id={lid} outside range(n_layers={self.n_layers})")
            n = len(layer.utilization_shares)
            self.n_experts_per_layer[lid] = n
            plan = plan_layer(
                self.layers[lid],
                self.config,
                n,
                float(layer.n_effective),
                float(layer.top2_share),
                int(layer.dead_expert_count),
                in_warmup,
            )
            self.layers[lid] = plan.state
            lens = self._lens_for(lenses, lid)
            if lens is not None:
                lens.set_steering_mode(plan.state.mode)
                if not plan.abstain:
                    lens.update_steering(list(layer.utilization_shares))
                lens.set_scale(plan.scale)
            emergency = lid in emergencies
            notes = plan.notes + (["COLLAPSE_CONFIRMED alert on this layer"] if emergency else [])
            decisions.append(
                ControlDecision(
                    run_id=self.run_id,
                    step=step,
                    layer_id=lid,
                    observed={
                        "n_experts": n,
                        "n_effective": float(layer.n_effective),
                        "top2_share": float(layer.top2_share),
                        "dead_expert_count": int(layer.dead_expert_count),
                    },
                    computed={
                        "debt": plan.debt,
                        "pressure": plan.state.pressure,
                        "backoff": plan.state.backoff,
                        "harm_detected": plan.harm,
                        "top2_rise": plan.top2_rise,
                        "warmup": plan.warmup,
                    },
                    actuator={
                        "scale": plan.scale,
                        "mode": plan.state.mode,
                        "mode_switched_from": plan.switched_from,
                        "abstain": plan.abstain,
                        "lens_applied": lens is not None,
                    },
                    emergency=emergency,
                    notes="; ".join(notes),
                )
            )
        self._append(decisions)
        return decisions

    @staticmethod
    def _lens_for(lenses: Mapping[int, Any] | Sequence[Any] | None, layer_id: int) -> Any:
        if lenses is None:
            return None
        if isinstance(lenses, Mapping):
            return lenses.get(layer_id)
        return lenses[layer_id] if layer_id < len(lenses) else None

    def _append(self, decisions: list[ControlDecision]) -> None:
        path = self.decisions_path
        if path is None or not decisions:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        append_jsonl(path, (d.to_dict() for d in decisions))

    def state_dict(self) -> dict[str, Any]:
        """Plain Python contents (safe for ``torch.load(weights_only=True)``)."""
        return {
            "run_id": self.run_id,
            "first_step": self.first_step,
            "n_experts_per_layer": list(self.n_experts_per_layer),
            "layers": [asdict(s) for s in self.layers],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        layers = list(state["layers"])
        if len(layers) != self.n_layers:
            raise ValueError(f"state has {len(layers)} layers, expected n_layers={self.n_layers}")
        self.run_id = str(state["run_id"])
        self.first_step = state["first_step"]
        self.n_experts_per_layer = [int(w) for w in state["n_experts_per_layer"]]
        self.layers = [_LayerState(**dict(s)) for s in layers]
