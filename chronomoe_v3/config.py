"""ChronoConfig: every knob of the design, one frozen sub-config per component, validated at construction.

    ChronoConfig(
        coherence=CoherenceConfig(slow=ClockConfig("slow", half_life=2000)),
        lifecycle=LifecycleConfig(cooldown_steps=200),
    )

Vary a config with `dataclasses.replace` at either level (`replace(c, lifecycle=replace(c.lifecycle,
...))`). Errors name the field (dotted, e.g. `lifecycle.cooldown_steps`) and the allowed range. Configs are
plain values: `to_dict()` / `from_dict()` round-trip through JSON, and `diff(other)` lists the dotted fields
that differ (what `ChronoSystem.load_state_dict` reports when a checkpoint was saved under another config).

Numeric limits, so that no valid config overflows silently: every real field is finite in fp32 (|x| <=
FP32_MAX); every integer field fits int64; clock retentions lie in (0, 1) also once rounded to fp32;
logit-scale fields (`bias.beta_min/beta_max`, `mid.max_offset`, `lifecycle.split_router_margin`) are within
+-LOGIT_LIMIT (1e4); `lifecycle.perturbation_scale` <= PERTURBATION_LIMIT (1e3); `bimodality.samples_per_expert`
<= 2**16 and `basins.vocab_limit` <= 2**31 - 2 (sizes of tensors they allocate).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from .clocks import ClockConfig, fp32

ESTIMATORS = ("loo", "full")
SPAWN_STRATEGIES = ("clone_and_perturb", "random")
BIAS_MODES = ("logits", "selection")
DEGRADE_REFERENCES = ("layer_median", "absolute")
DEGRADE_BASELINES = ("mid", "slow")
SHADOW_STORAGES = ("host", "device")


def _check_choice(name: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is invalid: expected one of {list(allowed)}")


# Numeric limits (docs/reliability.md, "Numbers and state"). Every real field is used in fp32 tensor math, so
# it must be finite in fp32; every integer field may meet an int64 tensor (observation counts, steps).
FP32_MAX = float(torch.finfo(torch.float32).max)
INT64_MAX = int(torch.iinfo(torch.int64).max)
# Logit-scale fields (beta bounds, the mid clock's offset bound, the split router margin): beyond this a softmax
# is saturated anyway, and sums over experts of such values stay exact enough in fp32.
LOGIT_LIMIT = 1e4
# Relative noise of spawn / split / replace: a perturbation 1000x the weights' own RMS is no longer a perturbation.
PERTURBATION_LIMIT = 1e3
# Sizes of per-step tensors the config allocates: samples drawn per expert, token-basin columns.
MAX_SAMPLES_PER_EXPERT = 2**16
MAX_VOCAB_LIMIT = 2**31 - 2


def _check_number(name: str, value: float, low: float | None = None, high: float | None = None,
                  low_open: bool = False, high_open: bool = False) -> None:
    """A finite real in the interval (open or closed ends), and always within the finite fp32 range."""
    lo_v = -FP32_MAX if low is None else max(low, -FP32_MAX)
    hi_v = FP32_MAX if high is None else min(high, FP32_MAX)
    lo_open = low_open and low is not None and low >= -FP32_MAX
    hi_open = high_open and high is not None and high <= FP32_MAX
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = value > lo_v if lo_open else value >= lo_v
    if ok:
        ok = value < hi_v if hi_open else value <= hi_v
    if not ok:
        interval = f"{'(' if lo_open else '['}{lo_v}, {hi_v}{')' if hi_open else ']'}"
        raise ValueError(f"{name}={value!r} is invalid: expected a finite number in {interval}")


def _check_int(name: str, value: int, low: int, high: int = INT64_MAX) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{name}={value!r} is invalid: expected an integer in [{low}, {high}]")


def _check_bool(name: str, value: bool) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name}={value!r} is invalid: expected True or False")


def _check_clock(name: str, value: ClockConfig) -> None:
    if not isinstance(value, ClockConfig):
        raise ValueError(f"{name}={value!r} is invalid: expected a ClockConfig")


@dataclass(frozen=True)
class CoherenceConfig:
    """The fast clock's signal (SPEC 2-3): the phi estimator and the retentions of the three clocks (fast
    ~10, mid ~100, slow ~1000 observed forwards) and of the role vectors."""

    estimator: str = "loo"
    fast: ClockConfig = field(default_factory=lambda: ClockConfig("fast", alpha=0.9))
    mid: ClockConfig = field(default_factory=lambda: ClockConfig("mid", alpha=0.99))
    slow: ClockConfig = field(default_factory=lambda: ClockConfig("slow", alpha=0.999))
    role: ClockConfig = field(default_factory=lambda: ClockConfig("role", alpha=0.99))

    def __post_init__(self) -> None:
        _check_choice("coherence.estimator", self.estimator, ESTIMATORS)
        for name in ("fast", "mid", "slow", "role"):
            _check_clock(f"coherence.{name}", getattr(self, name))
        if not self.fast.retention < self.mid.retention < self.slow.retention:
            raise ValueError(
                "clock retentions must satisfy coherence.fast < coherence.mid < coherence.slow; got "
                f"{self.fast.retention}, {self.mid.retention}, {self.slow.retention}"
            )
        rounded = [fp32(c.retention) for c in (self.fast, self.mid, self.slow)]
        if not rounded[0] < rounded[1] < rounded[2]:
            raise ValueError(
                "clock retentions must satisfy coherence.fast < coherence.mid < coherence.slow also in fp32 (the "
                f"clocks' dtype); got {self.fast.retention}, {self.mid.retention}, {self.slow.retention}, which "
                f"round to {rounded[0]}, {rounded[1]}, {rounded[2]}"
            )

    @property
    def alphas(self) -> tuple[float, float, float]:
        """(fast, mid, slow) retentions."""
        return (self.fast.retention, self.mid.retention, self.slow.retention)


@dataclass(frozen=True)
class DegradeConfig:
    """The degrading flag (projectdesign.md has the measurements behind the defaults): an expert is flagged
    when `phi_fast - phi_<baseline>`, minus the layer's median of the same delta (`reference`
    "layer_median"; or not, "absolute"), falls below `-max(threshold, z * robust spread of the layer's
    deltas)` (spread term only with "layer_median"; z = 0 disables it), after `min_observations`. The same
    flag is raised when an expert's identity breaks (its mean output turns away from its own history: fast
    identity below slow identity by more than `identity_threshold`, beyond the layer's median and z spreads;
    `CoherenceState.broken`)."""

    threshold: float = 0.2
    baseline: str = "mid"
    reference: str = "layer_median"
    z: float = 3.0
    min_observations: int = 250
    identity_threshold: float = 0.15

    def __post_init__(self) -> None:
        _check_number("degrade.threshold", self.threshold, 0.0)
        _check_number("degrade.identity_threshold", self.identity_threshold, 0.0)
        _check_choice("degrade.baseline", self.baseline, DEGRADE_BASELINES)
        _check_choice("degrade.reference", self.reference, DEGRADE_REFERENCES)
        _check_number("degrade.z", self.z, 0.0)
        _check_int("degrade.min_observations", self.min_observations, 1)


@dataclass(frozen=True)
class ShadowConfig:
    """Shadow copies of the expert weights and the weight-jump detector (ops/shadow.py, docs/objective.md):
    every `refresh_every` `step()` calls each active slot's expert weights are copied (to `storage`: "host"
    memory, or the weights' "device"), unless they jumped; at every `step()` the relative distance of the live
    weights from the copy is estimated by a sketch of `probes` random bilinear probes per weight, and a slot
    whose distance exceeds `jump_threshold` and `jump_ratio` x the layer's median distance has jumped: it is
    restored from its copy (a `replace` by its own earlier weights) when the objective predicts a gain. A jump
    not restored within `accept_steps` training steps is accepted (the copy is refreshed). `enabled=False`
    turns all of it off (no copy is held)."""

    enabled: bool = True
    storage: str = "host"
    probes: int = 16
    refresh_every: int = 2
    jump_threshold: float = 0.5
    jump_ratio: float = 4.0
    accept_steps: int = 1000

    def __post_init__(self) -> None:
        _check_bool("shadow.enabled", self.enabled)
        _check_choice("shadow.storage", self.storage, SHADOW_STORAGES)
        _check_int("shadow.probes", self.probes, 1, 1024)
        _check_int("shadow.refresh_every", self.refresh_every, 1)
        _check_number("shadow.jump_threshold", self.jump_threshold, 0.0)
        _check_number("shadow.jump_ratio", self.jump_ratio, 1.0)
        _check_int("shadow.accept_steps", self.accept_steps, 0)


@dataclass(frozen=True)
class BiasConfig:
    """The slow bias beta (SPEC 4): `beta <- clip(beta + eta (phi_slow - tau), beta_min, beta_max)`, centred
    over the active experts (`center`), added to the router logits in `mode` ("logits" or "selection")."""

    eta: float = 0.01
    tau: float = 0.5
    beta_min: float = -1.0
    beta_max: float = 1.0
    center: bool = True
    mode: str = "logits"

    def __post_init__(self) -> None:
        _check_number("bias.eta", self.eta, 0.0)
        _check_number("bias.tau", self.tau, -1.0, 1.0)
        _check_number("bias.beta_min", self.beta_min, -LOGIT_LIMIT, LOGIT_LIMIT)
        _check_number("bias.beta_max", self.beta_max, -LOGIT_LIMIT, LOGIT_LIMIT)
        _check_bool("bias.center", self.center)
        _check_choice("bias.mode", self.mode, BIAS_MODES)
        if not self.beta_min < self.beta_max:
            raise ValueError(
                f"bias.beta_min={self.beta_min} and bias.beta_max={self.beta_max} are invalid: expected "
                "beta_min < beta_max"
            )
        if not self.beta_min <= 0.0 <= self.beta_max:
            raise ValueError(
                f"bias.beta_min/beta_max [{self.beta_min}, {self.beta_max}] are invalid: expected them to contain "
                "0 (new experts start at beta 0)"
            )


@dataclass(frozen=True)
class BridgeConfig:
    """Overlap safety (SPEC 5): the veto on gates that only beta supports, and the retention floors the
    relevance pulls the fast and mid clocks towards (`alpha_eff = alpha r + floor (1 - r)`)."""

    veto: bool = True
    alpha_floor_fast: float = 0.5
    alpha_floor_mid: float = 0.9

    def __post_init__(self) -> None:
        _check_bool("bridge.veto", self.veto)
        _check_number("bridge.alpha_floor_fast", self.alpha_floor_fast, 0.0, 1.0, high_open=True)
        _check_number("bridge.alpha_floor_mid", self.alpha_floor_mid, 0.0, 1.0, high_open=True)


@dataclass(frozen=True)
class MidClockConfig:
    """The built-in mid clock (docs/system.md): the v2 lens controller turns each layer's topology debt
    (Neff below `neff_fraction` x n, top-2 concentration, dead experts) into a pressure, and the pressure
    drives a `LogitLens` on the layer's router: `offset += gain * scale * steering` per `step()` call,
    clipped to `max_offset`."""

    gain: float = 1.0
    max_offset: float = 8.0
    neff_fraction: float = 1.0

    def __post_init__(self) -> None:
        _check_number("mid.gain", self.gain, 0.0)
        _check_number("mid.max_offset", self.max_offset, 0.0, LOGIT_LIMIT)
        _check_number("mid.neff_fraction", self.neff_fraction, 0.0, 1.0, low_open=True)


@dataclass(frozen=True)
class BimodalityConfig:
    """The "one expert, two roles" detector (SPEC 6; observe/bimodality.py): `samples_per_expert` token
    outputs drawn per expert per forward, centroids moved at the `centroid` retention, a second centroid
    seeded at a sample whose cosine to the first is below `seed_cosine`, a centroid re-seeded when its
    count falls below `reseed_balance` times the other's."""

    centroid: ClockConfig = field(default_factory=lambda: ClockConfig("centroid", alpha=0.95))
    samples_per_expert: int = 8
    seed_cosine: float = 0.9
    reseed_balance: float = 0.05

    def __post_init__(self) -> None:
        _check_clock("bimodality.centroid", self.centroid)
        _check_int("bimodality.samples_per_expert", self.samples_per_expert, 1, MAX_SAMPLES_PER_EXPERT)
        _check_number("bimodality.seed_cosine", self.seed_cosine, -1.0, 1.0, high_open=True)
        _check_number("bimodality.reseed_balance", self.reseed_balance, 0.0, 1.0, high_open=True)


