import dataclasses
import json

import pytest

from chronomoe_v3 import (
    BiasConfig,
    BimodalityConfig,
    ChronoConfig,
    ClockConfig,
    CoherenceConfig,
    DegradeConfig,
    LifecycleConfig,
    ObjectiveConfig,
)


def test_defaults_match_the_design():
    c = ChronoConfig()
    assert c.coherence.alphas == (0.9, 0.99, 0.999)
    b = c.bias
    assert (b.eta, b.tau, b.beta_min, b.beta_max) == (0.01, 0.5, -1.0, 1.0)
    o = c.objective
    assert (o.lambda_complexity, o.rho_redundancy, o.kappa_instability) == (0.01, 0.1, 0.1)
    lc = c.lifecycle
    assert (o.min_improvement, lc.max_edits_per_cycle, lc.cooldown_steps, lc.eval_interval) == (0.01, 1, 300, 2)
    assert (lc.audit_steps, o.min_evidence_tokens) == (300, 4096.0)
    assert (lc.min_experts_per_layer, lc.max_experts_per_layer) == (2, 16)
    assert lc.spawn_strategy == "clone_and_perturb"
    assert lc.perturbation_scale == 0.01
    assert c.bimodality.centroid.alpha == 0.95
    assert c.basins.history == 50
    assert c.coherence.estimator == "loo"


@pytest.mark.parametrize(
    "make, field",
    [
        (lambda: CoherenceConfig(fast=ClockConfig("fast", alpha=1.0)), "ClockConfig"),
        (lambda: CoherenceConfig(slow=ClockConfig("slow", alpha=0.0)), "ClockConfig"),
        (lambda: CoherenceConfig(fast=ClockConfig("fast", alpha=0.99), mid=ClockConfig("mid", alpha=0.99)),
         "coherence.fast < coherence.mid"),
        (lambda: CoherenceConfig(fast=ClockConfig("fast", alpha=0.995)), "coherence.fast < coherence.mid"),
        (lambda: BiasConfig(beta_min=1.0, beta_max=1.0), "beta_min"),
        (lambda: BiasConfig(beta_min=0.5, beta_max=0.2), "beta_min"),
        (lambda: LifecycleConfig(min_experts_per_layer=5, max_experts_per_layer=4), "min_experts_per_layer"),
        (lambda: CoherenceConfig(estimator="median"), "coherence.estimator"),
        (lambda: LifecycleConfig(spawn_strategy="clone"), "lifecycle.spawn_strategy"),
        (lambda: BiasConfig(mode="both"), "bias.mode"),
        (lambda: DegradeConfig(baseline="fast"), "degrade.baseline"),
        (lambda: DegradeConfig(z=-1.0), "degrade.z"),
        (lambda: BiasConfig(eta=float("nan")), "bias.eta"),
        (lambda: LifecycleConfig(cooldown_steps=-1), "lifecycle.cooldown_steps"),
        (lambda: LifecycleConfig(eval_interval=0), "lifecycle.eval_interval"),
        (lambda: BimodalityConfig(centroid=ClockConfig("centroid", alpha=1.5)), "ClockConfig"),
        (lambda: BiasConfig(tau=2.0), "bias.tau"),
        (lambda: ObjectiveConfig(starvation_floor=1.0), "objective.starvation_floor"),
        (lambda: ChronoConfig(lifecycle=LifecycleConfig(), bias="logits"), "bias"),  # type: ignore[arg-type]
    ],
)
def test_invalid_values_name_the_field(make, field):
    with pytest.raises(ValueError, match=field.split()[0]):
        make()


def test_error_message_states_allowed_range():
    with pytest.raises(ValueError, match=r"0 < alpha < 1"):
        CoherenceConfig(fast=ClockConfig("fast", alpha=1.2))
    with pytest.raises(ValueError, match="one of"):
        CoherenceConfig(estimator="x")
    with pytest.raises(ValueError, match=r"\[-1.0, 1.0\]"):
        BiasConfig(tau=2.0)


def test_bridge_floors_must_not_exceed_their_clocks():
    from chronomoe_v3 import BridgeConfig

    with pytest.raises(ValueError, match="bridge.alpha_floor_fast"):
        ChronoConfig(bridge=BridgeConfig(alpha_floor_fast=0.95))


def test_clocks_by_half_life():
    c = ChronoConfig(coherence=CoherenceConfig(slow=ClockConfig("slow", half_life=2000)))
    assert c.coherence.slow.alpha == pytest.approx(2 ** (-1 / 2000))
    assert c.coherence.slow.half_life == 2000


def test_dict_round_trip_through_json_and_unknown_fields():
    c = ChronoConfig(
        bias=BiasConfig(tau=0.3),
        coherence=CoherenceConfig(estimator="full", slow=ClockConfig("slow", half_life=1500.0)),
        lifecycle=LifecycleConfig(cooldown_steps=7),
    )
    back = ChronoConfig.from_dict(json.loads(json.dumps(c.to_dict())))
    assert back == c and back.diff(c) == []
    with pytest.raises(ValueError, match="unknown ChronoConfig sections"):
        ChronoConfig.from_dict({"taux": {}})
    with pytest.raises(ValueError, match="unknown fields .*'taux'.* in config section 'bias'"):
        ChronoConfig.from_dict({"bias": {"taux": 1}})
    assert ChronoConfig.from_dict({}) == ChronoConfig()


def test_diff_names_the_fields_that_differ():
    a = ChronoConfig()
    b = dataclasses.replace(
        a, lifecycle=dataclasses.replace(a.lifecycle, cooldown_steps=7),
        coherence=dataclasses.replace(a.coherence, slow=ClockConfig("slow", alpha=0.998)),
    )
    assert a.diff(b) == ["coherence.slow.alpha", "lifecycle.cooldown_steps"]
    assert a.diff(a) == []
