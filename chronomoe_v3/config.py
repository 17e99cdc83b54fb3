"""ChronoConfig: every knob of the design, validated at construction."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

ESTIMATORS = ("loo", "full")
SPAWN_STRATEGIES = ("clone_and_perturb", "random")
BIAS_MODES = ("logits", "selection")
DEGRADE_REFERENCES = ("layer_median", "absolute")
DEGRADE_BASELINES = ("mid", "slow")


def _check_open_unit(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and 0.0 < value < 1.0):
        raise ValueError(f"{name}={value!r} is invalid: expected a retention in the open interval (0, 1)")


def _check_choice(name: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is invalid: expected one of {list(allowed)}")


def _check_finite(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value)):
        raise ValueError(f"{name}={value!r} is invalid: expected a finite number")


def _check_int(name: str, value: int, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name}={value!r} is invalid: expected an integer >= {low}")


@dataclass(frozen=True)
class ChronoConfig:
    """All parameters of chronomoe-v3 (SPEC.md). Frozen; use `dataclasses.replace` to vary."""

    # Fast clock: coherence estimator and the three EMA retentions (SPEC 2-3).
    coherence_estimator: str = "loo"
    alpha_fast: float = 0.9
    alpha_mid: float = 0.99
    alpha_slow: float = 0.999
    alpha_role: float = 0.99
    # Degradation flag: an expert is flagged when (phi_fast - phi_baseline), minus the layer's median of the
    # same delta ("layer_median"; or not, "absolute"), falls below -max(delta_threshold, degrade_z * robust
    # spread of the layer's deltas) (spread term only with "layer_median"; 0 disables it), and only after
    # min_observations_to_flag observations. baseline "mid" (default) or "slow" (SPEC's phi_delta);
    # projectdesign.md gives the measurements behind the defaults.
    delta_threshold: float = 0.2
    degrade_baseline: str = "mid"
    degrade_reference: str = "layer_median"
    degrade_z: float = 3.0
    min_observations_to_flag: int = 250
    # The slow objective judges (prunes, merges, splits) only experts measured at least this often.
    min_observations_to_judge: int = 100
    # Slow bias beta (SPEC 4).
    eta_beta: float = 0.01
    tau: float = 0.5
    beta_min: float = -1.0
    beta_max: float = 1.0
    beta_center: bool = True
    bias_mode: str = "logits"
    # Bridge detector (SPEC 5): relevance-modulated retention floors for the fast and mid clocks.
    bridge_veto: bool = True
    alpha_floor_fast: float = 0.5
    alpha_floor_mid: float = 0.9
    bridge_eps: float = 1e-6
    # Slow objective (SPEC 7).
    lambda_complexity: float = 0.01
    rho_redundancy: float = 0.1
    kappa_instability: float = 0.1
    min_improvement: float = 0.01
    max_edits_per_cycle: int = 1
    cooldown_steps: int = 500
    min_experts_per_layer: int = 2
    max_experts_per_layer: int = 16
    spawn_strategy: str = "clone_and_perturb"
    split_perturbation_scale: float = 0.01
    alpha_centroid: float = 0.95
    cooling_period: int = 200
    lifecycle_eval_interval: int = 10
    basin_window_size: int = 50
    # Parked weights of archived experts kept for restore (oldest dropped first), so memory stays bounded.
    archive_capacity: int = 64
    # Token basins (ChronoSystem.observe_tokens): ids >= this share one "other" count per expert.
    basin_vocab_limit: int = 4096

    def __post_init__(self) -> None:
        _check_choice("coherence_estimator", self.coherence_estimator, ESTIMATORS)
        _check_choice("spawn_strategy", self.spawn_strategy, SPAWN_STRATEGIES)
        _check_choice("bias_mode", self.bias_mode, BIAS_MODES)
        _check_choice("degrade_reference", self.degrade_reference, DEGRADE_REFERENCES)
        _check_choice("degrade_baseline", self.degrade_baseline, DEGRADE_BASELINES)
        for name in ("alpha_fast", "alpha_mid", "alpha_slow", "alpha_role", "alpha_centroid"):
            _check_open_unit(name, getattr(self, name))
        if not self.alpha_fast < self.alpha_mid < self.alpha_slow:
            raise ValueError(
                f"clock retentions must satisfy alpha_fast < alpha_mid < alpha_slow; got "
                f"alpha_fast={self.alpha_fast}, alpha_mid={self.alpha_mid}, alpha_slow={self.alpha_slow}"
            )
        for name in ("alpha_floor_fast", "alpha_floor_mid"):
            value = getattr(self, name)
            _check_finite(name, value)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{name}={value!r} is invalid: expected a retention floor in [0, 1)")
        if self.alpha_floor_fast > self.alpha_fast:
            raise ValueError(
                f"alpha_floor_fast={self.alpha_floor_fast} is invalid: expected <= alpha_fast={self.alpha_fast}"
            )
        if self.alpha_floor_mid > self.alpha_mid:
            raise ValueError(
                f"alpha_floor_mid={self.alpha_floor_mid} is invalid: expected <= alpha_mid={self.alpha_mid}"
            )
        for name in (
            "delta_threshold", "degrade_z", "eta_beta", "tau", "beta_min", "beta_max", "lambda_complexity",
            "rho_redundancy", "kappa_instability", "min_improvement", "split_perturbation_scale", "bridge_eps",
        ):
            _check_finite(name, getattr(self, name))
        for name in (
            "delta_threshold", "degrade_z", "eta_beta", "lambda_complexity", "rho_redundancy", "kappa_instability",
            "min_improvement", "split_perturbation_scale",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)!r} is invalid: expected a value >= 0")
        if not self.bridge_eps > 0:
            raise ValueError(f"bridge_eps={self.bridge_eps!r} is invalid: expected a value > 0")
        if not -1.0 <= self.tau <= 1.0:
            raise ValueError(f"tau={self.tau!r} is invalid: expected a coherence level in [-1, 1]")
        if not self.beta_min < self.beta_max:
            raise ValueError(
                f"beta_min={self.beta_min} and beta_max={self.beta_max} are invalid: expected beta_min < beta_max"
            )
        if not self.beta_min <= 0.0 <= self.beta_max:
            raise ValueError(
                f"beta bounds [{self.beta_min}, {self.beta_max}] are invalid: expected them to contain 0 "
                "(new experts start at beta 0)"
            )
        _check_int("min_observations_to_flag", self.min_observations_to_flag, 1)
        _check_int("min_observations_to_judge", self.min_observations_to_judge, 1)
        _check_int("max_edits_per_cycle", self.max_edits_per_cycle, 0)
        _check_int("cooldown_steps", self.cooldown_steps, 0)
        _check_int("min_experts_per_layer", self.min_experts_per_layer, 1)
        _check_int("max_experts_per_layer", self.max_experts_per_layer, 1)
        _check_int("cooling_period", self.cooling_period, 0)
        _check_int("lifecycle_eval_interval", self.lifecycle_eval_interval, 1)
        _check_int("basin_window_size", self.basin_window_size, 1)
        _check_int("archive_capacity", self.archive_capacity, 0)
        _check_int("basin_vocab_limit", self.basin_vocab_limit, 1)
        if self.min_experts_per_layer > self.max_experts_per_layer:
            raise ValueError(
                f"min_experts_per_layer={self.min_experts_per_layer} and max_experts_per_layer="
                f"{self.max_experts_per_layer} are invalid: expected min <= max"
            )

    @property
    def clock_alphas(self) -> tuple[float, float, float]:
        """(fast, mid, slow) retentions."""
        return (self.alpha_fast, self.alpha_mid, self.alpha_slow)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ChronoConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown ChronoConfig fields {unknown}; expected a subset of {sorted(known)}")
        return cls(**data)