@dataclass(frozen=True)
class ObjectiveConfig:
    """The slow objective (SPEC 7; docs/objective.md): the weights of F, the bar an edit's predicted delta_F
    must clear, and the evidence each kind of candidate needs: a judged expert has `min_observations_to_judge`
    measured forwards and `min_evidence_tokens` tokens routed to it over the slow window; a layer is
    concentrated (nothing is removed there) when its slow Neff < `concentration_neff` x n or its top-2 share
    > `concentration_top2` (the v2 PRE_COLLAPSE condition), a collapse alert is raised on it, or the mid
    clock's pressure on it exceeds `concentration_pressure` (it is still being rebalanced); a prune needs
    the expert's share below `prune_max_share` x its fair share, and either a slow coherence below
    `prune_coherence_floor` or a *vestigial* share: below `prune_vestigial_share` x its fair share while the mid
    clock is not moving tokens away from it (its lens offset >= 0: the router's own verdict, not chronomoe's
    doing); a removal (prune, merge) needs the expert to
    have lived `min_age_to_remove` training steps (about the slow clock's horizon), so that what condemns it is
    its own history: a split child or a spawned expert is not removed on the readings of its first weeks."""

    lambda_complexity: float = 0.01
    rho_redundancy: float = 0.1
    kappa_instability: float = 0.1
    min_improvement: float = 0.01
    min_observations_to_judge: int = 100
    bimodality_threshold: float = 0.2
    redundancy_sharpness: float = 4.0
    starvation_confidence: float = 0.2
    starvation_floor: float = 0.15
    prune_coherence_floor: float = 0.0
    prune_min_absorbable: float = 0.5
    merge_min_redundancy: float = 0.5
    min_evidence_tokens: float = 4096.0
    prune_max_share: float = 0.5
    prune_vestigial_share: float = 0.125
    concentration_neff: float = 0.6
    concentration_top2: float = 0.75
    concentration_pressure: float = 0.05
    min_age_to_remove: int = 1000

    def __post_init__(self) -> None:
        for name in ("lambda_complexity", "rho_redundancy", "kappa_instability", "min_improvement"):
            _check_number(f"objective.{name}", getattr(self, name), 0.0)
        _check_int("objective.min_observations_to_judge", self.min_observations_to_judge, 1)
        _check_number("objective.bimodality_threshold", self.bimodality_threshold, 0.0, 2.0, high_open=True)
        _check_number("objective.redundancy_sharpness", self.redundancy_sharpness, 0.0, low_open=True)
        _check_number("objective.starvation_confidence", self.starvation_confidence, 0.0, 1.0, True, True)
        _check_number("objective.starvation_floor", self.starvation_floor, 0.0, 1.0, high_open=True)
        _check_number("objective.prune_coherence_floor", self.prune_coherence_floor, -1.0, 1.0)
        _check_number("objective.prune_min_absorbable", self.prune_min_absorbable, 0.0, 1.0)
        _check_number("objective.merge_min_redundancy", self.merge_min_redundancy, 0.0, 1.0)
        _check_number("objective.min_evidence_tokens", self.min_evidence_tokens, 0.0)
        _check_number("objective.prune_max_share", self.prune_max_share, 0.0, 1.0)
        _check_number("objective.prune_vestigial_share", self.prune_vestigial_share, 0.0, 1.0)
        _check_number("objective.concentration_neff", self.concentration_neff, 0.0, 1.0)
        _check_number("objective.concentration_top2", self.concentration_top2, 0.0, 1.0)
        _check_number("objective.concentration_pressure", self.concentration_pressure, 0.0)
        _check_int("objective.min_age_to_remove", self.min_age_to_remove, 0)


@dataclass(frozen=True)
class LifecycleConfig:
    """The slow clock's schedule and bounds (SPEC 7-8): a review every `eval_interval` `step()` calls, at most
    `max_edits_per_cycle` edits per review, `cooldown_steps` between edits of a layer, `cooling_period` before
    a newborn expert is judged, the live-expert bounds per layer, and how new experts are made. Every edit is
    audited `audit_steps` training steps later (`lifecycle/audit.py`; no other edit of the layer meanwhile) and
    rolled back when the loss rose beyond `harm_z` noise units and `harm_min_loss` nats; that kind of edit is
    then not proposed in the layer for `rollback_penalty_steps`. After a removal (prune, merge) the layer does
    not grow (split, spawn) for `regrow_hold_steps`: the slow readings that would justify growth were taken
    while the removed expert still shared the traffic, and the slow window needs about that long to describe
    the layer without it. With `step()` every 50 training steps, the defaults review every 100 steps and let a
    layer change at most every 300."""

    eval_interval: int = 2
    max_edits_per_cycle: int = 1
    cooldown_steps: int = 300
    cooling_period: int = 200
    min_experts_per_layer: int = 2
    max_experts_per_layer: int = 16
    spawn_strategy: str = "clone_and_perturb"
    perturbation_scale: float = 0.01
    split_router_margin: float = 2.0
    archive_capacity: int = 64
    audit_steps: int = 300
    harm_z: float = 3.0
    harm_min_loss: float = 0.01
    rollback_penalty_steps: int = 2000
    regrow_hold_steps: int = 1000

    def __post_init__(self) -> None:
        _check_int("lifecycle.eval_interval", self.eval_interval, 1)
        _check_int("lifecycle.audit_steps", self.audit_steps, 1)
        _check_number("lifecycle.harm_z", self.harm_z, 0.0)
        _check_number("lifecycle.harm_min_loss", self.harm_min_loss, 0.0)
        _check_int("lifecycle.rollback_penalty_steps", self.rollback_penalty_steps, 0)
        _check_int("lifecycle.regrow_hold_steps", self.regrow_hold_steps, 0)
        _check_int("lifecycle.max_edits_per_cycle", self.max_edits_per_cycle, 0)
        _check_int("lifecycle.cooldown_steps", self.cooldown_steps, 0)
        _check_int("lifecycle.cooling_period", self.cooling_period, 0)
        _check_int("lifecycle.min_experts_per_layer", self.min_experts_per_layer, 1)
        _check_int("lifecycle.max_experts_per_layer", self.max_experts_per_layer, 1)
        _check_choice("lifecycle.spawn_strategy", self.spawn_strategy, SPAWN_STRATEGIES)
        _check_number("lifecycle.perturbation_scale", self.perturbation_scale, 0.0, PERTURBATION_LIMIT)
        _check_number("lifecycle.split_router_margin", self.split_router_margin, 0.0, LOGIT_LIMIT)
        _check_int("lifecycle.archive_capacity", self.archive_capacity, 0)
        if self.min_experts_per_layer > self.max_experts_per_layer:
            raise ValueError(
                f"lifecycle.min_experts_per_layer={self.min_experts_per_layer} and lifecycle.max_experts_per_layer="
                f"{self.max_experts_per_layer} are invalid: expected min <= max"
            )


@dataclass(frozen=True)
class SurgeryConfig:
    """Optimiser surgery (ops/surgery.py): for how many optimiser steps after an edit the Adam moments of a
    fresh slice are seeded from its first nonzero gradient."""

    seed_steps: int = 100

    def __post_init__(self) -> None:
        _check_int("surgery.seed_steps", self.seed_steps, 1)


@dataclass(frozen=True)
class BasinConfig:
    """Basins: `history` slow-clock readings kept per expert (share, phi, co-activated experts), and the token
    basins of `ChronoSystem.observe_tokens` (ids >= `vocab_limit` share one count; counts decay by
    `token_decay` at each `step()`)."""

    history: int = 50
    vocab_limit: int = 4096
    token_decay: float = 0.9

    def __post_init__(self) -> None:
        _check_int("basins.history", self.history, 1)
        _check_int("basins.vocab_limit", self.vocab_limit, 1, MAX_VOCAB_LIMIT)
        _check_number("basins.token_decay", self.token_decay, 0.0, 1.0)


_SECTIONS: dict[str, type] = {
    "coherence": CoherenceConfig,
    "degrade": DegradeConfig,
    "shadow": ShadowConfig,
    "bias": BiasConfig,
    "bridge": BridgeConfig,
    "mid": MidClockConfig,
    "bimodality": BimodalityConfig,
    "objective": ObjectiveConfig,
    "lifecycle": LifecycleConfig,
    "surgery": SurgeryConfig,
    "basins": BasinConfig,
}


@dataclass(frozen=True)
class ChronoConfig:
    """All parameters of chronomoe-v3 (SPEC.md), one sub-config per component. Frozen; vary with
    `dataclasses.replace`."""

    coherence: CoherenceConfig = field(default_factory=CoherenceConfig)
    degrade: DegradeConfig = field(default_factory=DegradeConfig)
    shadow: ShadowConfig = field(default_factory=ShadowConfig)
    bias: BiasConfig = field(default_factory=BiasConfig)
    bridge: BridgeConfig = field(default_factory=BridgeConfig)
    mid: MidClockConfig = field(default_factory=MidClockConfig)
    bimodality: BimodalityConfig = field(default_factory=BimodalityConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    lifecycle: LifecycleConfig = field(default_factory=LifecycleConfig)
    surgery: SurgeryConfig = field(default_factory=SurgeryConfig)
    basins: BasinConfig = field(default_factory=BasinConfig)

    def __post_init__(self) -> None:
        for name, cls in _SECTIONS.items():
            value = getattr(self, name)
            if not isinstance(value, cls):
                raise ValueError(f"{name}={value!r} is invalid: expected a {cls.__name__}")
        floors = (("fast", self.bridge.alpha_floor_fast), ("mid", self.bridge.alpha_floor_mid))
        for clock, floor in floors:
            alpha = getattr(self.coherence, clock).retention
            if floor > alpha:
                raise ValueError(
                    f"bridge.alpha_floor_{clock}={floor} is invalid: expected <= coherence.{clock}.alpha={alpha}"
                )

    def to_dict(self) -> dict[str, Any]:
        """Nested plain dict (JSON-ready); clocks as `{name, alpha, half_life}`."""
        return {name: _section_to_dict(getattr(self, name)) for name in _SECTIONS}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ChronoConfig:
        """Inverse of `to_dict()`; missing sections or fields take their defaults, unknown ones raise."""
        if not isinstance(data, Mapping):
            raise ValueError(f"config is {type(data).__name__}; expected a mapping of sections")
        unknown = sorted(set(data) - set(_SECTIONS))
        if unknown:
            raise ValueError(f"unknown ChronoConfig sections {unknown}; expected a subset of {sorted(_SECTIONS)}")
        return cls(**{name: _section_from_dict(name, _SECTIONS[name], data[name]) for name in data})

    def diff(self, other: ChronoConfig) -> list[str]:
        """Dotted names of the fields whose values differ between `self` and `other`, e.g.
        `["coherence.slow.alpha", "lifecycle.cooldown_steps"]`."""
        return _diff(self.to_dict(), other.to_dict(), "")


def _section_to_dict(section: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in fields(section):
        value = getattr(section, f.name)
        out[f.name] = value.to_dict() if isinstance(value, ClockConfig) else value
    return out


def _section_from_dict(name: str, cls: type, data: Any) -> Any:
    if not isinstance(data, Mapping):
        raise ValueError(f"config section {name!r} is {type(data).__name__}; expected a mapping")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ValueError(f"unknown fields {unknown} in config section {name!r}; expected a subset of {sorted(known)}")
    kwargs = {}
    for key, value in data.items():
        default = getattr(cls(), key)
        if isinstance(default, ClockConfig):
            try:
                value = ClockConfig.from_dict(value)
            except ValueError as exc:
                raise ValueError(f"{name}.{key}: {exc}") from None
        kwargs[key] = value
    return cls(**kwargs)


def _diff(a: Any, b: Any, prefix: str) -> list[str]:
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        out: list[str] = []
        for key in sorted(set(a) | set(b), key=str):
            if key == "half_life":  # derived from alpha
                continue
            out += _diff(a.get(key), b.get(key), f"{prefix}{key}.")
        return out
    return [] if a == b else [prefix[:-1]]
